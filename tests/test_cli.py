"""The command line as a new user meets it: embedded defaults, one-line errors, run folders that never mix,
the empty-step stop and curves.png.

Three commands run as real processes (each python start imports torch and transformers: several
seconds): the literal tiny-random AGRL command with no data flag, the same command again (a refused
reuse of its folder), and a GRPO run that trains on nothing until `--max-empty-steps` stops it. The
rest (user errors, `--resume` changes, `--overwrite`) runs the script's `__main__` in this process
(`runpy`, the same `cli.run` path as the command line, imports cached): the test asserts exit code 2
and one line on stderr; an exception escaping `cli` would fail the test instead, as it would print a
traceback on the command line.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tyro

from helpers import errors, models

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {
    k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "AGRL_LAUNCHED", "AGRL_DEBUG")
}
CHILD_ENV.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", WANDB_MODE="disabled")
# The acceptance command of the issue: no data flag, so the synthetic world.
AGRL = [
    "--model",
    "tiny-random",
    "--total-steps",
    "1",
    "--prompts-per-step",
    "2",
    "--group-size",
    "2",
    "--max-new-tokens",
    "8",
    "--eval-limit",
    "4",
]
TINY_GRPO = [
    "--model",
    "tiny-random",
    "--limit",
    "8",
    "--prompts-per-step",
    "2",
    "--group-size",
    "2",
    "--max-new-tokens",
    "4",
    "--micro-batch-size",
    "2",
    "--eval-limit",
    "2",
    "--device",
    "cpu",
]


def launch(script: str, *flags: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *flags],
        cwd=cwd,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def in_process(capsys, monkeypatch, script: str, *flags: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python script flags`, run through the script's own __main__."""
    monkeypatch.setattr(sys, "argv", [script, *flags])
    code = 0
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def user_error(result: tuple[int, str, str]) -> str:
    """The one line of a user error (exit 2, nothing else on stderr)."""
    code, out, err = result
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert "Traceback" not in err + out
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]  # no tqdm bars
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def agrl_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("cli")
    return cwd, launch("agrl.py", *AGRL, cwd=cwd)


def test_literal_command_runs_on_the_synthetic_world_and_draws_curves(agrl_run):
    cwd, proc = agrl_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: the synthetic rule world (the default)" in proc.stdout and "--dataset esci" in proc.stdout
    run_dir = cwd / "runs" / "agrl-tiny-random-synthetic-s1"
    assert json.loads((run_dir / "args.json").read_text())["dataset"] == "synthetic"
    assert json.loads((run_dir / "eval.json").read_text())["n"] == 4
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert sum(v for k, v in line.items() if k.startswith("label_share_")) == pytest.approx(1.0)


def test_used_folder_is_refused_then_resume_accepts_harmless_changes(agrl_run, capsys, monkeypatch):
    cwd, first = agrl_run
    assert first.returncode == 0
    run_dir = cwd / "runs" / "agrl-tiny-random-synthetic-s1"
    before = (run_dir / "metrics.jsonl").read_text()
    refused = launch("agrl.py", *AGRL, cwd=cwd)  # the same command again: nothing is touched
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {Path('runs') / run_dir.name} holds a previous run (agrl.py, 1 metric lines, checkpoints up to step 1, "
        "eval.json): add --resume to continue it, --overwrite to delete it and start clean, or choose another --run-name"
    )
    assert (run_dir / "metrics.jsonl").read_text() == before

    monkeypatch.chdir(cwd)  # arguments that change the math are refused with the list of differences
    line = user_error(
        in_process(capsys, monkeypatch, "agrl.py", *AGRL, "--resume", "--lr", "1e-3", "--group-size", "4")
    )
    assert "group_size 2 -> 4" in line and "lr 1e-06 -> 0.001" in line and "total_steps" not in line

    code, out, err = in_process(
        capsys, monkeypatch, "agrl.py", *AGRL[:2], *AGRL[4:-2], "--total-steps", "2", "--eval-limit", "2", "--resume"
    )
    assert code == 0, err[-3000:]
    assert "accepted changes (recorded in args.json): eval_limit 4 -> 2, total_steps 1 -> 2" in out
    args = json.loads((run_dir / "args.json").read_text())
    assert args["total_steps"] == 2 and args["resumes"] == [{"total_steps": [1, 2], "eval_limit": [4, 2]}]
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((run_dir / "eval.json").read_text())["n"] == 2


