"""Fault injection: kill -9 and resume, broken checkpoints, SIGTERM / SIGINT, NaN losses and gradients,
bad data files, arbitrary model outputs, and safe loading.

Every training run is `tiny-random` on CPU. Killed runs are real processes, started from the command
line and killed with SIGKILL at seeded random points: in the middle of writing the first checkpoint
(nothing to resume from: the run starts over), a random delay after a random number of steps, in the
middle of the final checkpoint, in the middle of a later checkpoint (sft). `--resume` then finishes
the run in-process, and it must end with the same metrics lines (timing keys aside, every step once),
samples, evaluation and final weights as an uninterrupted run, with no half-written folder left.

A random model answers nothing correctly, so its rewards are all 0 and GRPO would never move: the GRPO
processes run grpo.main through a small driver (`GRPO_DRIVER`, the same command-line arguments) that
swaps in test_grpo's deterministic reward of the completion text, the one the in-process runs use.
sft.py runs as itself.

The parser and rewards are fuzzed on more than 10,000 generated strings in tests/test_rewards.py
(`test_fuzz_volume`); here the fuzzing is of token sequences, decoded by the real tokenizer.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from test_grpo import assert_same_weights, fake_score_group, untimed  # noqa: E402
from test_grpo import state_dict as weights  # noqa: E402

import agrl  # noqa: E402
import data as D  # noqa: E402
import eval as E  # noqa: E402
import grpo  # noqa: E402
import rewards as R  # noqa: E402
import sft  # noqa: E402
from helpers import checkpoints, models  # noqa: E402

LABEL_MAP = "3=Excellent,2=Related,1=Mismatch,0=Irrelevant"

GRPO_DRIVER = """
import sys

sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import tyro

import grpo
from test_grpo import fake_score_group

grpo.score_group = fake_score_group
grpo.main(tyro.cli(grpo.Args))
"""

# 4 steps, a checkpoint after each, the last 2 kept; sampling at temperature 1 (per-prompt seeds matter)
GRPO = dict(
    model="tiny-random",
    dataset="synthetic",
    limit=8,
    total_steps=4,
    prompts_per_step=2,
    group_size=4,
    max_new_tokens=12,
    micro_batch_size=4,
    device="cpu",
    eval_limit=2,
    temperature=1.0,
    warmup_steps=1,
    lr=1e-3,
    seed=1,
    save_every=1,
    keep_last=2,
    dynamic_sampling=False,
)
SFT = dict(
    model="tiny-random",
    dataset="synthetic",
    limit=8,
    total_steps=4,
    batch_size=2,
    grad_accum=1,
    lr=1e-2,
    warmup_steps=1,
    log_every=1,
    save_every=1,
    keep_last=2,
    eval_limit=2,
    max_new_tokens=12,
    device="cpu",
    seed=1,
)


# ==================================================================================================
# Helpers: in-process runs, launched runs, comparisons
# ==================================================================================================
@contextlib.contextmanager
def own_signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def no_eval(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(E, "run_eval", lambda *a, **k: E.classification_metrics([], [], R.TAOBAO4.labels))
    mp.setattr(E, "metrics_table", lambda *a, **k: "")


def run_grpo(out: Path, name: str, evaluate: bool = True, **overrides):
    with pytest.MonkeyPatch.context() as mp, own_signal_handlers():
        mp.setattr(grpo, "score_group", fake_score_group)
        if not evaluate:
            no_eval(mp)
        return grpo.main(grpo.Args(**{**GRPO, **overrides, "output_dir": str(out), "run_name": name}))


def run_sft(out: Path, name: str, evaluate: bool = True, **overrides):
    with pytest.MonkeyPatch.context() as mp, own_signal_handlers():
        if not evaluate:
            no_eval(mp)
        return sft.main(sft.Args(**{**SFT, **overrides, "output_dir": str(out), "run_name": name}))


def cli_flags(args: dict) -> list[str]:
    out = []
    for key, value in args.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            out.append(f"--{flag}" if value else f"--no-{flag}")
        elif value is not None:
            out += [f"--{flag}", str(value)]
    return out


def grpo_command(tmp_path: Path, out: Path, name: str) -> list[str]:
    driver = tmp_path / "grpo_driver.py"
    driver.write_text(GRPO_DRIVER.format(repo=str(REPO), tests=str(Path(__file__).parent)))
    return [sys.executable, str(driver), *cli_flags({**GRPO, "output_dir": str(out), "run_name": name})]


def sft_command(out: Path, name: str) -> list[str]:
    return [sys.executable, str(REPO / "sft.py"), *cli_flags({**SFT, "output_dir": str(out), "run_name": name})]


CHILD_ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "AGRL_LAUNCHED")}
CHILD_ENV.update(
    OMP_NUM_THREADS="1",
    MKL_NUM_THREADS="1",
    TOKENIZERS_PARALLELISM="false",
    PYTHONUNBUFFERED="1",
    TQDM_DISABLE="1",
    WANDB_MODE="disabled",
)


@contextlib.contextmanager
def launched(command: list[str], cwd: Path, log: Path):
    """A training process in its own process group; whatever happens, the group is gone afterwards."""
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            command, cwd=cwd, env=CHILD_ENV, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def wait_until(proc, condition, what: str, log: Path, timeout: float = 180.0) -> bool:
    """Poll every 2 ms; False if the process ended first (a crash fails the test)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            assert proc.returncode == 0, f"the run crashed (rc {proc.returncode}):\n{log.read_text()[-3000:]}"
            return False
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.002)
    return True


