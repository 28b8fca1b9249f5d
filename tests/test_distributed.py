"""Scaling out: the launch command, --dry-run and its memory plan, device honesty, mixed precision and
gradient checkpointing, and 2-process FSDP runs (gloo, CPU) of grpo.py and agrl.py.

The FSDP runs use accelerate's own FSDP2 code (wrapping, whole state dicts, optimizer save and load);
accelerate only turns FSDP on for GPU process groups, launch.make_accelerator flips the same switch on
CPU. Their work is deliberately uneven: with seed 1 and 12 training prompts the first step keeps one
group of two, and refills one prompt at a time three times, so rank 1 has no prompt to generate in
three rounds; in agrl.py the stagnant groups of those rounds are guided on rank 0 only. Generation
must therefore contain no collective (it runs on an inference copy gathered once per step), or these
runs hang; every launched run is killed after a timeout, so a hang fails the test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from test_grpo import assert_same_weights, read_metrics, state_dict  # noqa: E402

import agrl  # noqa: E402
import eval as E  # noqa: E402
import grpo  # noqa: E402
import rewards as R  # noqa: E402
from helpers import errors, launch, memory, models  # noqa: E402

LAUNCH_TIMEOUT = 240


# ==================================================================================================
# 1. The launch command passes accelerate's own parser and validation
# ==================================================================================================
def accelerate_validate(command: list[str]):
    """Parse and validate an `accelerate launch` command the way `accelerate launch` does, without launching."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert command[1:3] == ["-m", "accelerate.commands.launch"], command
    args = launch_command_parser().parse_args(command[3:])
    _validate_launch_command(args)
    return args


@pytest.mark.parametrize("num_gpus,strategy", [(8, "auto"), (8, "fsdp"), (8, "ddp"), (1, "fsdp")])
def test_launch_command_passes_accelerate_validation(num_gpus, strategy):
    script = ["agrl.py", "--model", "Qwen2.5-7B", "--num-gpus", str(num_gpus)]
    args = accelerate_validate(launch.launch_command(num_gpus, "cuda", strategy, "auto", script))
    assert args.num_processes == num_gpus and args.mixed_precision == "bf16"
    assert args.training_script == "agrl.py" and args.training_script_args == script[1:]
    if strategy == "ddp":
        assert args.multi_gpu and not args.use_fsdp
    else:
        assert args.use_fsdp and not args.multi_gpu and args.fsdp_version == "2"
        assert args.fsdp_state_dict_type == "FULL_STATE_DICT"


def test_the_old_launch_command_is_what_accelerate_rejects():
    """The validation used above can fail: `--multi_gpu` with `--use_fsdp` (the command before) is refused."""
    old = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "8",
        "--multi_gpu",
        "--use_fsdp",
        "agrl.py",
    ]
    with pytest.raises(ValueError, match="only use one of"):
        accelerate_validate(old)


def test_cpu_launch_is_torchrun_with_n_ranks():
    command = launch.launch_command(2, "cpu", "fsdp", "auto", ["grpo.py", "--device", "cpu"])
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "grpo.py",
        "--device",
        "cpu",
    ]


# ==================================================================================================
# 2. --dry-run: resolved id, launch command, parallel plan, memory plan; no weights, exit 0
# ==================================================================================================
CHILD_ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "AGRL_LAUNCHED")}
CHILD_ENV.update(
    OMP_NUM_THREADS="1",
    TOKENIZERS_PARALLELISM="false",
    PYTHONUNBUFFERED="1",
    TQDM_DISABLE="1",
    WANDB_MODE="disabled",
    HF_HUB_OFFLINE="1",
)


def test_dry_run_of_the_literal_8_gpu_command(tmp_path):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "agrl.py"), "--model", "Qwen2.5-7B", "--num-gpus", "8", "--dry-run"],
        cwd=tmp_path,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "Qwen2.5-7B -> Qwen/Qwen2.5-7B" in out and "7.62B parameters" in out
    launch_line = next(line for line in out.splitlines() if line.startswith("launch"))
    args = accelerate_validate(shlex.split(launch_line.split(maxsplit=1)[1]))
    assert args.use_fsdp and args.num_processes == 8 and args.training_script_args[-1] == "8"
    assert "--dry-run" not in args.training_script_args
    assert "FSDP2" in out and "bf16 compute, fp32 master weights" in out and "gradient checkpointing on" in out
    assert "on 80 GB cards" in out and "on 141 GB cards" in out
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"
    print(out, f"\n({seconds:.1f} s)")


