"""GRPO learning curve from an SFT checkpoint of the embedded model on the synthetic data.

    make demo                                             # leaves an SFT checkpoint in runs/demo/sft/checkpoint
    python benchmarks/grpo_curve.py --sft runs/demo/sft/checkpoint --steps 20

Runs grpo.py (a plain subprocess: the numbers are those of the real script) and writes
results/grpo-curve-<name>.png (reward and accuracy per step, smoothed) and .json (every step's
metrics, the budget: steps, completions, tokens, wall time, and the device).
"""

from __future__ import annotations

import json
import platform
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
    extra: tuple[str, ...] = ()
    """more grpo.py flags, e.g. --extra --beta 0.01"""


def main(args: Args) -> None:
    run_name = f"grpo-curve-{args.name}"
    command = [sys.executable, "grpo.py", "--model", args.sft, "--dataset", "synthetic", "--total-steps", str(args.steps),
               "--prompts-per-step", str(args.prompts_per_step), "--group-size", str(args.group_size),
               "--micro-batch-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens),
               "--lr", str(args.lr), "--warmup-steps", "2", "--eval-limit", str(args.eval_limit), "--device", args.device,
               "--run-name", run_name, "--save-every", "1000", *args.extra]
    print("$", " ".join(command), flush=True)
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    wall = time.time() - started
    run_dir = ROOT / "runs" / run_name
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    evaluation = json.loads((run_dir / "eval.json").read_text())
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    budget = dict(steps=len(metrics), completions=metrics[-1]["completions_generated"],
                  generated_tokens=sum(m["completion_len_mean"] * args.prompts_per_step * args.group_size for m in metrics),
                  wall_seconds=wall, mean_step_seconds=sum(m["step_seconds"] for m in metrics) / len(metrics),
                  device=args.device, machine=platform.processor() or platform.machine())
    (out / f"grpo-curve-{args.name}.json").write_text(json.dumps(dict(
        command=command, budget=budget, dev_eval={k: evaluation[k] for k in ("accuracy", "macro_f1", "format_rate", "adherence_rate", "n")},
        steps=[{k: m[k] for k in ("step", "reward_mean", "accuracy", "format_rate", "adherence_rate", "step_seconds",
                                   "time_generation", "time_training", "completion_len_mean")} for m in metrics]), indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [m["step"] for m in metrics]
    for key in ("reward_mean", "accuracy", "format_rate", "adherence_rate"):
        ax.plot(steps, [m[key] for m in metrics], label=key, marker=".")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"GRPO from SFT ({args.prompts_per_step}x{args.group_size} per step); dev acc {evaluation['accuracy']:.3f}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"grpo-curve-{args.name}.png", dpi=100)
    print(json.dumps(budget, indent=2))
    print(f"wrote results/grpo-curve-{args.name}.png and .json")


if __name__ == "__main__":
    main(tyro.cli(Args))