def lines_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def snapshot(run_dir: Path) -> str:
    """What a kill left behind, for messages."""
    folders = sorted(p.name for p in (run_dir / "checkpoints").iterdir()) if (run_dir / "checkpoints").exists() else []
    finals = [name for name in ("checkpoint", "checkpoint.tmp") if (run_dir / name).exists()]
    return f"metrics lines {lines_logged(run_dir)}, checkpoints {folders}, final {finals}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def assert_same_run(reference: Path, run_dir: Path, context: str = "", check_eval: bool = True) -> None:
    """The resumed run's metrics (every step once), samples, evaluation and final weights equal the reference's."""
    ref, got = read_jsonl(reference / "metrics.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    steps = [m["step"] for m in got]
    assert steps == [m["step"] for m in ref], f"steps logged {steps} ({context})"
    for a, b in zip(ref, got):
        diff = {k: (a.get(k), b.get(k)) for k in untimed(a).keys() | untimed(b).keys() if a.get(k) != b.get(k)}
        assert not diff, f"step {a['step']} differs from the uninterrupted run: {diff} ({context})"
    assert read_jsonl(run_dir / "samples.jsonl") == read_jsonl(reference / "samples.jsonl"), context
    if check_eval:
        assert untimed(json.loads((run_dir / "eval.json").read_text())) == untimed(
            json.loads((reference / "eval.json").read_text())
        ), context
    assert (run_dir / "checkpoint" / "model.safetensors").exists(), f"no final checkpoint/ ({context})"
    assert_same_weights(weights(reference / "checkpoint"), weights(run_dir / "checkpoint"), atol=1e-6)
    leftovers = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not re.fullmatch(r"step-\d{7}", p.name))
    assert not leftovers and not (run_dir / "checkpoint.tmp").exists(), f"left behind: {leftovers} ({context})"


@pytest.fixture(scope="module")
def grpo_reference(tmp_path_factory) -> Path:
    """The uninterrupted 4-step GRPO run (in-process; the launched runs must match it exactly)."""
    out = tmp_path_factory.mktemp("grpo_reference")
    run_grpo(out, "ref")
    run_dir = out / "ref"
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert any(m["grad_norm"] > 0 for m in read_jsonl(run_dir / "metrics.jsonl"))  # the weights do move
    return run_dir


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft_reference")
    run_sft(out, "ref")
    assert [m["step"] for m in read_jsonl(out / "ref" / "metrics.jsonl")] == [1, 2, 3, 4]
    return out / "ref"