@pytest.mark.parametrize(
    "name,billions",
    [
        ("Qwen2.5-0.5B-Instruct", 0.49),
        ("Qwen/Qwen2.5-7B-Instruct", 7.62),
        ("Qwen2.5-72B", 72.7),
        ("meta-llama/Meta-Llama-3-8B-Instruct", 8.03),
        ("Llama-3.1-70B", 70.6),
    ],
)
def test_shape_table_gives_the_published_parameter_counts(name, billions, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shape, source = memory.model_shape(name)
    assert "built-in table" in source
    assert memory.parameter_count(shape) / 1e9 == pytest.approx(billions, rel=0.01)


def test_memory_plan_checkpointing_and_sharding_and_unknown_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shape = memory.model_shape("Qwen2.5-7B")[0]
    args = grpo.Args(model="Qwen2.5-7B")
    workload = memory.Workload(
        args.micro_batch_size,
        args.max_new_tokens,
        args.max_item_tokens,
        False,
        args.prompts_per_step,
        args.group_size,
        args.gen_batch_size,
    )

    def plan(world, strategy, ckpt):
        return {
            item.split(" (")[0]: gib
            for item, gib, _ in memory.memory_plan(workload, shape, world, strategy, "bf16", ckpt)
        }

    sharded, whole = plan(8, "fsdp", True), plan(1, "single", True)
    assert sharded["AdamW states fp32"] == pytest.approx(whole["AdamW states fp32"] / 8)
    assert whole["AdamW states fp32"] == pytest.approx(7.62e9 * 8 / 2**30, rel=0.01)
    assert plan(8, "fsdp", False)["activations"] > 10 * sharded["activations"]
    assert memory.model_shape("some-org/unknown-model-3b")[0] is None
    report = launch.dry_run_report(grpo.Args(model="some-org/unknown-model-3b", num_gpus=8), workload)
    assert "memory    unknown: no local config for some-org/unknown-model-3b" in report


# ==================================================================================================
# 3. Device honesty: asking for CUDA where there is none is one line and a non-zero exit
# ==================================================================================================
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "device,num_gpus,flag",
    [("cuda", 1, "--device cuda"), ("auto", 8, "--num-gpus 8"), ("cuda:1", 2, "--device cuda:1")],
)
def test_cuda_requested_without_cuda_is_a_one_line_user_error(device, num_gpus, flag):
    with pytest.raises(errors.UserError) as stop:
        launch.relaunch(num_gpus, device)
    err = str(stop.value)
    assert err.count("\n") == 0 and err.startswith(f"{flag} needs CUDA") and "--device cpu" in err


