"""Sharded FSDP checkpoints (issue 22, defect 5), on 2-process gloo runs of grpo.py (tests/test_distributed.py's
driver and its 3-step run, `grpo_fsdp` in conftest.py).

Under FSDP a step checkpoint is every rank's own shard of the weights and AdamW states, written through
torch.distributed.checkpoint; `--resume` reads each rank's shard back after `prepare`; the run ends with one
whole Hugging Face export in `<run>/checkpoint/`, gathered one parameter at a time. Runs without FSDP keep
whole weights and the optimizer in train_state.pt.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
from test_distributed import LAUNCH_TIMEOUT, REPO, fsdp_command, kill_run, launched, run_launched, sharded_weights
from test_grpo import assert_same_weights, read_metrics, state_dict, untimed

from helpers import checkpoints, launch, models
from helpers.errors import UserError


def test_each_rank_writes_its_own_shard_and_no_step_checkpoint_holds_whole_weights(grpo_fsdp):
    folder = grpo_fsdp / "checkpoints" / "step-0000003"
    names = {p.name for p in folder.iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.pt", "config.json"} <= names, names
    assert not [n for n in names if n.endswith((".safetensors", ".bin"))], f"a whole-model file: {names}"
    state = torch.load(folder / "train_state.pt", weights_only=True)
    assert "optimizer" not in state and state["optimizer_param_groups"][0]["lr"] > 0
    # the manifest lists every rank's files, so validation sees a missing or truncated shard
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert manifest == {p.name: p.stat().st_size for p in folder.iterdir() if p.name != "manifest.json"}
    # each rank's file: its half of the weights and of AdamW's two states, 3 x the weights / 2 ranks
    whole = sum(t.numel() * t.element_size() for t in state_dict(grpo_fsdp / "checkpoint").values())
    for rank in (0, 1):
        size = (folder / f"__{rank}_0.distcp").stat().st_size
        assert size == pytest.approx(3 * whole / 2, rel=0.02), f"rank {rank} wrote {size} bytes, whole {whole}"
    # and together they are the trained weights (the last step's = the final export's)
    assert_same_weights(sharded_weights(folder), state_dict(grpo_fsdp / "checkpoint"), atol=0)


def test_final_fsdp_checkpoint_loads_with_from_pretrained_and_equals_the_trained_weights(grpo_fsdp):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(grpo_fsdp / "checkpoint").state_dict()
    trained = load_file(str(grpo_fsdp / "trained.safetensors"))  # gathered by the driver after training
    assert loaded.keys() == trained.keys()
    for name, tensor in trained.items():
        assert loaded[name].shape == tensor.shape and torch.equal(loaded[name], tensor), name
    initial = models.tiny_random_model(models.embedded_tokenizer()).state_dict()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    names = {p.name for p in (grpo_fsdp / "checkpoint").iterdir()}
    assert "model.safetensors" in names and not names & {"train_state.pt", ".metadata", "__0_0.distcp"}, names


def test_export_hf_splits_files_at_the_shard_size_and_from_pretrained_loads_them(tiny_model, tokenizer, tmp_path):
    """The export streams one parameter at a time into safetensors files it writes itself: several files and
    their index when the model exceeds `max_shard_bytes`, as Hugging Face writes them."""
    from transformers import AutoModelForCausalLM

    checkpoints.export_hf(tiny_model, tokenizer, tmp_path / "hf", max_shard_bytes=2**16)
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").exists(), files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert loaded.keys() == tiny_model.state_dict().keys()
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_fsdp_kill9_then_resume_skips_a_half_written_shard_and_reproduces_the_uninterrupted_run(grpo_fsdp, tmp_path):
    """SIGKILL to both ranks after step 2's checkpoint; rank 1's shard of it then loses its second half (a
    half-written file). `--resume` under 2-process FSDP says it skips step 2, every rank reads its own shard
    of step 1 back, and steps 2 and 3 equal the uninterrupted run's, metrics and weights."""
    run_dir = tmp_path / "run"
    with launched(fsdp_command(tmp_path, "grpo", "run", total_steps=3), tmp_path) as proc:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (run_dir / "checkpoints" / "step-0000002").exists():
            assert proc.poll() is None, f"the run ended before the kill (rc {proc.returncode}):\n{proc.log()}"
            assert time.monotonic() < deadline, f"no step-2 checkpoint in time:\n{proc.log()}"
            time.sleep(0.01)
        kill_run(proc)  # the ranks too: torchrun starts them in sessions of their own
    assert not (run_dir / "checkpoint").exists(), "killed too late: the run had finished"
    shard = run_dir / "checkpoints" / "step-0000002" / "__1_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    run_launched(fsdp_command(tmp_path, "grpo", "run", total_steps=3, resume=True), tmp_path)
    log = (tmp_path / "log.txt").read_text()
    assert "skipping broken checkpoint" in log and "__1_0.distcp has" in log, log
    assert "[resume] from " + str(run_dir / "checkpoints" / "step-0000001") in log, log
    reference, resumed = read_metrics(grpo_fsdp), read_metrics(run_dir)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(reference, resumed):
        assert untimed(a) == untimed(b), f"step {a['step']} differs"
    assert_same_weights(state_dict(grpo_fsdp / "checkpoint"), state_dict(run_dir / "checkpoint"), atol=0)


