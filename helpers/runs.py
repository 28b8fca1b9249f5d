"""Run folders: `<output_dir>/<run_name>/` with args.json, metrics.jsonl, samples.jsonl and curves.png, mirrored to wandb.

A folder belongs to one run (`prepare_run_dir`): a used one is refused unless --resume (continue it, with
only the flags marked `may_change_on_resume` changed) or --overwrite (delete it first).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

from helpers import flags
from helpers.errors import UserError


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


RUN_OUTPUTS = ("metrics.jsonl", "samples.jsonl", "eval.json", "checkpoints", "checkpoint", "pairs.jsonl")
OPEN_RUNS: list[Run] = []  # closed by `cli.run` however a script ends, so that every run gets its curves.png


def _jsonable(args) -> dict:
    return json.loads(json.dumps(asdict(args), default=str))


def time_estimate(step_seconds: float, steps_left: int, shorter: str) -> str:
    """After a run's first step: how long the rest will take at that pace, and the flags that shorten it."""
    left = step_seconds * steps_left
    when = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.0f} min" if left >= 60 else f"{left:.0f} s"
    return f"[time] first step {step_seconds:.1f} s: the {steps_left} steps left take about {when} at this pace ({shorter} shorten it)"


def write_prompt(folder: Path, split: str, text: str) -> None:
    """The first prompt of a split exactly as the model sees it (`prompt-<split>.txt`): what your columns became."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"prompt-{split}.txt").write_text(text)


def code_version() -> dict:
    """The commit of the code that runs (the git repository holding the script) and whether it had local
    changes; None for both outside git."""
    where = str(Path(sys.argv[0]).resolve().parent)

    def git(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", where, *command], capture_output=True, text=True, timeout=30)

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = git("rev-parse", "HEAD")
        if head.returncode == 0:
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            return dict(commit=head.stdout.strip(), dirty=bool(dirty))
    return dict(commit=None, dirty=None)


def numerics() -> dict:
    """What besides the code and the flags decides a CPU run's floating-point results: torch's version and its
    intra-op thread count (a 2-thread and a 1-thread SFT of the same commit part at step 10; results/README.md)."""
    import torch

    return dict(torch=torch.__version__, threads=torch.get_num_threads())


IDENTITY = ("script", "code", "numerics", "wandb_id", "resumes")  # what args.json records besides the flags


def prepare_run_dir(run_dir: Path, args: flags.CommonFlags, script: str, dry_run: bool = False) -> dict:
    """Make sure a new run never mixes with an old one; returns what args.json should record.

    A folder that holds a previous run is refused unless `--resume` (continue it: same script, and only
    flags marked `flags.may_change_on_resume` may differ) or `--overwrite` (delete it, then start clean).
    dry_run: the same checks, nothing deleted or said.
    """
    # the wandb id is unique per run (a copied script's run of the same name never merges into this one)
    wandb_id = f"{args.run_name.replace('/', '-')}-{uuid.uuid4().hex[:8]}"
    record = dict(script=script, code=code_version(), numerics=numerics(), wandb_id=wandb_id, **_jsonable(args))
    old_args = run_dir / "args.json"
    # a run that stopped before its first metric line (a bad flag, data file or model name) left nothing to mix with
    used = any((run_dir / name).exists() for name in RUN_OUTPUTS)
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in the folder and --overwrite deletes it: give one of them")
    if args.resume:
        if not old_args.exists():
            what = "does not exist" if not run_dir.exists() else "holds no run (no args.json)"
            raise UserError(
                f"--resume: {run_dir} {what}: check --output-dir and --run-name, or leave out --resume "
                f"to start a new run"
            )
        old = json.loads(old_args.read_text())
        if old.get("script") != script:
            raise UserError(f"--resume: {run_dir} holds a run of {old.get('script')}.py, not of {script}.py")
        record["wandb_id"] = old.get("wandb_id", wandb_id)  # the same wandb run continues
        changed = {k: (old[k], v) for k, v in record.items() if k in old and k not in IDENTITY and old[k] != v}
        may_change = flags.changeable_on_resume(args)
        refused = {k: pair for k, pair in changed.items() if k not in may_change}
        if refused:
            raise UserError(
                f"--resume {run_dir}: these arguments differ from the run's and change what it computes: "
                + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
                + "; resume with the run's values, or start a new run (--run-name, or --overwrite)"
            )
        record["resumes"] = old.get("resumes", [])
        accepted = {k: pair for k, pair in changed.items() if k not in ("resume", "overwrite")}
        if accepted and not dry_run:
            print(
                f"[resume] {run_dir}: accepted changes (recorded in args.json): "
                + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in accepted.items())
            )
            record["resumes"].append({k: list(pair) for k, pair in accepted.items()})
        if old.get("code") != record["code"]:  # resumed on other code: recorded, not refused
            record["resumes"].append({"code": [old.get("code"), record["code"]]})
        return record
    if run_dir.exists() and any(run_dir.iterdir()) and not old_args.exists():
        raise UserError(
            f"{run_dir} is not empty and not a run folder (no args.json): choose another --run-name or --output-dir"
        )
    if used:
        if not args.overwrite:
            raise UserError(
                f"{run_dir} holds a previous run ({describe_run(run_dir)}): add --resume to continue it, "
                f"--overwrite to delete it and start clean, or choose another --run-name"
            )
        if not dry_run:
            shutil.rmtree(run_dir)
            print(f"[overwrite] deleted the previous run in {run_dir}")
    elif old_args.exists() and not dry_run:  # the leftover of a run that stopped before it logged anything
        shutil.rmtree(run_dir)
    return record


def describe_run(run_dir: Path) -> str:
    """'grpo.py, 3 metric lines, checkpoints up to step 3' for messages."""
    parts = []
    with contextlib.suppress(Exception):
        parts.append(f"{json.loads((run_dir / 'args.json').read_text())['script']}.py")
    if (run_dir / "metrics.jsonl").exists():
        parts.append(f"{len((run_dir / 'metrics.jsonl').read_text().splitlines())} metric lines")
    steps = sorted((run_dir / "checkpoints").glob("step-???????"))
    if steps:
        parts.append(f"checkpoints up to step {int(steps[-1].name[5:])}")
    if (run_dir / "eval.json").exists():
        parts.append("eval.json")
    return ", ".join(parts) or ", ".join(sorted(p.name for p in run_dir.iterdir())[:5])


class Run:
    """A run folder `<output_dir>/<run_name>/` with args.json and metrics.jsonl, mirrored to wandb.

    The folder belongs to one run (prepare_run_dir); `finish` draws curves.png from metrics.jsonl.
    """

    def __init__(self, args: flags.CommonFlags, script: str):
        self.dir = Path(args.output_dir) / args.run_name
        self.main = is_main_process()
        self.wandb = None
        self.finished = False
        if not self.main:
            return
        record = prepare_run_dir(self.dir, args, script)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "args.json", record)
        OPEN_RUNS.append(self)
        if args.track:
            import wandb

            logged_in = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has("api.wandb.ai")
            os.environ.setdefault("WANDB_MODE", "online" if logged_in else "offline")
            self.wandb = wandb.init(
                project=args.wandb_project,
                group=args.wandb_group,
                name=args.run_name,
                id=record["wandb_id"],
                resume="allow",
                config=asdict(args),
                dir=str(self.dir),
                job_type=script,
            )

    def rewind(self, step: int) -> None:
        """On resume: drop the lines logged after the checkpoint's step, so no step appears twice."""
        if not self.main:
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = self.dir / name
            if path.exists():
                kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(kept))
                os.replace(tmp, path)

    def log(self, metrics: dict, step: int) -> None:
        if not self.main:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(step=step, **metrics), default=float) + "\n")
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        """Sample completions with their rewards: a JSONL file and a wandb Table."""
        if not self.main or not rows:
            return
        with open(self.dir / "samples.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(dict(step=step, **row)) + "\n")
        if self.wandb:
            import wandb

            columns = list(rows[0])
            self.wandb.log(
                {"samples": wandb.Table(columns=columns, data=[[str(r[c]) for c in columns] for r in rows])}, step=step
            )

    def finish(self, summary: dict | None = None) -> None:
        """At the end, or when the run stops early: curves.png, then the wandb summary. Once."""
        if not self.main or self.finished:
            return
        self.finished = True
        if self in OPEN_RUNS:
            OPEN_RUNS.remove(self)
        plot_curves(self.dir)
        if self.wandb:
            if summary:
                self.wandb.summary.update(flatten(summary))
            self.wandb.finish()


# What curves.png shows, one panel each, from the metric lines that have them.
CURVE_PANELS = {
    "reward": ("reward_mean",),
    "accuracy": ("accuracy",),
    "format / adherence": ("format_rate", "adherence_rate"),
    "loss": ("loss", "label_loss"),
    "KL": ("approx_kl", "ref_kl"),
    "entropy": ("entropy",),
    "groups kept / dropped": ("groups_kept", "groups_dropped"),
    "DPO rewards": ("reward_chosen", "reward_rejected", "reward_margin"),
    "DPO pair accuracy": ("reward_accuracy",),
    "grad norm": ("grad_norm",),
    "predicted label entropy": ("label_entropy",),
    "AGR: stagnant / guided / rescued": ("agr_stagnant_share", "agr_guided_share", "agr_rescued_share"),
    "AGR: guided answers kept": ("agr_guided_success_rate",),
    "all-fail groups": ("all_fail_groups",),
}


def curve_panels(lines: list[dict]) -> dict[str, tuple[str, ...]]:
    """The panels of curves.png that these metric lines fill: title -> the keys drawn in it."""
    shares = list(dict.fromkeys(k for m in lines for k in m if k.startswith("label_share_")))  # rulebook order
    panels = {title: keys for title, keys in CURVE_PANELS.items() if any(k in m for m in lines for k in keys)}
    if shares:
        panels["predicted label shares"] = tuple(shares)
    return panels


def plot_curves(run_dir: Path) -> Path | None:
    """curves.png: every training metric of CURVE_PANELS over steps, and the predicted label shares."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    lines = [m for m in lines if m.get("step", 0) > 0]
    panels = curve_panels(lines)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels.items()):
        for key in keys:
            points = [(m["step"], m[key]) for m in lines if isinstance(m.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key.removeprefix("label_share_"))
        ax.set_title(title, fontsize=10, pad=12)  # room for an axis offset label ("1e-3") above the plot
        ax.set_xlabel("step", fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)  # no offset text over the title (the entropy panel's)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(Path(run_dir).name, fontsize=11)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _netrc_has(host: str) -> bool:
    import netrc

    with contextlib.suppress(Exception):
        return netrc.netrc().authenticators(host) is not None
    return False


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[f"{prefix}{k}"] = v
    return out


def write_json(path: Path, obj) -> None:
    """Atomic: written beside the target, then renamed over it."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