# ==================================================================================================
# 1. kill -9 at random points, then --resume: the same run as an uninterrupted one
# ==================================================================================================
def kill_at(proc, run_dir: Path, log: Path, point: str, rng: random.Random) -> str:
    """Wait for the kill point, SIGKILL the process group; returns what the kill interrupted."""
    checkpoints = run_dir / "checkpoints"
    if point == "after_steps":  # a random number of finished steps, then a random delay (anywhere in a step)
        k, delay = rng.randint(1, 3), rng.uniform(0.0, 1.0)
        reached = wait_until(proc, lambda: lines_logged(run_dir) >= k, f"{k} metric lines", log)
        time.sleep(delay)
        what = f"{delay:.2f} s after step {k} was logged"
    elif point in ("checkpoint_write", "first_checkpoint"):  # inside save_checkpoint: step-N.tmp half written
        k, delay = (1 if point == "first_checkpoint" else rng.randint(2, 3)), rng.uniform(0.0, 0.03)
        reached = wait_until(proc, lambda: (checkpoints / f"step-{k:07d}.tmp").exists(), f"step-{k}.tmp", log)
        time.sleep(delay)
        what = f"{delay * 1000:.0f} ms into writing checkpoint {k}"
    elif point == "final_checkpoint":  # the last step's checkpoint and the final checkpoint/ folder
        delay = rng.uniform(0.0, 0.01)
        reached = wait_until(
            proc,
            lambda: (run_dir / "checkpoint.tmp").exists() or (checkpoints / "step-0000004").exists(),
            "the final checkpoint",
            log,
        )
        time.sleep(delay)
        what = f"{delay * 1000:.0f} ms into writing the final checkpoint"
    else:
        raise ValueError(point)
    if reached and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    state = snapshot(run_dir)
    what = (
        f"killed {what}: {state}"
        if proc.returncode == -signal.SIGKILL
        else f"finished before the kill ({what}): {state}"
    )
    print(f"[{point}] {what}")
    return what


@pytest.mark.parametrize("seed,point", [(0, "first_checkpoint"), (1, "after_steps"), (2, "final_checkpoint")])
def test_grpo_kill9_then_resume_equals_uninterrupted(grpo_reference, tmp_path, seed, point):
    rng = random.Random(seed)
    log = tmp_path / "log.txt"
    with launched(grpo_command(tmp_path, tmp_path, "run"), tmp_path, log) as proc:
        what = kill_at(proc, tmp_path / "run", log, point, rng)
    run_grpo(tmp_path, "run", resume=True)
    assert_same_run(grpo_reference, tmp_path / "run", what)


def test_sft_kill9_then_resume_equals_uninterrupted(sft_reference, tmp_path):
    rng = random.Random(3)
    log = tmp_path / "log.txt"
    with launched(sft_command(tmp_path, "run"), tmp_path, log) as proc:
        what = kill_at(proc, tmp_path / "run", log, "checkpoint_write", rng)
    run_sft(tmp_path, "run", resume=True)
    assert_same_run(sft_reference, tmp_path / "run", what)


