"""GRPO (or AGRL) learning curve from an SFT checkpoint of the embedded model on the synthetic data.

    make demo                                             # leaves an SFT checkpoint in runs/demo/sft/checkpoint
    python benchmarks/grpo_curve.py --sft runs/demo/sft/checkpoint --steps 20
    python benchmarks/grpo_curve.py --sft runs/demo/sft/checkpoint --steps 20 --script agrl.py --seed 2
    python benchmarks/grpo_curve.py --sft smollm2-135m --script agrl.py --extra='--agr-guide target'  # a base policy

Scores the start with eval.py, runs the training script (a plain subprocess: the numbers are those of
the real script), and writes results/<script>-curve-<name>.png (reward, accuracy, format and adherence
per step) and .json (every step's metrics; the dev eval before and after on the same seeded sample; the
budget: steps, completions, rollout tokens, wall time, and the device). Resumable: run the same command
again after an interruption and the training run continues from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    sft: str = "runs/demo/sft/checkpoint"
    """SFT checkpoint to start from"""
    script: str = "grpo.py"
    """training script: grpo.py, or agrl.py for the same curve with RRS and AGR"""
    name: str = "smollm2-synthetic-cpu"
    """name of the result files"""
    steps: int = 20
    """GRPO steps"""
    prompts_per_step: int = 4
    """prompts per step"""
    group_size: int = 8
    """completions per prompt"""
    max_new_tokens: int = 96
    """generation budget per completion"""
    lr: float = 2e-5
    """learning rate"""
    eval_limit: int = 100
    """dev examples evaluated at the end"""
    device: str = "auto"
    """auto | cpu | cuda"""
    seed: int = 1
    """seed of the training run (data order, sampling)"""
    dataset: str = "synthetic"
    """dataset of training and the dev evaluation"""
    data_path: str | None = None
    """dataset path (ESCI)"""
    save_every: int = 2
    """steps between checkpoints (an interrupted curve resumes from the last one)"""
    extra: str = ""
    """more flags for the training script, e.g. --extra='--beta 0.01 --limit 16'"""


def start_order(checkpoint: str) -> list[str]:
    """The output order the SFT start was trained with (its run's args.json): RL and every evaluation use it."""
    args_file = Path(checkpoint).resolve().parent / "args.json"
    return ["--order", json.loads(args_file.read_text())["order"]] if args_file.exists() else []


def main(args: Args) -> None:
    run_name = f"{Path(args.script).stem}-curve-{args.name}"
    data = [
        "--dataset",
        args.dataset,
        *(["--data-path", args.data_path] if args.data_path else []),
        *start_order(args.sft),
    ]
    # The start, scored on the same seeded dev sample and generation budget as grpo.py's closing eval;
    # once per distinct evaluation (the curves of several scripts and seeds from one start share it).
    start_command = [
        sys.executable,
        "eval.py",
        "--model",
        args.sft,
        *data,
        "--split",
        "dev",
        "--limit",
        str(args.eval_limit),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--device",
        args.device,
    ]
    start_name = "curve-start-" + hashlib.sha1(" ".join(start_command[1:]).encode()).hexdigest()[:10]
    start_dir = ROOT / "runs" / start_name
    start_command += ["--run-name", start_name, *(["--overwrite"] if start_dir.exists() else [])]
    if not (start_dir / "eval.json").exists():
        print("$", " ".join(start_command), flush=True)
        subprocess.run(start_command, cwd=ROOT, check=True)
    start_eval = json.loads((start_dir / "eval.json").read_text())
    run_dir = ROOT / "runs" / run_name
    again = ["--resume"] if (run_dir / "checkpoints").exists() else ["--overwrite"] if run_dir.exists() else []
    command = [
        sys.executable,
        args.script,
        "--model",
        args.sft,
        *data,
        "--total-steps",
        str(args.steps),
        "--prompts-per-step",
        str(args.prompts_per_step),
        "--group-size",
        str(args.group_size),
        "--micro-batch-size",
        str(args.group_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--lr",
        str(args.lr),
        "--warmup-steps",
        "2",
        "--eval-limit",
        str(args.eval_limit),
        "--device",
        args.device,
        "--run-name",
        run_name,
        "--save-every",
        str(args.save_every),
        "--seed",
        str(args.seed),
        *shlex.split(args.extra),
    ]
    started = time.time()
    stopped = None
    if not (run_dir / "eval.json").exists():
        print("$", " ".join(command + again), flush=True)
        code = subprocess.run(command + again, cwd=ROOT).returncode
        if (
            code == 1 and (run_dir / "metrics.jsonl").exists()
        ):  # the run stopped itself (e.g. steps that trained nothing)
            stopped = f"the run stopped itself with exit code 1 after {len(open(run_dir / 'metrics.jsonl').readlines())} steps"
        elif code != 0:
            raise SystemExit(f"{args.script} failed with exit code {code}")
    wall = time.time() - started  # of this invocation (a resumed curve: its last part); the steps' own times sum below
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    evaluation = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else None
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    budget = dict(
        steps=len(metrics),
        completions=metrics[-1]["completions_generated"],
        # every rollout of every step, dynamic sampling's refills included (agrl.py's guided samples are not)
        rollout_tokens=round(sum(m["generated_tokens_per_second"] * m["time_generation"] for m in metrics)),
        wall_seconds=wall,
        train_seconds=sum(m["step_seconds"] for m in metrics),
        mean_step_seconds=sum(m["step_seconds"] for m in metrics) / len(metrics),
        device=args.device,
        machine=platform.processor() or platform.machine(),
    )
    (out / f"{run_name}.json").write_text(
        json.dumps(
            dict(
                command=command,
                budget=budget,
                dev_eval_start={
                    k: start_eval[k] for k in ("accuracy", "macro_f1", "format_rate", "adherence_rate", "n")
                },
                dev_eval={k: evaluation[k] for k in ("accuracy", "macro_f1", "format_rate", "adherence_rate", "n")}
                if evaluation
                else None,
                stopped=stopped,
                seed=args.seed,
                start=args.sft,
                steps=[
                    {
                        k: m.get(k)
                        for k in (
                            "step",
                            "reward_mean",
                            "accuracy",
                            "macro_f1",
                            "format_rate",
                            "adherence_rate",
                            "label_entropy",
                            "groups_kept",
                            "completions_generated",
                            "update_scale",
                            "step_seconds",
                            "time_generation",
                            "time_training",
                            "completion_len_mean",
                        )
                    }
                    | {k: v for k, v in m.items() if k.startswith(("agr_", "label_share_"))}
                    for m in metrics
                ],
            ),
            indent=2,
        )
    )

    result = json.loads((out / f"{run_name}.json").read_text())
    plot(
        result,
        f"{Path(args.script).stem} from {Path(args.sft).name} ({args.prompts_per_step}x{args.group_size} per step, "
        f"seed {args.seed})",
        out / f"{run_name}.png",
    )
    print(json.dumps(budget, indent=2))
    print(f"wrote results/{run_name}.png and .json")


def plot(result: dict, title: str, path: Path, window: int = 4) -> None:
    """Per-step points (faint) and their running mean over `window` steps; dev accuracy before -> after in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in result["steps"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, color in (
        ("reward_mean", "C0"),
        ("accuracy", "C1"),
        ("format_rate", "C2"),
        ("adherence_rate", "C3"),
        ("macro_f1", "C4"),
    ):
        if any(m.get(key) is None for m in result["steps"]):
            continue
        values = [m[key] for m in result["steps"]]
        recent = [values[max(0, i - window + 1) : i + 1] for i in range(len(values))]
        smooth = [sum(r) / len(r) for r in recent]
        ax.plot(steps, values, color=color, alpha=0.3, marker=".", linewidth=0.8)
        ax.plot(steps, smooth, color=color, label=f"{key} (mean of {window})")
    ax.set_xlabel("step")
    ax.set_ylim(
        0, max(1.02, max(m["reward_mean"] for m in result["steps"]) + 0.05)
    )  # agrl.py's shaped reward can pass 1
    start, end = result["dev_eval_start"], result["dev_eval"]
    if end is None:
        ax.set_title(
            f"{title}\ndev (n={start['n']}) start: accuracy {start['accuracy']:.3f}, format "
            f"{start['format_rate']:.2f}; {result['stopped']}",
            fontsize=9,
        )
    else:
        ax.set_title(
            f"{title}\ndev (n={end['n']}) accuracy {start['accuracy']:.3f} -> {end['accuracy']:.3f}, macro-F1 "
            f"{start['macro_f1']:.3f} -> {end['macro_f1']:.3f}, format {start['format_rate']:.2f} -> "
            f"{end['format_rate']:.2f}",
            fontsize=9,
        )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main(tyro.cli(Args))