def test_steps_that_train_on_nothing_warn_then_stop(tmp_path):
    # A random model never writes a parseable answer: every group is all wrong and dynamic sampling drops it.
    proc = launch(
        "grpo.py",
        *TINY_GRPO,
        "--total-steps",
        "5",
        "--ds-max-tries",
        "0",
        "--max-empty-steps",
        "2",
        "--run-name",
        "empty",
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # the first empty step already says why; the next ones only count
    assert (
        "warning: step 1 trained on nothing: dynamic sampling dropped all 2 groups (2 all wrong, 0 all right); "
        "likely cause: the policy never produced a parseable answer"
    ) in proc.stderr
    assert (
        "warning: step 2 trained on nothing: dynamic sampling dropped all 2 groups (2 all wrong, 0 all right)\n"
        in proc.stderr
    )
    assert proc.stderr.strip().splitlines()[-1] == (
        "stopped: 2 steps in a row trained on nothing (--max-empty-steps 2); likely cause: the policy never produced "
        "a parseable answer (format rate 0, 100% cut off by --max-new-tokens): start from an SFT checkpoint (sft.py)"
    )
    run_dir = tmp_path / "runs" / "empty"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["empty_steps"], m["groups_kept"], m["loss"]) for m in lines] == [
        (1, 1, 0, 0.0),
        (2, 2, 0, 0.0),
    ]
    assert (run_dir / "curves.png").exists()  # drawn for a run that stopped, too
    # what it has is saved and evaluated before the stop is reported
    assert (run_dir / "checkpoint" / "config.json").exists()
    assert json.loads((run_dir / "eval.json").read_text())["n"] == 2


def test_agrl_from_a_policy_that_never_parses_stops_too(tmp_path):
    # Target guidance keeps every group (the guided answer is right), so no step is literally empty; but none of
    # the policy's own answers parse, which from a base policy taught nothing (README): those steps count as empty.
    proc = launch(
        "agrl.py",
        *TINY_GRPO,
        "--total-steps",
        "5",
        "--agr-guide",
        "target",
        "--max-empty-steps",
        "2",
        "--run-name",
        "guided-only",
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        "warning: step 1 had guided answers only: none of the policy's own 4 answers parsed (a step's size counts "
        "the own groups: nothing trained); likely cause: the policy never produced a parseable answer"
    ) in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "stopped: 2 steps in a row had guided answers only (--max-empty-steps 2); likely cause: the policy never "
            "produced a parseable answer"
        )
    )
    lines = [json.loads(x) for x in (tmp_path / "runs" / "guided-only" / "metrics.jsonl").read_text().splitlines()]
    # the guided groups were made and kept, but a step's size counts the policy's own groups: nothing was trained
    assert [(m["agr_groups_guided"], m["groups_kept"], m["format_rate"], m["empty_steps"]) for m in lines] == [
        (2, 0, 0.0, 1),
        (2, 0, 0.0, 2),
    ]
    # after its first step, agrl.py (like grpo.py) says what the rest of the run takes and how to shorten it
    assert "[time] first step " in proc.stderr and "the 4 steps left take about" in proc.stderr
    assert "(--total-steps, --prompts-per-step, --group-size, --max-new-tokens shorten it)" in proc.stderr


