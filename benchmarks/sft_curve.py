"""SFT start curve: greedy dev macro-F1 (and accuracy, per-class F1, format, predicted-label shares)
at several step counts along one SFT run, to pick a start for RL that is not degenerate.

    python benchmarks/sft_curve.py --name smollm2-label-first --steps 40 80 120 --eval-limit 64 \\
        --sft-flags="--model smollm2-135m --lr 2e-4 --batch-size 8 --grad-accum 1"
    python benchmarks/sft_curve.py --name tiny-lw5 --steps 100 200 300 \\
        --sft-flags="--model tiny-random --batch-size 16 --grad-accum 1 --lr 3e-3 --label-weight 5"

Runs sft.py (a plain subprocess: the numbers are those of the real script) with --total-steps at the
largest step count and a checkpoint at each asked step, and evaluates every checkpoint as it appears
with eval.py's run_eval on the same seeded dev sample (eval.py's default seed) while training goes on.
The last point is sft.py's own closing evaluation (the same call on the same sample). Resumable: a
rerun continues the SFT run (--resume) and skips evaluated checkpoints. Writes, after every point,
results/sft-start/<name>.json, .md and .png; the runs stay in runs/sft-curve-<name>/.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import eval as E  # noqa: E402
from helpers import checkpoints, runs  # noqa: E402


@dataclass
class Args:
    name: str
    """name of the curve: runs/sft-curve-<name>/ and results/sft-start/<name>.*"""
    steps: tuple[int, ...] = (40, 80, 120)
    """SFT step counts evaluated (the run trains to the largest; 0 scores the untrained model)"""
    sft_flags: str = ""
    """flags for sft.py, given with "=": --sft-flags="--model tiny-random --label-weight 5 --balanced" """
    order: str = "label_first"
    """output order (passed to sft.py and the evaluation)"""
    eval_limit: int = 64
    """dev examples evaluated at each point (a seeded sample, the same at every point)"""
    max_new_tokens: int = 128
    """generation budget per answer in the evaluation"""
    device: str = "cpu"
    """auto | cpu | cuda"""
    output_dir: str = "runs"
    """where the SFT run goes"""
    results_dir: str = "results/sft-start"
    """where the table and curve go"""
    poll_seconds: float = 10.0
    """how often to look for a new checkpoint"""


def main(args: Args) -> None:
    steps = sorted(set(args.steps))
    last = steps[-1]
    every = math.gcd(*[s for s in steps if s > 0])  # a checkpoint at every asked step, none deleted before it is scored
    run_name = f"sft-curve-{args.name}"
    run_dir = ROOT / args.output_dir / run_name
    command = [
        sys.executable,
        "sft.py",
        "--dataset",
        "synthetic",
        *shlex.split(args.sft_flags),
        "--order",
        args.order,
        "--total-steps",
        str(last),
        "--save-every",
        str(every),
        "--keep-last",
        str(last // every),
        "--eval-limit",
        str(args.eval_limit),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--device",
        args.device,
        "--output-dir",
        str(ROOT / args.output_dir),
        "--run-name",
        run_name,
    ]
    if (run_dir / "args.json").exists():  # rerunning the same command continues the run
        command.append("--resume")
    out = ROOT / args.results_dir
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / f"{args.name}.json"
    result = dict(
        name=args.name,
        sft_command=command,
        curve_command=sys.argv,
        eval_limit=args.eval_limit,
        max_new_tokens=args.max_new_tokens,
        order=args.order,
        points=[],
    )

    process = None
    if not (run_dir / "eval.json").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        print("$", " ".join(command), flush=True)
        log = open(run_dir.parent / f"{run_name}.log", "a")
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    for step in steps:
        folder = run_dir / "checkpoints" / f"step-{step:07d}"
        eval_dir = run_dir / "curve" / f"step-{step}"
        if step == last:  # sft.py's closing evaluation scores this checkpoint on the same sample
            if process is not None and process.wait() != 0:
                raise SystemExit(f"sft.py failed ({process.returncode}); see {run_dir.parent / f'{run_name}.log'}")
            evaluation = json.loads((run_dir / "eval.json").read_text())
        elif (eval_dir / "eval.json").exists():
            evaluation = json.loads((eval_dir / "eval.json").read_text())
        else:
            model = args_model(args) if step == 0 else str(folder)
            while step > 0 and checkpoints.validate_checkpoint(folder) is not None:
                if process is None or process.poll() is not None:
                    raise SystemExit(
                        f"{folder} missing and sft.py is not running; see {run_dir.parent / f'{run_name}.log'}"
                    )
                time.sleep(args.poll_seconds)
            eval_args = E.Args(
                model=model,
                dataset="synthetic",
                split="dev",
                limit=args.eval_limit,
                order=args.order,
                max_new_tokens=args.max_new_tokens,
                device=args.device,
                output_dir=str(eval_dir.parent),
                run_name=eval_dir.name,
            )
            evaluation = E.run_eval(eval_args)
        result["points"].append(point(step, evaluation, run_dir))
        runs.write_json(result_path, result)
        write_table(result, out / f"{args.name}.md")
        plot(result, out / f"{args.name}.png")
        p = result["points"][-1]
        print(
            f"step {step}: macro-F1 {p['macro_f1']:.3f} accuracy {p['accuracy']:.3f} F1 {p['f1']} shares {p['predicted_share']}",
            flush=True,
        )
    print(f"wrote {result_path} and .md, .png")


def args_model(args: Args) -> str:
    """The --model in the SFT flags (sft.py's default if none), for the step-0 point."""
    flags = shlex.split(args.sft_flags)
    return flags[flags.index("--model") + 1] if "--model" in flags else "smollm2-135m"


def point(step: int, evaluation: dict, run_dir: Path) -> dict:
    """One curve point: the dev metrics, the predicted-label shares, and the training loss logged at that step."""
    labels = evaluation["confusion_labels"]  # the rulebook's labels, then "(invalid)"
    n = evaluation["n"]
    predicted = [sum(row[j] for row in evaluation["confusion"]) for j in range(len(labels))]
    logged = {}
    if (run_dir / "metrics.jsonl").exists():
        lines = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        logged = max((m for m in lines if m["step"] <= step and "loss" in m), key=lambda m: m["step"], default={})
    f1 = {label: round(m["f1"], 4) for label, m in evaluation["per_class"].items()}
    return dict(
        step=step,
        n=n,
        macro_f1=evaluation["macro_f1"],
        accuracy=evaluation["accuracy"],
        f1=f1,
        classes_with_f1=sum(v > 0 for v in f1.values()),
        format_rate=evaluation["format_rate"],
        adherence_rate=evaluation["adherence_rate"],
        predicted_share={label: round(c / n, 4) for label, c in zip(labels, predicted)},
        gold_share={label: round(m["support"] / n, 4) for label, m in evaluation["per_class"].items()},
        balanced_macro_f1=evaluation["balanced"]["macro_f1"],
        train_loss=logged.get("loss"),
        train_label_loss=logged.get("label_loss"),
    )


def write_table(result: dict, path: Path) -> None:
    labels = list(result["points"][0]["f1"])
    shares = list(result["points"][0]["predicted_share"])
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [
        f"SFT curve `{result['name']}` ({result['order']}): greedy dev evaluation on {result['points'][0]['n']} "
        f"seeded examples, {result['max_new_tokens']} new tokens.",
        "",
        "    " + " ".join(shlex.quote(c) for c in result["sft_command"]),
        "",
        "| step | macro-F1 | accuracy | "
        + " | ".join(f"F1 {label}" for label in labels)
        + " | classes F1>0 | format | adherence | "
        + " | ".join(f"pred {label}" for label in shares)
        + " | train loss | label loss |",
        "|" + "---|" * (8 + len(labels) + len(shares)),
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['step']} | {fmt(p['macro_f1'])} | {fmt(p['accuracy'])} | "
            + " | ".join(fmt(p["f1"][k]) for k in labels)
            + f" | {p['classes_with_f1']} | {fmt(p['format_rate'])} | {fmt(p['adherence_rate'])} | "
            + " | ".join(fmt(p["predicted_share"][k]) for k in shares)
            + f" | {fmt(p['train_loss'])} | {fmt(p['train_label_loss'])} |"
        )
    lines += [
        "",
        "Gold shares of the sample: " + ", ".join(f"{k} {v:.3f}" for k, v in result["points"][0]["gold_share"].items()),
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    steps = [p["step"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps, [p["macro_f1"] for p in points], "k-o", linewidth=2, label="macro-F1")
    left.plot(steps, [p["accuracy"] for p in points], "k--", label="accuracy")
    left.plot(steps, [p["format_rate"] for p in points], ":", color="grey", label="format")
    for i, label in enumerate(points[0]["f1"]):
        left.plot(steps, [p["f1"][label] for p in points], "-.", color=f"C{i}", label=f"F1 {label}")
    left.set_ylim(-0.02, 1.02)
    left.set_xlabel("SFT step")
    left.legend(fontsize=7)
    left.set_title(f"{result['name']}: dev (n={points[0]['n']})", fontsize=9)
    for i, label in enumerate(points[0]["predicted_share"]):
        right.plot(
            steps,
            [p["predicted_share"][label] for p in points],
            "-o",
            color=f"C{i}" if label in points[0]["f1"] else "grey",
            label=label,
        )
    right.set_ylim(-0.02, 1.02)
    right.set_xlabel("SFT step")
    right.set_title("predicted-label shares", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main(tyro.cli(Args))