def test_cuda_requested_without_cuda_from_the_command_line_fails_within_seconds(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    proc = subprocess.run(
        [sys.executable, str(REPO / "grpo.py"), "--model", "tiny-random", "--num-gpus", "2"],
        cwd=tmp_path,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "needs CUDA" in proc.stderr and not (tmp_path / "runs").exists()
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "--device", "cuda"],
        cwd=tmp_path,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--device cuda needs CUDA" in proc.stderr


# ==================================================================================================
# 4. Precision: fp32 master weights under bf16 compute; gradient checkpointing is exact
# ==================================================================================================
def fake_score_group(texts, example, rulebook, args):
    """k = (source id mod 5) of the G rollouts are correct, reward 1 for them: mixed groups for k = 1..3."""
    k = int(example.source_id.rsplit(":", 1)[1]) % 5
    scores = [R.score_output(t, example.label, example.criteria, rulebook, args.order) for t in texts]
    return [dataclasses.replace(s, correct=j < k) for j, s in enumerate(scores)], [
        float(j < k) for j in range(len(texts))
    ]


RUN = dict(
    model="tiny-random",
    dataset="synthetic",
    limit=12,
    prompts_per_step=2,
    group_size=4,
    max_new_tokens=8,
    micro_batch_size=2,  # two micro-batches per rank: gradients accumulate (under FSDP, sharded)
    device="cpu",
    eval_limit=2,
    temperature=1.0,
    warmup_steps=1,
    lr=1e-3,
    seed=1,
    loss_agg="sequence",
    dynamic_sampling=True,
    ds_rule="accuracy",
    ds_low=0.3,
    ds_high=0.99,
    ds_max_tries=3,
    save_every=1,
    keep_last=3,
)


def no_eval(mp):
    mp.setattr(E, "run_eval", lambda *a, **k: E.classification_metrics([], [], R.TAOBAO4.labels))
    mp.setattr(E, "metrics_table", lambda *a, **k: "")


def test_small_lr_moves_the_weights_under_bf16_mixed_precision(tmp_path):
    """lr 1e-6 through grpo.main with bf16 compute: the fp32 master weights take the update. Kept in bf16
    (the launch before), about 2% of them would not move at all, shown on the same update below."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grpo, "score_group", fake_score_group)
        no_eval(mp)
        grpo.main(
            grpo.Args(
                **{
                    **RUN,
                    "lr": 1e-6,
                    "total_steps": 1,
                    "precision": "bf16",
                    "gradient_checkpointing": "on",
                    "output_dir": str(tmp_path),
                    "run_name": "bf16",
                }
            )
        )
    initial = models.tiny_random_model(models.embedded_tokenizer()).state_dict()
    final = state_dict(tmp_path / "bf16" / "checkpoint")
    assert read_metrics(tmp_path / "bf16")[0]["grad_norm"] > 0
    moved = changed = total = 0
    for name, before in initial.items():
        if name not in final:  # the tied head is stored once
            continue
        after = final[name]
        assert after.dtype == torch.float32, name
        moved += (after != before).sum().item()
        changed += (before.bfloat16() != (before + (after - before)).bfloat16()).sum().item()
        total += before.numel()
    print(f"moved {moved / total:.1%} of the weights; a bf16 copy would have changed {changed / total:.1%}")
    assert moved / total > 0.95, f"only {moved / total:.1%} of the weights moved"
    assert changed / total < 0.5 * moved / total, (
        "a bf16 copy would have kept most of this update: the check shows nothing"
    )


@pytest.mark.parametrize("share_prefix", [True, False])
def test_gradient_checkpointing_gives_the_same_logprobs_and_gradients(tokenizer, share_prefix):
    prompts = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9], [1, 2, 3, 7, 8, 9, 10]]
    completions = [[11, 12, 13], [14], [15, 16]]
    results = []
    for on in (False, True):
        model = models.tiny_random_model(tokenizer).train()
        if on:
            models.enable_checkpointing(model)
            assert models.checkpointing(model)
        embedded = []  # tokens through the embedding: with a shared prefix, it runs once, also under checkpointing
        model.get_input_embeddings().register_forward_hook(lambda m, args, out: embedded.append(args[0].numel()))
        batch = models.pad_batch(prompts, completions, tokenizer.pad_token_id, "cpu", share_prefix=share_prefix)
        logp, _ = models.token_logprobs(model, batch)
        (logp * batch["completion_mask"]).sum().backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        if share_prefix:  # [1, 2, 3] starts every prompt: once, then each row's own tokens (no padding)
            expected = 3 + sum(len(p) - 3 + len(c) for p, c in zip(prompts, completions))
        else:  # every row padded to the longest prompt and completion
            expected = len(prompts) * (max(map(len, prompts)) + max(map(len, completions)))
        assert sum(embedded) == expected, embedded
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ==================================================================================================
# 5. Two FSDP processes with uneven work: they finish, and match one process; kill -9 and resume
# ==================================================================================================
DRIVER = '''
import json, os, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import tyro
import eval as E
import {script} as script
from helpers import models, rollouts
import test_distributed
import test_vllm

script.score_group = test_distributed.fake_score_group
E.run_eval = lambda *a, **k: E.classification_metrics([], [], test_distributed.R.TAOBAO4.labels)
E.metrics_table = lambda *a, **k: ""
calls, rollout_generate = [], rollouts.rollout_generate
prefixes, pad_batch = [], models.pad_batch


def recording_pad_batch(prompts, completions, pad_id, device, share_prefix=False):
    batch = pad_batch(prompts, completions, pad_id, device, share_prefix)
    prefixes.append([batch["prefix_ids"].shape[1], max(map(len, prompts))])  # the prefix run once, the longest prompt
    return batch


def counting_rollout_generate(model, accelerator, engine, tokenizer, prompts, **kwargs):
    calls.append(len(prompts))  # how much each rank generates: the test checks that ranks differ
    return rollout_generate(model, accelerator, engine, tokenizer, prompts, **kwargs)


def dump_trained_weights(args, model, tokenizer, run, device):
    """Instead of the evaluation: every rank helps gather the trained weights, rank 0 writes them."""
    from safetensors.torch import save_file

    whole = {{name: rollouts.full_tensor(t).clone() for name, t in models.unwrapped(model).state_dict().items()}}
    engine = test_vllm.FakeLLM()  # the vLLM weight sync from FSDP shards, recorded
    rollouts.sync_vllm_weights(engine, model)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        pushed = [(name, list(shape), (tensor.float() - whole[name].bfloat16().float()).abs().max().item())
                  for _, name, shape, _, tensor in (e for e in engine.log if e[0] == "load")]
        with open(os.path.join(args.output_dir, args.run_name, "vllm-pushed.json"), "w") as f:
            json.dump(pushed, f)
    with open(os.path.join(args.output_dir, args.run_name, f"calls-rank{{rank}}.json"), "w") as f:
        json.dump(calls, f)
    with open(os.path.join(args.output_dir, args.run_name, f"prefixes-rank{{rank}}.json"), "w") as f:
        json.dump(prefixes, f)
    if rank == 0:
        save_file({{k: v.contiguous() for k, v in whole.items()}}, os.path.join(args.output_dir, args.run_name, "trained.safetensors"))
    return {{}}


rollouts.rollout_generate = counting_rollout_generate
models.pad_batch = recording_pad_batch
E.final_eval = dump_trained_weights
if "--vllm" in sys.argv:  # the recording fake engine stands in for vLLM
    import types
    sys.modules["vllm"] = types.SimpleNamespace(LLM=test_vllm.FakeLLM, SamplingParams=test_vllm.FakeSamplingParams)
script.main(tyro.cli(script.Args))
'''


def fsdp_command(tmp_path: Path, script: str, name: str, base: dict = RUN, **overrides) -> list[str]:
    """The driver's command for a 2-process FSDP run of `script` with the flags `base` | `overrides`."""
    driver = tmp_path / f"{script}_driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO), tests=str(Path(__file__).parent), script=script))
    flags = []
    for key, value in {
        **base,
        "num_gpus": 2,
        "strategy": "fsdp",
        **overrides,
        "output_dir": str(tmp_path),
        "run_name": name,
    }.items():
        flag = "--" + key.replace("_", "-")
        flags += (
            ([flag] if value else ["--no-" + key.replace("_", "-")]) if isinstance(value, bool) else [flag, str(value)]
        )
    return [sys.executable, str(driver), *flags]


@contextlib.contextmanager
def launched(command: list[str], cwd: Path):
    """A 2-process run in its own process group, killed with its ranks after the timeout or on exit."""
    log = open(cwd / "log.txt", "w+")
    proc = subprocess.Popen(
        command, cwd=cwd, env=CHILD_ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    proc.log = lambda: (log.seek(0), log.read()[-4000:])[1]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            kill_run(proc)
        proc.wait(timeout=60)
        log.close()


def run_launched(command: list[str], cwd: Path) -> None:
    with launched(command, cwd) as proc:
        try:
            proc.wait(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the 2-process run hung (killed after {LAUNCH_TIMEOUT} s):\n{proc.log()}")
        assert proc.returncode == 0, f"2-process run failed (rc {proc.returncode}):\n{proc.log()}"


def run_in_process(module, out: Path, name: str, **overrides) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "score_group", fake_score_group)
        no_eval(mp)
        module.main(module.Args(**{**RUN, **overrides, "output_dir": str(out), "run_name": name}))
    return out / name


def assert_uneven_and_matching(two: Path, one: Path, lr: float) -> None:
    calls = [json.loads((two / f"calls-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(calls[0]) > len(calls[1]), f"the work was not uneven: generate calls per rank {calls}"
    for rank in (0, 1):  # a group's rows on one rank: the training forwards run a whole prompt once for them
        prefixes = json.loads((two / f"prefixes-rank{rank}.json").read_text())
        # (each row keeps its prompt's last token, whose logits predict its first completion token)
        assert any(prefix == longest - 1 for prefix, longest in prefixes), f"rank {rank} shared no prompt: {prefixes}"
    assert read_metrics(one)[0]["data_position"] > 2  # after refills
    assert_matching(two, one, lr)


def assert_matching(two: Path, one: Path, lr: float) -> None:
    a, b = read_metrics(one)[0], read_metrics(two)[0]
    for key in ("reward_mean", "accuracy", "completion_len_mean", "data_position", "groups_kept", "loss", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    assert a["grad_norm"] > 0  # the step trained
    # Adam's first step is ~ lr * sign(g): an element near 0 may flip between summation orders
    assert_same_weights(
        state_dict(one / "checkpoints" / "step-0000001"),
        sharded_weights(two / "checkpoints" / "step-0000001"),
        atol=0.1 * lr,
    )


def sharded_weights(folder: Path) -> dict:
    """The whole weights of an FSDP step checkpoint (every rank's DCP shard), read in this one process."""
    import warnings

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "no process group: loading in a single process", which is the point
        warnings.simplefilter("ignore", UserWarning)
        return _load_state_dict_from_keys(checkpoint_id=str(folder))["model"]


# grpo_fsdp, the uninterrupted 3-step 2-process FSDP grpo.py run, is in conftest.py: tests/test_sharded_checkpoints.py
# resumes against it and reads its checkpoints too


def test_grpo_fsdp_uneven_work_finishes_and_matches_one_process(grpo_fsdp, tmp_path):
    one = run_in_process(grpo, tmp_path, "one", total_steps=1)
    assert_uneven_and_matching(grpo_fsdp, one, RUN["lr"])


def test_agrl_fsdp_guided_sampling_on_one_rank_finishes_and_matches_one_process(tmp_path):
    """With activation checkpointing too (a group's prompt is still run once for its rows)."""
    run_launched(fsdp_command(tmp_path, "agrl", "two", total_steps=1, gradient_checkpointing="on"), tmp_path)
    one = run_in_process(agrl, tmp_path, "one", total_steps=1, gradient_checkpointing="on")
    two = tmp_path / "two"
    m = read_metrics(two)[0]
    assert m["agr_stagnant_share"] > 0 and m["agr_level_1"] + m["agr_level_2"] > 0, "no guided sampling happened"
    assert_uneven_and_matching(two, one, RUN["lr"])


def test_vllm_sync_from_fsdp_pushes_whole_tensors_under_hf_names(grpo_fsdp):
    """Each FSDP2 shard is gathered whole for its push: the names and shapes the (fake) engine received
    are the Hugging Face state dict's, and the values the trained weights in bf16."""
    pushed = json.loads((grpo_fsdp / "vllm-pushed.json").read_text())
    hf = models.tiny_random_model(models.embedded_tokenizer()).state_dict()
    assert [(name, shape) for name, shape, _ in pushed] == [(n, list(t.shape)) for n, t in hf.items()]
    assert max(error for *_, error in pushed) == 0


# ==================================================================================================
# 6. Decisions that start collectives are taken together (issue 22: defects 3 and 4)
# ==================================================================================================
def test_agrl_fsdp_correction_none_with_guided_rows_on_one_rank_finishes_and_matches(tmp_path):
    """--agr-correction none recomputes pi_old(o | x) for guided rows with a training forward, a collective
    under FSDP: when any rank holds such a row every rank must run it, or the collectives stop matching."""
    # the target is always well formed: kept; tau 0.25 makes the fake scorer's low-accuracy groups stagnant
    flags = dict(total_steps=1, agr_correction="none", agr_guide="target", agr_tau=0.25)
    run_launched(fsdp_command(tmp_path, "agrl", "two", **flags), tmp_path)
    one = run_in_process(agrl, tmp_path, "one", **flags)
    assert read_metrics(tmp_path / "two")[0]["agr_guided_share"] > 0, "no guided rows: the test tests nothing"
    assert_matching(tmp_path / "two", one, RUN["lr"])


def test_agrl_fsdp_with_vllm_guides_and_matches_one_process(tmp_path, monkeypatch):
    """Issue 22, defect 1: --vllm under FSDP keeps no whole HF copy, so AGR's forced tokens get their behaviour
    log-probs from the training forward (every rank, update 0) instead of a local forward. With --agr-correction
    is those log-probs enter the loss: two FSDP processes match one process, where a local forward gives them."""
    import test_vllm

    monkeypatch.setitem(
        sys.modules,
        "vllm",
        test_vllm.types.SimpleNamespace(LLM=test_vllm.FakeLLM, SamplingParams=test_vllm.FakeSamplingParams),
    )
    flags = dict(total_steps=1, vllm=True, agr_guide="target", agr_correction="is", agr_tau=0.25)
    run_launched(fsdp_command(tmp_path, "agrl", "two", **flags), tmp_path)
    one = run_in_process(agrl, tmp_path, "one", **flags)
    assert read_metrics(tmp_path / "two")[0]["agr_guided_share"] > 0, "no guided rows: the test tests nothing"
    assert_matching(tmp_path / "two", one, RUN["lr"])


def descendants(root: int) -> set[int]:
    """Every process started under `root`, by parent links: torchrun puts each rank in a session of its own,
    out of reach of a signal to the launcher's process group."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    family, grew = {root}, True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in family and pid not in family:
                family.add(pid)
                grew = True
    return family - {root}


def kill_run(proc) -> None:
    """SIGKILL to a launched run: every rank, then the launcher's process group."""
    for pid in descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def rank_pid(root: int, rank: int) -> int:
    """The worker process of `rank` among the descendants of a launched run (torchrun sets RANK in its env): the
    one whose parent is not of that rank too (a rank's own children, a compiler say, inherit its RANK)."""
    ranked = set()
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                ranked.add(pid)
    for pid in ranked:
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) not in ranked:
                return pid
    raise AssertionError(f"no process of rank {rank} under {root}")


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """The stop flag is agreed on by all ranks each step: a SIGTERM that reaches one rank makes every rank
    checkpoint the same step and exit, instead of one rank entering the checkpoint's collectives alone."""
    run_dir = tmp_path / "run"
    with launched(fsdp_command(tmp_path, "grpo", "run", total_steps=40, save_every=100), tmp_path) as proc:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, f"no step in time:\n{proc.log()}"
            time.sleep(0.05)
        os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
        try:
            proc.wait(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the ranks disagreed and hung after a SIGTERM to rank 1:\n{proc.log()}")
        log = proc.log()
    assert proc.returncode == 0, log
    last = read_metrics(run_dir)[-1]["step"]
    assert last < 40 and "continue with --resume" in log, log
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{last:07d}"]


GRADIENT_DRIVER = """
import json, sys
sys.path.insert(0, {repo!r})
import torch
from helpers import cli, launch, models

accelerator = launch.make_accelerator("cpu", "fsdp")
tokenizer = models.embedded_tokenizer()
model = models.tiny_random_model(tokenizer).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model, optimizer = accelerator.prepare(model, optimizer)
whole = sum(p.numel() * 4 for p in model.parameters())  # bytes of one whole fp32 gradient
held = []  # per micro-batch: (bytes of sharded .grad, bytes of whole gradients FSDP keeps aside, params without .grad)
for k in range(3):
    torch.manual_seed(100 * accelerator.process_index + k)
    prompts = [torch.randint(0, 1000, (6,)).tolist() for _ in range(2)]
    completions = [torch.randint(0, 1000, (4,)).tolist() for _ in range(2)]
    batch = models.pad_batch(prompts, completions, tokenizer.pad_token_id, "cpu", share_prefix=False)
    with launch.micro_batch_sync(accelerator, model, last=k == 2):
        logp, _ = models.token_logprobs(model, batch)
        accelerator.backward(-(logp * batch["completion_mask"]).sum())
    sharded = sum(p.grad.to_local().numel() * 4 for p in model.parameters() if p.grad is not None)
    fsdp_params = {{}}  # FSDP2's own record of each parameter (several modules may share one state)
    for module in model.modules():
        state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
        for group in (state._fsdp_param_groups if state is not None else []):
            fsdp_params.update((id(fsdp_param), fsdp_param) for fsdp_param in group.fsdp_params)
    aside = 0
    for fsdp_param in fsdp_params.values():
        grad = fsdp_param.unsharded_accumulated_grad
        grad = grad if grad is not None else fsdp_param._unsharded_param.grad
        aside += 0 if grad is None else grad.numel() * grad.element_size()
    held.append((sharded, aside, sum(p.grad is None for p in model.parameters())))
if accelerator.is_main_process:
    json.dump(dict(whole=whole, held=held), open(sys.argv[1], "w"))
cli.leave_process_group()
"""


def test_fsdp_gradients_stay_sharded_between_micro_batches(tmp_path):
    """Issue 22, defect 2: over several micro-batches under FSDP2 every backward reduce-scatters, so each rank
    holds only its shard of the gradients. With accelerate's no_sync, FSDP2 keeps a whole gradient per
    parameter until the last micro-batch (for 7B: about 28 GiB per GPU beside the 3.6 GiB shard)."""
    driver = tmp_path / "driver.py"
    driver.write_text(GRADIENT_DRIVER.format(repo=str(REPO)))
    out = tmp_path / "held.json"
    run_launched(launch.launch_command(2, "cpu", "fsdp", script=[str(driver), str(out)]), tmp_path)
    result = json.loads(out.read_text())
    whole = result["whole"]
    for k, (sharded, aside, without_grad) in enumerate(result["held"]):
        print(
            f"after micro-batch {k + 1}: sharded gradients {sharded / whole:.2f} of a whole one, "
            f"whole gradients kept aside {aside / whole:.2f}, parameters without a gradient {without_grad}"
        )
        assert without_grad == 0 and aside == 0, f"micro-batch {k + 1}: gradients held whole outside the shards"
        assert sharded <= 0.55 * whole, f"micro-batch {k + 1}: rank 0 holds {sharded / whole:.2f} of the gradient"


SFT_RUN = dict(
    model="tiny-random",
    dataset="synthetic",
    limit=16,
    total_steps=2,
    batch_size=2,
    warmup_steps=1,
    lr=1e-3,
    device="cpu",
    eval_limit=2,
    seed=1,
    log_every=1,
    save_every=1,
)


def test_sft_fsdp_shares_the_system_prompt_and_matches_one_process(tmp_path):
    """sft.py under 2 FSDP processes, 2 micro-batches each: its first FSDP run in the tests. The micro-batches' common
    prefix (the system prompt) is run once for their rows on every rank (the packed pass: one forward call per
    micro-batch on every rank), and the run matches one process over the same global batch of 8."""
    import sft

    run_launched(fsdp_command(tmp_path, "sft", "two", SFT_RUN, grad_accum=2), tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        no_eval(mp)
        sft.main(sft.Args(**SFT_RUN, grad_accum=4, output_dir=str(tmp_path), run_name="one"))
    two, one = tmp_path / "two", tmp_path / "one"
    for rank in (0, 1):
        prefixes = json.loads((two / f"prefixes-rank{rank}.json").read_text())
        assert prefixes and all(prefix > 0 for prefix, _ in prefixes), f"rank {rank} shared nothing: {prefixes}"
    for a, b in zip(read_metrics(one), read_metrics(two), strict=True):
        for key in ("loss", "label_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    assert_same_weights(state_dict(one / "checkpoint"), state_dict(two / "checkpoint"), atol=0.1 * SFT_RUN["lr"])


def test_dpo_fsdp_shares_the_prompt_and_matches_one_process(tmp_path):
    """dpo.py from a pairs file under 2 FSDP processes, 2 micro-batches each (its first FSDP run in the tests): the
    reference log-probs come from the whole policy on every rank before prepare, each micro-batch's chosen and
    rejected rows share their prompt's prefix, and the run matches one process over the same global batch of 4."""
    from test_dpo import COMMON, make_pairs_file

    import dpo

    pairs = make_pairs_file(tmp_path / "hand.jsonl", models.embedded_tokenizer())
    run = dict(COMMON, pairs_path=str(pairs), total_steps=2, batch_size=1, device="cpu", seed=1, save_every=1)
    run_launched(fsdp_command(tmp_path, "dpo", "two", run, grad_accum=2), tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        no_eval(mp)
        dpo.main(dpo.Args(**{**run, "grad_accum": 4}, output_dir=str(tmp_path), run_name="one"))
    two, one = tmp_path / "two", tmp_path / "one"
    for rank in (0, 1):  # the training passes are the last 2 steps x 2 micro-batches (the reference pass is first)
        prefixes = json.loads((two / f"prefixes-rank{rank}.json").read_text())[-4:]
        assert all(prefix > 0 for prefix, _ in prefixes), f"rank {rank} shared nothing in training: {prefixes}"
    lines = [[m for m in read_metrics(r) if "loss" in m] for r in (one, two)]
    assert len(lines[0]) == 2
    for a, b in zip(*lines, strict=True):
        for key in ("loss", "reward_margin", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert_same_weights(state_dict(one / "checkpoint"), state_dict(two / "checkpoint"), atol=0.1 * run["lr"])