def test_overwrite_starts_clean(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = [*TINY_GRPO, "--no-dynamic-sampling", "--save-every", "1", "--keep-last", "5", "--run-name", "o"]
    assert in_process(capsys, monkeypatch, "grpo.py", *flags, "--total-steps", "2")[0] == 0
    run_dir = tmp_path / "runs" / "o"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    user_error(in_process(capsys, monkeypatch, "grpo.py", *flags, "--total-steps", "1"))
    code, out, _ = in_process(capsys, monkeypatch, "grpo.py", *flags, "--total-steps", "1", "--overwrite")
    assert code == 0 and f"[overwrite] deleted the previous run in {Path('runs') / 'o'}" in out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000001"]  # the old step 2 is gone
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    assert {json.loads(x)["step"] for x in (run_dir / "samples.jsonl").read_text().splitlines()} == {1}


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "mine.jsonl"
    bad.write_text(
        '{"query": "red sofa", "title": "Red Sofa", "label": "Excellent"}\n'
        '{"query": "desk", "title": "Oak Desk", "label": "great"}\n'
    )
    cases = [  # (script, flags, what the line must say)
        (
            "sft.py",
            ["--model", "tiny-random", "--dataset", "jsonl", "--data-path", str(bad), "--run-name", "a"],
            "mine.jsonl row 2 field 'label': unknown label 'great'",
        ),
        ("sft.py", ["--dataset", "jsonl", "--run-name", "b"], "--dataset jsonl needs --data-path"),
        (
            "grpo.py",
            ["--dataset", "csv", "--data-path", "nowhere.csv", "--run-name", "c"],
            "data path nowhere.csv does not exist",
        ),
        ("grpo.py", ["--resume", "--run-name", "typo"], f"--resume: {Path('runs') / 'typo'} does not exist"),
        ("dpo.py", ["--dataset", "wikipedia", "--run-name", "d"], "unknown dataset 'wikipedia'"),
        ("eval.py", ["--compare", "runs/nowhere"], "runs/nowhere/eval.json missing"),
    ]
    for script, flags, expected in cases:
        line = user_error(in_process(capsys, monkeypatch, script, *flags))
        assert expected in line, (script, flags, line)
    # AGRL_DEBUG=1 shows the traceback instead
    monkeypatch.setenv("AGRL_DEBUG", "1")
    with pytest.raises(errors.UserError, match="missing"):
        in_process(capsys, monkeypatch, "eval.py", "--compare", "runs/nowhere")


def test_unreachable_model_fails_fast_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the hub is unreachable
    started = time.perf_counter()
    line = user_error(in_process(capsys, monkeypatch, "eval.py", "--model", "Qwen2.5-no-such-model", "--limit", "2"))
    assert time.perf_counter() - started < 10
    assert "hub id Qwen/Qwen2.5-no-such-model" in line and "127.0.0.1 cannot be reached" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = user_error(in_process(capsys, monkeypatch, "eval.py", "--model", "someorg/judge", "--run-name", "x"))
    assert "HF_HUB_OFFLINE is set" in line
    assert models.hub_unreachable("Qwen/Qwen2.5-no-such-model") is not None


def test_wandb_report_offline_says_what_it_would_build(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name, group in (("sft", "pipe-1"), ("agrl", "pipe-1"), ("other", "pipe-2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "args.json").write_text(
            json.dumps(dict(script=name if name != "other" else "grpo", run_name=name, wandb_group=group))
        )
    code, out, _ = in_process(
        capsys, monkeypatch, "scripts/wandb_report.py", "--group", "pipe-1", "--runs-dir", str(tmp_path)
    )
    assert code == 0
    assert out.startswith(
        "offline (WANDB_MODE=offline): the report is not built. It would be:\n"
        "report 'pipe-1' in project agrl: runs of wandb group pipe-1\n"
    )
    assert (
        "Training curves: line of reward_mean, accuracy" in out and "Confusion matrices: media of eval/confusion" in out
    )
    assert f"local runs of the group under {tmp_path}: 2" in out and "agrl (agrl.py)" in out and "other" not in out
    assert "wandb sync " in out
    # a group with no run (a typo): one line and exit 2, not a plan of nothing and exit 0
    line = user_error(
        in_process(capsys, monkeypatch, "scripts/wandb_report.py", "--group", "unknown", "--runs-dir", str(tmp_path))
    )
    assert line.startswith(f"error: no run under {tmp_path} belongs to wandb group 'unknown'")


def test_help_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    """`python agrl.py --help | head` : the reader closes the pipe before the help is written."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "agrl.py"), "--help"],
        cwd=tmp_path,
        env=CHILD_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before the interpreter has even imported the script
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err[-2000:]


def test_a_second_interrupt_aborts_with_one_line(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "grpo.py"), *TINY_GRPO, "--total-steps", "500", "--no-dynamic-sampling"],
        cwd=tmp_path,
        env=CHILD_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "runs" / "grpo-tiny-random-synthetic-s1" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130 and "Traceback" not in err, err[-2000:]
    assert "(a second Ctrl-C aborts at once)" in err
    # a long run says after its first step what the whole will take, and how to shorten it
    assert "[time] first step " in err and "the 499 steps left take about" in err and "--total-steps" in err
    assert err.strip().splitlines()[-1] == (
        "aborted: a second interrupt stops at once, without a checkpoint of this step"
    )


def test_a_copied_script_names_its_own_runs_and_records_its_code(tmp_path):
    """`cp agrl.py my_ablation.py`: its runs get their own default folder and wandb id, and args.json names
    the script file and the commit of the code. The copy is outside the repository, run by the venv's python
    as it is: `make install` put the repository on the venv's import path."""
    import shutil

    shutil.copy(ROOT / "agrl.py", tmp_path / "my_ablation.py")
    env = {k: v for k, v in CHILD_ENV.items() if k != "PYTHONPATH"}
    flags = [*TINY_GRPO, "--total-steps", "1", "--no-dynamic-sampling"]
    for script in (tmp_path / "my_ablation.py", ROOT / "agrl.py"):
        proc = subprocess.run(
            [sys.executable, str(script), *flags], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )
        assert "ModuleNotFoundError" not in proc.stderr, f"{sys.executable} cannot import the repository: make install"
        assert proc.returncode == 0, proc.stderr[-2000:]
    copy, original = (
        json.loads((tmp_path / "runs" / f"{name}-tiny-random-synthetic-s1" / "args.json").read_text())
        for name in ("my_ablation", "agrl")
    )
    assert copy["script"] == "my_ablation" and original["script"] == "agrl"
    assert copy["wandb_id"] != original["wandb_id"] and copy["wandb_id"].startswith("my_ablation-tiny-random")
    assert copy["code"] == dict(commit=None, dirty=None)  # a copy in a folder outside git
    assert len(original["code"]["commit"]) == 40 and isinstance(original["code"]["dirty"], bool)
    # the run folder shows the prompts the model saw, training and evaluation split
    folder = tmp_path / "runs" / "agrl-tiny-random-synthetic-s1"
    for split in ("train", "dev"):
        text = (folder / f"prompt-{split}.txt").read_text()
        assert text.startswith("<|im_start|>system") and "Query: " in text and text.endswith("assistant\n")


def test_dry_run_checks_what_is_cheap_and_exits_2_on_the_first_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dry = ["--model", "tiny-random", "--dry-run"]
    line = user_error(in_process(capsys, monkeypatch, "agrl.py", *dry, "--dataset", "csv"))
    assert line == "error: --dataset csv needs --data-path (docs/DATA.md)"
    line = user_error(in_process(capsys, monkeypatch, "agrl.py", *dry, "--dataset", "csv", "--data-path", "no.csv"))
    assert line == "error: --data-path no.csv does not exist"
    (tmp_path / "runs").mkdir()
    line = user_error(in_process(capsys, monkeypatch, "grpo.py", "--model", "runs/sft/checkpoint", "--dry-run"))
    assert line == "error: --model runs/sft/checkpoint does not exist"
    # a used run folder: refused as the real run would refuse it, and left as it was
    used = tmp_path / "runs" / "grpo-tiny-random-synthetic-s1"
    used.mkdir()
    (used / "args.json").write_text(json.dumps(dict(script="grpo")))
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    assert "holds a previous run" in user_error(in_process(capsys, monkeypatch, "grpo.py", *dry))
    assert "--overwrite deletes" in user_error(
        in_process(capsys, monkeypatch, "grpo.py", *dry, "--resume", "--overwrite")
    )
    code, out, _ = in_process(capsys, monkeypatch, "grpo.py", *dry, "--overwrite")
    assert code == 0 and "memory" in out.lower() and (used / "metrics.jsonl").exists()  # checked, nothing deleted


def test_time_estimate_reads_in_the_unit_that_fits():
    from helpers import runs

    assert runs.time_estimate(56.0, 299, "--total-steps").startswith(
        "[time] first step 56.0 s: the 299 steps left take about 4.7 h at this pace (--total-steps shorten it)"
    )
    assert "about 5 min" in runs.time_estimate(3.0, 100, "x") and "about 30 s" in runs.time_estimate(3.0, 10, "x")


RANK_1_FAILS = """
import sys
from dataclasses import dataclass

sys.path.insert(0, {repo!r})
import torch.distributed as dist

from helpers import cli, launch
from helpers.errors import UserError


@dataclass
class Args:
    num_gpus: int = 2


def main(args):
    launch.relaunch(args.num_gpus, "cpu")
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise UserError("rank 1 alone cannot read its data")
    dist.barrier()  # rank 0 waits here for rank 1 (gloo's timeout: 30 min)


cli.run(main, Args)
"""


def two_processes(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A `--num-gpus 2 --device cpu` run (torchrun, 2 gloo ranks) in its own session, killed whole on timeout."""
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=dict(CHILD_ENV, HF_HUB_OFFLINE="1"),  # the missing model is not looked for online
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.parametrize("case", ["every rank", "rank 1 alone"])
def test_a_user_error_in_a_two_process_run_is_one_line_and_exit_2(tmp_path, case):
    """Printed once, by the process that relaunched; no torchrun failure report; no rank left waiting."""
    if case == "every rank":  # the command: each rank fails to load the model
        command = [sys.executable, str(ROOT / "agrl.py"), "--num-gpus", "2", "--device", "cpu", "--model", "no/model"]
        expected = "error: Cannot load model 'no/model'"
    else:
        (tmp_path / "driver.py").write_text(RANK_1_FAILS.format(repo=str(ROOT)))
        command = [sys.executable, str(tmp_path / "driver.py")]
        expected = "error: rank 1 alone cannot read its data"
    proc = two_processes(command, tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "[launch] " in proc.stdout and "torch.distributed.run" in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-3000:]


SCRIPTS = ("sft", "dpo", "grpo", "agrl", "eval")
FLAG_LINE = re.compile(r"^  --(\[no-\])?([a-z0-9-]+)(?: (\S+))? = (\S+)")


def test_every_flag_of_every_script_is_in_exactly_one_help_group():
    from helpers import flags

    named = set()
    for script in SCRIPTS:
        args_class = importlib.import_module(script).Args
        groups = flags.help_groups(args_class)
        shown = [name for _, names in groups for name in names]
        assert sorted(shown) == sorted(f.name for f in dataclasses.fields(args_class)), script  # each once
        assert "other" not in dict(groups), (script, dict(groups).get("other"))
        named |= set(shown)
    listed = [name for names in flags.HELP_GROUPS.values() for name in names.split()]
    assert sorted(listed) == sorted(named), "HELP_GROUPS names a flag no script has, or one twice"


def test_help_is_grouped_by_concern_one_line_per_flag_with_defaults(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # a wide terminal: one line per flag
    code, out, err = in_process(capsys, monkeypatch, "agrl.py", "--help")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "usage: agrl.py [--flag VALUE ...]"
    titles = [line[:-1] for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert titles == [
        *("model", "data", "training", "generation", "dynamic sampling", "loss and reward"),
        *("RRS (rule-aware reward shaping)", "AGR (adaptive guided replay)", "evaluation"),
        *("logging and run folder", "scale-out"),
    ]
    agrl = importlib.import_module("agrl")
    flag_lines = [line for line in lines if line.startswith("  ")]
    names = [FLAG_LINE.match(line).group(2) for line in flag_lines]  # every indented line is one whole flag
    assert sorted(names) == sorted(f.name.replace("_", "-") for f in dataclasses.fields(agrl.Args))
    for shown in (
        "  --total-steps INT = 300 ",
        "  --lr FLOAT = 1e-06 ",
        "  --agr-guide {prefix,hint,target} = prefix  prefix: force the gold answer's first segment",
        "  --[no-]rrs = False ",
        "  --data-path STR|None = None ",
    ):
        assert any(line.startswith(shown) for line in flag_lines), shown
    assert len(lines) < 125  # was 223; 119 with the AGR flags of issue 30
    monkeypatch.setenv("COLUMNS", "80")  # a narrow one: descriptions wrap under themselves
    code, out, _ = in_process(capsys, monkeypatch, "agrl.py", "-h")
    assert code == 0 and max(map(len, out.splitlines())) <= 80

    # `python agrl.py --help | head -40`: the groups come first, and the cut-off end is quiet
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "agrl.py"), "--help"],
        cwd=tmp_path,
        env=dict(CHILD_ENV, COLUMNS="100"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    head = [proc.stdout.readline() for _ in range(40)]
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == "", err[-2000:]
    assert [line for line in head if line in ("model:\n", "data:\n", "training:\n")] == [
        "model:\n",
        "data:\n",
        "training:\n",
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_help_names_the_flags_and_defaults_that_tyro_parses(script):
    """Every flag as the help writes it, given its shown default, parses (tyro, unchanged) to the defaults."""
    from helpers import cli

    args_class = importlib.import_module(script).Args
    argv = []
    for line in cli.help_text(args_class).splitlines():
        if match := FLAG_LINE.match(line):
            negatable, name, kind, default = match.groups()
            if negatable:
                argv.append(f"--{name}" if default == "True" else f"--no-{name}")
            elif kind.endswith("..."):
                assert default == "()"  # eval.py's --compare: nothing given is its default
            else:
                argv += [f"--{name}", default]
    assert len(argv) > 20
    assert tyro.cli(args_class, args=argv) == args_class()