# ==================================================================================================
# 2. Broken checkpoints: reported by name, the previous one used
# ==================================================================================================
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncate_train_state_keep_manifest_consistent(folder: Path) -> None:
    """Only loading can tell: the manifest is made to agree with the truncated file."""
    _truncate(folder / "train_state.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["train_state.pt"] = (folder / "train_state.pt").stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))


DAMAGE = {
    "truncated_weights": (lambda f: _truncate(f / "model.safetensors"), "model.safetensors has"),
    "truncated_train_state": (_truncate_train_state_keep_manifest_consistent, "train_state.pt unreadable"),
    "missing_file": (lambda f: (f / "config.json").unlink(), "config.json missing"),
    "step_mismatch": (
        lambda f: f.rename(f.with_name("step-0000009")),
        "manifest step 4 does not match folder step-0000009",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_broken_newest_checkpoint_is_reported_and_the_previous_one_used(
    grpo_reference, tmp_path, capsys, monkeypatch, damage
):
    run_dir = tmp_path / "run"
    shutil.copytree(grpo_reference, run_dir)
    for name in ("checkpoint", "eval.json"):  # what the resumed run must write again
        shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    newest = run_dir / "checkpoints" / "step-0000004"
    apply, problem = DAMAGE[damage]
    apply(newest)
    shown = newest.with_name("step-0000009") if damage == "step_mismatch" else newest

    loads = []
    real_load = torch.load

    def checked_load(*args, **kwargs):  # resuming loads train_state.pt with weights_only=True only
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    capsys.readouterr()
    run_grpo(tmp_path, "run", evaluate=False, resume=True)
    captured = capsys.readouterr()
    assert f"skipping broken checkpoint {shown}" in captured.err and problem in captured.err, captured.err[-2000:]
    assert f"[resume] from {run_dir / 'checkpoints' / 'step-0000003'} at step 3" in captured.out
    assert loads and all(w is True for w in loads)
    assert_same_run(grpo_reference, run_dir, damage, check_eval=False)


def test_every_checkpoint_broken_restarts_from_scratch_without_duplicate_steps(grpo_reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(grpo_reference, run_dir)
    shutil.rmtree(run_dir / "checkpoint")
    for folder in (run_dir / "checkpoints").iterdir():
        _truncate(folder / "model.safetensors")
    capsys.readouterr()
    run_grpo(tmp_path, "run", evaluate=False, resume=True)
    err = capsys.readouterr().err
    assert "step-0000003" in err and "step-0000004" in err
    assert_same_run(grpo_reference, run_dir, "all broken", check_eval=False)


# ==================================================================================================
# 3. SIGTERM / SIGINT: checkpoint at the end of the step, a resume hint, a clean exit
# ==================================================================================================
def test_grpo_sigterm_checkpoints_exits_cleanly_and_resumes_exactly(grpo_reference, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    delay = random.Random(4).uniform(0.0, 0.5)
    with launched(grpo_command(tmp_path, tmp_path, "run"), tmp_path, log) as proc:
        assert wait_until(proc, lambda: lines_logged(run_dir) >= 1, "step 1", log), "finished before SIGTERM"
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    output = log.read_text()
    assert rc == 0, f"rc {rc}:\n{output[-3000:]}"
    assert "[signal 15] checkpointing after this step" in output
    stopped = re.search(r"stopped at step (\d+); continue with --resume", output)
    assert stopped, output[-3000:]
    step = int(stopped.group(1))
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, step + 1))
    folder, state = checkpoints.latest_checkpoint(run_dir)
    assert folder.name == f"step-{step:07d}" and state["step"] == step  # the step it was in when signalled
    assert not (run_dir / "eval.json").exists()
    run_grpo(tmp_path, "run", resume=True)
    assert_same_run(grpo_reference, run_dir, f"SIGTERM {delay:.2f} s after step 1, stopped at {step}")


def test_sft_sigint_checkpoints_exits_cleanly_and_resumes_exactly(sft_reference, tmp_path, monkeypatch, capsys):
    calls = []
    real = models.token_logprobs

    def interrupting(*args, **kwargs):  # Ctrl-C during step 2's forward pass
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(models, "token_logprobs", interrupting)
        assert run_sft(tmp_path, "run") == {}
    captured = capsys.readouterr()
    assert "[signal 2] checkpointing after this step" in captured.err
    assert "stopped at step 2; continue with --resume" in captured.out
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    run_sft(tmp_path, "run", resume=True)
    assert_same_run(sft_reference, tmp_path / "run", "SIGINT in step 2")


# ==================================================================================================
# 4. NaN / inf losses and gradients: the update is skipped, counted, and too many in a row stop the run
# ==================================================================================================
class InfGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def faulty_loss(monkeypatch, faults: dict[int, str]) -> list:
    """grpo_loss with a fault on the given (1-based) calls: 'nan' loss or 'inf' gradient (2 calls a step here)."""
    calls = []
    real = grpo.grpo_loss

    def loss_fn(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.append(1)
        fault = faults.get(len(calls), faults.get("all"))
        if fault == "nan":
            loss = loss * float("nan")
        elif fault == "inf":
            loss = InfGradient.apply(loss)
        return loss, stats

    monkeypatch.setattr(grpo, "grpo_loss", loss_fn)
    return calls


def test_grpo_nan_loss_and_inf_gradient_skip_the_update_and_are_counted(tmp_path, monkeypatch):
    calls = faulty_loss(monkeypatch, {3: "nan", 8: "inf"})  # step 2: NaN loss; step 4: finite loss, inf gradient
    run_grpo(tmp_path, "nan", evaluate=False, keep_last=4, max_nan_skips=2)
    assert len(calls) == 8
    metrics = {m["step"]: m for m in read_jsonl(tmp_path / "nan" / "metrics.jsonl")}
    assert {s: m["nan_skipped"] for s, m in metrics.items()} == {1: 0, 2: 1, 3: 0, 4: 1}
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics.values())
    folders = [tmp_path / "nan" / "checkpoints" / f"step-{s:07d}" for s in (1, 2, 3, 4)]
    w = [weights(f) for f in folders]
    assert_same_weights(w[0], w[1], atol=0)  # step 2 skipped: not a single weight moved
    assert_same_weights(w[2], w[3], atol=0)  # step 4 skipped
    assert any(not torch.equal(w[1][k], w[2][k]) for k in w[1])  # step 3 after the NaN step trained normally
    assert all(torch.isfinite(t).all() for t in w[3].values())
    adam_steps = [
        torch.load(f / "train_state.pt", weights_only=True)["optimizer"]["state"][0]["step"].item() for f in folders
    ]
    assert adam_steps == [1, 1, 2, 2]  # the optimizer never saw the skipped updates
    assert (tmp_path / "nan" / "checkpoint" / "model.safetensors").exists()  # the run finished


def test_grpo_consecutive_nans_stop_the_run_with_a_clear_message(tmp_path, monkeypatch):
    faulty_loss(monkeypatch, {"all": "nan"})
    with pytest.raises(
        RuntimeError, match=r"2 consecutive updates with a non-finite loss or gradient: stopping at step 2"
    ):
        run_grpo(tmp_path, "nans", evaluate=False, max_nan_skips=2)
    metrics = read_jsonl(tmp_path / "nans" / "metrics.jsonl")
    assert [(m["step"], m["nan_skipped"]) for m in metrics] == [(1, 1)]
    assert not (tmp_path / "nans" / "checkpoint").exists()


# ==================================================================================================
# 5. Bad data files through the scripts
# ==================================================================================================
def _row(query="red cotton shirt", title="Red cotton shirt", label=3, **extra) -> bytes:
    return json.dumps(dict(query=query, title=title, label=label, **extra)).encode() + b"\n"


GOOD = [
    _row(),
    _row("blue wool scarf", "Blue wool scarf, soft", 2, description="A warm scarf."),
    _row("leather boots", "Brown leather boots", 1, brand="Acme"),
    _row("phone case", "Garden hose, 20 m", 0),
    _row("running shoes", "Running shoes, mesh", 3, description=""),
]
HUGE = _row("desk lamp", "LED desk lamp", 2, description="bright adjustable lamp " * 4_500)  # ~100k chars
# kind -> (the bad line, field, words of the reason)
BAD = {
    "malformed_line": (b'{"query": "red shirt", "title": "Red shirt", "label": 3\n', "(row)", "malformed JSON"),
    "missing_field": (json.dumps(dict(query="red shirt", label=3)).encode() + b"\n", "title", "missing required field"),
    "unknown_label": (_row(label=7), "label", "unknown label"),
    "empty_text": (_row(title="   "), "title", "empty"),
    "invalid_utf8": (b'{"query": "caf\xe9 chair", "title": "Caf\xe9 chair", "label": 2}\n', "query", "not valid UTF-8"),
}


@pytest.mark.parametrize("script", ["sft", "grpo"])
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_row_stops_with_file_row_and_field(tmp_path, kind, script):
    line, field, reason = BAD[kind]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"".join(GOOD[:2]) + HUGE + line + GOOD[2])
    args = dict(
        dataset="jsonl", data_path=str(path), label_map=LABEL_MAP, limit=None, output_dir=str(tmp_path), run_name=script
    )
    with own_signal_handlers(), pytest.raises(D.DataError) as info:
        if script == "sft":
            sft.main(sft.Args(**{**SFT, **args}))
        else:
            grpo.main(grpo.Args(**{**GRPO, **args}))
    error = info.value
    assert (error.file, error.row, error.field) == ("train.jsonl", 4, field)
    assert reason in error.reason
    assert f"train.jsonl row 4 field '{field}'" in str(error)


def test_whole_file_in_a_wrong_encoding_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes("".join(r.decode() for r in GOOD).encode("utf-16"))
    with own_signal_handlers(), pytest.raises(D.DataError, match=r"train.jsonl row 1 field '\(row\)'"):
        sft.main(
            sft.Args(
                **{
                    **SFT,
                    "dataset": "jsonl",
                    "data_path": str(path),
                    "label_map": LABEL_MAP,
                    "limit": None,
                    "output_dir": str(tmp_path),
                    "run_name": "utf16",
                }
            )
        )


@pytest.fixture(scope="module")
def messy_file(tmp_path_factory) -> tuple[Path, dict[int, str]]:
    """Good rows, the huge description and every bad kind; returns the file and {row: field} of the bad rows."""
    path = tmp_path_factory.mktemp("messy") / "train.jsonl"
    lines, bad = [], {}
    for i, (kind, (line, field, _)) in enumerate(BAD.items()):
        lines += [GOOD[i % len(GOOD)], line]
        bad[len(lines)] = field
    lines += [HUGE, b"\n", GOOD[-1]]  # a blank line is not a row
    path.write_bytes(b"".join(lines))
    return path, bad


@pytest.mark.parametrize("script", ["sft", "grpo"])
def test_skip_bad_rows_trains_and_reports_every_skipped_row(tmp_path, messy_file, script):
    path, bad = messy_file
    args = dict(
        dataset="jsonl",
        data_path=str(path),
        label_map=LABEL_MAP,
        skip_bad_rows=True,
        limit=None,
        total_steps=1,
        max_item_tokens=64,
    )
    (run_sft if script == "sft" else run_grpo)(tmp_path, script, **args)
    run_dir = tmp_path / script
    stats = json.loads((run_dir / "data_stats.json").read_text())
    rows = 2 * len(BAD) + 2
    # one file: split by query, the dev query's rows are left to the evaluation (rows_other_split)
    assert stats["rows_read"] == rows == stats["rows_used"] + stats["rows_skipped"] + stats["rows_other_split"]
    assert stats["rows_skipped"] == len(BAD) and stats["rows_used"] + stats["rows_other_split"] == len(BAD) + 2
    assert {(s["file"], s["row"], s["field"]) for s in stats["skipped"]} == {
        ("train.jsonl", r, f) for r, f in bad.items()
    }
    assert all(s["reason"] for s in stats["skipped"])
    assert (run_dir / "checkpoint" / "model.safetensors").exists()
    # the end-of-run evaluation read the same file the same way, and only its dev query ("desk lamp", the
    # 100k-character description: cut and counted, not an error)
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["data"]["rows_skipped"] == len(BAD) and evaluation["prompts_truncated"] == 1
    assert {r["query"] for r in map(json.loads, (run_dir / "eval_samples.jsonl").read_text().splitlines())} == {
        "desk lamp"
    }
    assert len(json.loads((run_dir / "eval_data_stats.json").read_text())["skipped"]) == len(BAD)


@pytest.mark.parametrize("field", ["query", "context"])
def test_huge_query_or_context_is_truncated_or_rejected(tmp_path, tokenizer, field):
    path = tmp_path / "train.jsonl"
    huge = {"query": "red shirt", "title": "Red shirt", "label": 3, field: "cotton red shirt " * 6_000}
    path.write_bytes(GOOD[0] + json.dumps(huge).encode() + b"\n")
    try:
        dataset = D.load_dataset("jsonl", "all", path=str(path), label_map=LABEL_MAP)
    except D.DataError as e:  # rejecting it, naming the field, is fine too
        assert (e.row, e.field) == (2, field)
        return
    prompt, truncated = D.encode_prompt(tokenizer, dataset.examples[1], dataset.rulebook, max_item_tokens=256)
    assert truncated and len(prompt) < 2048


# ==================================================================================================
# 6. Model outputs: any token sequence decodes and scores without an exception
# ==================================================================================================
@pytest.fixture(scope="module")
def token_pools(tokenizer):
    """Ids whose lone decoding is a partial UTF-8 sequence, special ids, and a well-formed answer's ids."""
    multibyte = tokenizer.encode("😀🎉 中文字符 €ü ñ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🇩🇪 ☃", add_special_tokens=False)
    partial = sorted({i for i in multibyte if "\ufffd" in tokenizer.decode([i])})
    assert partial, "no partial-UTF-8 tokens found"
    example = D.generate_synthetic("dev", 0, 5)[0]
    answer = R.format_output(example.label, example.criteria, "the item states it", R.TAOBAO4)
    valid = tokenizer.encode(answer, add_special_tokens=False)
    return dict(partial=partial, special=sorted(tokenizer.all_special_ids), valid=valid, example=example)


def score_everything(tokenizer, ids: list[int], example: D.Example) -> None:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert isinstance(text, str)
    esci_criteria = R.infer_esci_criteria("Exact", example.query, example.brand)
    for rulebook, gold, criteria in ((R.TAOBAO4, example.label, example.criteria), (R.ESCI, "Exact", esci_criteria)):
        for order in ("label_first", "think_first"):
            for ordinal in (False, True):
                score = R.score_output(text, gold, criteria, rulebook, order, ordinal)
                assert math.isfinite(R.grpo_reward(score)) and math.isfinite(R.rrs_reward(score))
                assert all(v in (None, 0.0, 1.0) for v in agrl.criterion_credit(score).values())
    # segment credit decodes every prefix: run it on a completion of agrl's length scale
    head = ids[:160]
    spans = R.score_output(
        tokenizer.decode(head, skip_special_tokens=True), example.label, example.criteria, R.TAOBAO4
    ).parsed.spans
    indices = agrl.criterion_token_indices(tokenizer, head, spans)
    assert indices.keys() == spans.keys()
    assert all(k == sorted(set(k)) and all(0 <= i < len(head) for i in k) for k in indices.values())


@st.composite
def token_sequences(draw, pools, vocab_size):
    any_id = st.integers(0, vocab_size - 1)
    pick = st.one_of(any_id, st.sampled_from(pools["partial"]), st.sampled_from(pools["special"]))
    ids = list(pools["valid"]) if draw(st.booleans()) else draw(st.lists(pick, max_size=40))
    for _ in range(draw(st.integers(0, 6))):  # edits: insert, delete or replace at random places
        position = draw(st.integers(0, len(ids)))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        if edit == "insert" or not ids:
            ids[position:position] = draw(st.lists(pick, min_size=1, max_size=4))
        elif edit == "delete":
            del ids[min(position, len(ids) - 1)]
        else:
            ids[min(position, len(ids) - 1)] = draw(pick)
    return ids * draw(st.sampled_from([1, 1, 1, 2, 50, 2_000]))  # up to enormous outputs


def test_any_token_sequence_scores_without_an_exception(tokenizer, token_pools):
    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(token_sequences(token_pools, len(tokenizer)))
    def check(ids):
        score_everything(tokenizer, ids, token_pools["example"])

    check()


def test_edge_token_sequences(tokenizer, token_pools):
    example = token_pools["example"]
    for ids in (
        [],
        token_pools["special"],
        token_pools["partial"],
        token_pools["partial"][:1] * 10_000,
        token_pools["valid"] + token_pools["partial"][:1],
        token_pools["partial"][:1] + token_pools["valid"],
        list(range(len(tokenizer) - 2_000, len(tokenizer))),
    ):
        score_everything(tokenizer, ids, example)
    # the well-formed answer: parsed, and every criterion line mapped to its tokens
    spans = R.score_output(
        tokenizer.decode(token_pools["valid"]), example.label, example.criteria, R.TAOBAO4
    ).parsed.spans
    indices = agrl.criterion_token_indices(tokenizer, token_pools["valid"], spans)
    assert set(indices) == set(R.TAOBAO4.criterion_names) and all(indices.values())


# ==================================================================================================
# 7. Safe loading: no remote code unless asked for, torch.load with weights_only=True only
# ==================================================================================================
SKIP_DIRS = {".git", ".venv", "venv", "runs", "__pycache__", ".hypothesis", ".pytest_cache", "wandb", "node_modules"}


def repo_python_files() -> list[Path]:
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        found += [Path(root) / f for f in files if f.endswith(".py")]
    return sorted(found)


def test_no_remote_code_and_weights_only_torch_load():
    files = repo_python_files()
    assert {"eval.py", "grpo.py", "sft.py", "agrl.py", "dpo.py", "data.py"} <= {f.name for f in files}
    problems, torch_loads = [], 0
    for path in files:
        source = path.read_text()
        where = path.relative_to(REPO)
        if re.search(r"trust_remote_code\s*=\s*True", source):
            problems.append(f"{where}: trust_remote_code set to True")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            if (
                "trust_remote_code" in keywords
                and isinstance(keywords["trust_remote_code"], ast.Constant)
                and keywords["trust_remote_code"].value is not False
            ):
                problems.append(f"{where}:{node.lineno}: trust_remote_code={keywords['trust_remote_code'].value!r}")
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "load"
                and isinstance(func.value, ast.Name)
                and func.value.id == "torch"
            ):
                torch_loads += 1
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
    assert torch_loads >= 1  # the resume path's load was seen
    assert not problems, "\n".join(problems)


def test_load_model_does_not_trust_remote_code_by_default(grpo_reference, monkeypatch):
    import transformers

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained

        def recording(*args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    models.load_model(str(grpo_reference / "checkpoint"), "cpu")
    assert seen == [False, False]


def test_resume_before_the_first_checkpoint_says_it_starts_again(tmp_path, capsys):
    """A run killed before its first checkpoint: --resume starts again from step 1 and says so."""
    import eval as E
    from helpers import checkpoints, runs

    first = runs.Run(E.Args(output_dir=str(tmp_path), run_name="r"), "eval")
    first.log(dict(loss=1.0), step=1)
    again = runs.Run(E.Args(output_dir=str(tmp_path), run_name="r", resume=True), "eval")
    assert checkpoints.resume_point(again) == (None, None)
    assert (
        f"[resume] {tmp_path / 'r'} has no checkpoint yet (stopped before the first one): starting again from step 1"
        in (capsys.readouterr().out)
    )
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == ""  # its logged steps will be logged again