def test_a_checkpoint_resumed_under_the_other_strategy_is_one_line(grpo_fsdp, tiny_model, tokenizer, tmp_path):
    """FSDP shards without FSDP, or whole weights under FSDP: a UserError naming the folder and the fix."""
    sharded = grpo_fsdp / "checkpoints" / "step-0000003"
    accelerator = launch.make_accelerator("cpu", "auto", "fp32")
    with pytest.raises(UserError, match="holds FSDP shards .*--strategy fsdp") as e:
        checkpoints.load_policy("tiny-random", sharded, accelerator)
    assert str(sharded) in str(e.value) and "\n" not in str(e.value)
    whole = checkpoints.save_checkpoint(tmp_path, 1, tiny_model, tokenizer, {})
    with pytest.raises(UserError, match="written without FSDP") as e:
        checkpoints.check_strategy(whole, fsdp=True)
    assert str(whole) in str(e.value) and "\n" not in str(e.value)
    checkpoints.check_strategy(whole, fsdp=False)
    checkpoints.check_strategy(sharded, fsdp=True)


START_DRIVER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
from helpers import checkpoints, cli, launch, models
from helpers.errors import UserError

rank, reads, load_model = int(os.environ["RANK"]), [], models.load_model
models.load_model = lambda name, *a, **k: (reads.append(name), load_model(name, *a, **k))[1]
accelerator = launch.make_accelerator("cpu", "fsdp", "fp32")
try:  # rank 0's error reaches every rank, instead of the others waiting for its weights
    checkpoints.load_policy("no-such-org/no-such-model", None, accelerator)
except UserError as e:
    error = str(e)
model, tokenizer = checkpoints.load_policy("tiny-random", None, accelerator)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model, optimizer = accelerator.prepare(model, optimizer)
whole = {{name: t.full_tensor() for name, t in models.unwrapped(model).state_dict().items()}}
if rank == 0:
    torch.save(whole, "prepared.pt")
with open(f"rank{{rank}}.json", "w") as f:
    json.dump(dict(reads=reads, error=error, chat_template=tokenizer.chat_template is not None), f)
cli.leave_process_group()  # a rank done early must not tear its group down under rank 0
"""


def test_fsdp_start_load_reads_the_weights_on_rank_0_only_and_prepare_gives_every_rank_its_shard(tmp_path):
    """accelerate's cpu_ram_efficient_loading under FSDP2 on gloo: rank 1 never reads the model (it builds it
    from rank 0's config in never-written memory), and after prepare its shard holds the model's weights."""
    driver = tmp_path / "start_driver.py"
    driver.write_text(START_DRIVER.format(repo=str(REPO)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)]
    run_launched(command, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["reads"] == ["no-such-org/no-such-model", "tiny-random"] and ranks[1]["reads"] == [], ranks
    assert all("no-such-org/no-such-model" in r["error"] for r in ranks) and ranks[1]["chat_template"], ranks
    prepared = torch.load(tmp_path / "prepared.pt", weights_only=True)
    expected = models.tiny_random_model(models.embedded_tokenizer()).state_dict()
    assert prepared.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(prepared[name], tensor), name


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_dcp_metadata_that_names_other_code_is_refused_before_dcp_unpickles_it(grpo_fsdp, tmp_path, monkeypatch):
    """DCP reads `.metadata` with plain pickle: a crafted one could run anything at --resume. The check lets
    through what DCP writes there and nothing else."""
    import pickle
    import shutil

    checkpoints.check_dcp_metadata(grpo_fsdp / "checkpoints" / "step-0000003")  # a real one passes
    folder = tmp_path / "step-0000003"
    shutil.copytree(grpo_fsdp / "checkpoints" / "step-0000003", folder)
    (folder / ".metadata").write_bytes(pickle.dumps(RunsACommand()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="names posix.system"):
        checkpoints.check_dcp_metadata(folder)
    assert not (tmp_path / "pwned").exists()


def test_a_2_rank_fsdp_checkpoint_resumes_on_1_rank(grpo_fsdp, tmp_path):
    """DCP reshards at load: step 2 of the 2-process run (two shards), resumed as one FSDP process, gives step 3
    as the uninterrupted 2-process run had it (up to summation order), saved as one shard."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(grpo_fsdp, run_dir, ignore=shutil.ignore_patterns("step-0000003", "checkpoint"))
    run_launched(fsdp_command(tmp_path, "grpo", "run", total_steps=3, resume=True, num_gpus=1), tmp_path)
    assert "[resume] from " + str(run_dir / "checkpoints" / "step-0000002") in (tmp_path / "log.txt").read_text()
    a, b = read_metrics(grpo_fsdp)[2], read_metrics(run_dir)[2]
    for key in ("reward_mean", "data_position", "groups_kept", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert_same_weights(state_dict(grpo_fsdp / "checkpoint"), state_dict(run_dir / "checkpoint"), atol=1e-6)
    written = {p.name for p in (run_dir / "checkpoints" / "step-0000003").glob("*.distcp")}
    assert written == {"__0_0.distcp"}, f"one rank wrote step 3, in one shard: {written}"
