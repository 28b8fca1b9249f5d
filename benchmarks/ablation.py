"""The AGRL ablation: GRPO, GRPO+RRS, GRPO+AGR, AGRL (prefix) and AGRL (hint) from one SFT start, equal
generation budget, several seeds.

    python benchmarks/ablation.py --config cpu-synthetic            # runs on a 2-core CPU (README: time)
    python benchmarks/ablation.py --config cpu-synthetic --sft-checkpoint runs/sft-start/checkpoint  # reuse a start
    python benchmarks/ablation.py --config gpu-esci --data-path /data/esci --sft-model Qwen/Qwen2.5-7B-Instruct

Every variant gets the same budget of generated completions (dynamic-sampling refills and AGR's
guided samples count against it), the same prompts stream per seed and the same SFT checkpoint.
Writes results/ablation-<config>/: results.md and results.json (final dev accuracy, macro-F1,
per-class F1, adherence, completions needed to reach a target training accuracy, share of stagnant
groups over time), curves.png (mean over seeds, min-max band) and label-shares.png (the predicted-label
shares of the policy's own samples over training: a collapse onto one label shows there). Finished runs
are reused and unfinished ones resume from their last checkpoint, so an interrupted ablation continues
where it stopped. The SFT start, seeds and budget are recorded in results.json.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.runs import code_version  # noqa: E402

VARIANTS = {  # name -> (script, flags): GRPO is grpo.py itself, the others are agrl.py with parts on/off
    "GRPO": ("grpo.py", []),
    "GRPO+RRS": ("agrl.py", ["--no-agr"]),
    "GRPO+AGR": ("agrl.py", ["--no-rrs"]),
    "AGRL (prefix)": ("agrl.py", ["--agr-guide", "prefix"]),
    "AGRL (hint)": ("agrl.py", ["--agr-guide", "hint"]),
}


def run_name_of(variant: str, seed: int) -> str:
    return (
        "".join(c for c in variant.lower().replace("+", "-").replace(" ", "-") if c.isalnum() or c == "-") + f"-s{seed}"
    )


CONFIGS = {
    # A 2-layer model trained from scratch by SFT on the synthetic rule world: small enough that 15 RL
    # runs finish on a 2-core CPU, and far from perfect after SFT, so RL has something to fix. The SFT
    # is results/sft-start/'s think_first run (criteria, reason, then the label: the order whose start
    # is not degenerate); 96 new tokens hold the longest target (82).
    "cpu-synthetic": dict(
        sft=[
            "--model",
            "tiny-random",
            "--dataset",
            "synthetic",
            "--order",
            "think_first",
            "--total-steps",
            "1000",
            "--batch-size",
            "16",
            "--grad-accum",
            "1",
            "--lr",
            "3e-3",
            "--warmup-steps",
            "10",
            "--label-weight",
            "5",
            "--balanced",
            "--eval-limit",
            "200",
            "--device",
            "cpu",
        ],
        rl=[
            "--dataset",
            "synthetic",
            "--prompts-per-step",
            "4",
            "--group-size",
            "8",
            "--max-new-tokens",
            "96",
            "--micro-batch-size",
            "8",
            "--lr",
            "2e-4",
            "--warmup-steps",
            "2",
            "--total-steps",
            "1000",
            "--prompt-sampling",
            "balanced",
            "--ds-max-tries",
            "1",
            "--eval-limit",
            "200",
            "--device",
            "cpu",
            "--save-every",
            "2",
        ],
        budget=4 * 8 * 20,
        seeds=(1, 2, 3),
        target=0.5,
    ),
    # ESCI on one GPU per run, from an SFT checkpoint of an instruct model (not run here: no GPU in this session).
    "gpu-esci": dict(
        sft=[
            "--dataset",
            "esci",
            "--total-steps",
            "400",
            "--batch-size",
            "16",
            "--grad-accum",
            "2",
            "--lr",
            "1e-5",
            "--eval-limit",
            "571",
        ],
        rl=[
            "--dataset",
            "esci",
            "--prompts-per-step",
            "32",
            "--group-size",
            "8",
            "--max-new-tokens",
            "192",
            "--micro-batch-size",
            "8",
            "--lr",
            "1e-6",
            "--total-steps",
            "100000",
            "--eval-limit",
            "571",
            "--save-every",
            "50",
        ],
        budget=32 * 8 * 200,
        seeds=(1, 2, 3),
        target=0.7,
    ),
}


@dataclass
class Args:
    config: str = "cpu-synthetic"
    """cpu-synthetic | gpu-esci"""
    sft_model: str = "tiny-random"
    """model the shared SFT start is trained from"""
    sft_checkpoint: str | None = None
    """use this SFT checkpoint (inside a run folder with eval.json and args.json) instead of training one"""
    data_path: str | None = None
    """dataset path (ESCI)"""
    seeds: tuple[int, ...] = ()
    """seeds (default: the config's)"""
    budget: int = 0
    """generated completions per run (default: the config's)"""
    variants: tuple[str, ...] = tuple(VARIANTS)
    """variants to run"""
    output_dir: str = "runs"
    """where the runs go"""
    results_dir: str = "results"
    """where the table and curves go"""
    jobs: int = 1
    """runs at a time (each then uses cores / jobs threads)"""
    table_only: bool = False
    """start nothing: tabulate the runs that have finished (a partial table says which are missing)"""


def run(command: list[str], log: Path, threads: int | None = None) -> None:
    print("$", " ".join(command), flush=True)
    started = time.time()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(log, "w") as f:
        code = subprocess.call(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise SystemExit(f"failed ({code}) after {time.time() - started:.0f}s; see {log}")
    print(f"  done in {time.time() - started:.0f}s", flush=True)


def read_metrics(run_dir: Path) -> list[dict]:
    """One line per step, the last written (an interrupted and resumed run may have logged a step twice)."""
    by_step = {m["step"]: m for m in map(json.loads, open(run_dir / "metrics.jsonl"))}
    return [by_step[step] for step in sorted(by_step)]


def smoothed(values: list[float], window: int = 5) -> list[float]:
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
        for i in range(len(values))
    ]


def resume_flag(run_dir: Path) -> list[str]:
    """An interrupted run is continued; a run folder is never reused without --resume."""
    return ["--resume"] if (run_dir / "args.json").exists() else []


def main(args: Args) -> None:
    config = CONFIGS[args.config]
    seeds, budget = args.seeds or config["seeds"], args.budget or config["budget"]
    base = Path(args.output_dir) / f"ablation-{args.config}"
    base.mkdir(parents=True, exist_ok=True)
    data = ["--data-path", args.data_path] if args.data_path else []

    # 1. the shared SFT start
    if args.sft_checkpoint or args.table_only:
        args.sft_checkpoint = args.sft_checkpoint or str(base / "sft" / "checkpoint")
        start, sft_dir = str(Path(args.sft_checkpoint).resolve()), Path(args.sft_checkpoint).resolve().parent
    else:
        sft_dir = base / "sft"
        if not (sft_dir / "eval.json").exists():
            run(
                [
                    sys.executable,
                    "sft.py",
                    *config["sft"],
                    *data,
                    "--model",
                    args.sft_model,
                    "--output-dir",
                    str(base),
                    "--run-name",
                    "sft",
                    *resume_flag(sft_dir),
                ],
                base / "sft.log",
            )
        start = str(sft_dir / "checkpoint")
    # RL answers in the output order the start was trained with
    sft_args = json.loads((sft_dir / "args.json").read_text()) if (sft_dir / "args.json").exists() else None
    order = ["--order", sft_args["order"]] if sft_args else []

    # 2. every variant and seed, from the same start, with the same budget of generated completions
    todo = []
    for seed in seeds if not args.table_only else ():
        for name in args.variants:
            script, flags = VARIANTS[name]
            run_name = run_name_of(name, seed)
            if not (base / run_name / "eval.json").exists():
                todo.append(
                    (
                        [
                            sys.executable,
                            script,
                            *config["rl"],
                            *data,
                            *order,
                            *flags,
                            "--model",
                            start,
                            "--seed",
                            str(seed),
                            "--generation-budget",
                            str(budget),
                            "--output-dir",
                            str(base),
                            "--run-name",
                            run_name,
                            *resume_flag(base / run_name),
                        ],
                        base / f"{run_name}.log",
                    )
                )
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: run(*job, threads=threads), todo))

    # 3. the table and the curves
    sft_eval = json.loads((sft_dir / "eval.json").read_text())
    labels = list(sft_eval["per_class"])
    results = {
        "config": args.config,
        "budget_completions": budget,
        "seeds": list(seeds),
        "target_accuracy": config["target"],
        "rl_flags": config["rl"],
        "variant_flags": {name: VARIANTS[name] for name in args.variants},
        "sft": {k: sft_eval[k] for k in ("accuracy", "macro_f1", "adherence_rate", "format_rate")},
        "sft_f1": {label: sft_eval["per_class"][label]["f1"] for label in labels},
        "sft_checkpoint": start,
        "sft_args": sft_args,
        "variants": {},
    }
    curves, missing = {}, []
    for name in args.variants:
        runs = []
        for seed in seeds:
            run_dir = base / run_name_of(name, seed)
            if not (run_dir / "eval.json").exists():
                missing.append(run_dir.name)
                continue
            evaluation = json.loads((run_dir / "eval.json").read_text())
            metrics = read_metrics(run_dir)
            accuracy = smoothed([m["accuracy"] for m in metrics])
            reached = next(
                (m["completions_generated"] for m, a in zip(metrics, accuracy) if a >= config["target"]), None
            )
            runs.append(
                dict(
                    seed=seed,
                    accuracy=evaluation["accuracy"],
                    macro_f1=evaluation["macro_f1"],
                    adherence=evaluation["adherence_rate"],
                    format_rate=evaluation["format_rate"],
                    f1={label: evaluation["per_class"][label]["f1"] for label in labels},
                    completions_to_target=reached,
                    stagnant_share_first_quarter=_mean(
                        [m["low_accuracy_groups"] for m in metrics[: max(1, len(metrics) // 4)]]
                    ),
                    stagnant_share_last_quarter=_mean(
                        [m["low_accuracy_groups"] for m in metrics[-max(1, len(metrics) // 4) :]]
                    ),
                )
            )
            curves.setdefault(name, []).append(metrics)
        if not runs:
            continue
        results["variants"][name] = dict(
            runs=runs,
            **{
                key: _mean_std([r[key] for r in runs])
                for key in (
                    "accuracy",
                    "macro_f1",
                    "adherence",
                    "format_rate",
                    "stagnant_share_first_quarter",
                    "stagnant_share_last_quarter",
                )
            },
            f1={label: _mean_std([r["f1"][label] for r in runs]) for label in labels},
            reached_target=sum(r["completions_to_target"] is not None for r in runs),
            completions_to_target=_mean(
                [r["completions_to_target"] for r in runs if r["completions_to_target"] is not None]
            ),
        )
    results["missing_runs"] = missing
    # which code produced it: each run's own record (args.json, written when it started) and the table's
    results["code"] = code_version()
    results["runs_code"] = {
        run_dir.name: json.loads((run_dir / "args.json").read_text()).get("code")
        for run_dir in (base / run_name_of(name, seed) for name in args.variants for seed in seeds)
        if (run_dir / "args.json").exists()
    }
    out = Path(args.results_dir) / f"ablation-{args.config}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results, labels)
    (out / "results.md").write_text(table)
    plot(curves, out / "curves.png", config["target"])
    plot_label_shares(curves, labels, out / "label-shares.png")
    print(table)
    print(f"wrote {out}/results.md, results.json, curves.png")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _mean_std(xs):
    """Mean and sample standard deviation (n - 1): the spread of seeds, not of this one set of them."""
    xs = [x for x in xs if x is not None]
    m = _mean(xs)
    return dict(mean=m, std=(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else None)


def markdown(results: dict, labels: list[str]) -> str:
    fmt = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
    lines = [
        f"Ablation `{results['config']}`: {len(results['seeds'])} seeds, {results['budget_completions']} generated "
        f"completions per run. Mean ± sample std over seeds of the dev evaluation at the end; stagnant = groups with "
        f"accuracy <= 0.25; target = smoothed training accuracy {results['target_accuracy']}.",
        "",
        f"SFT start: accuracy {results['sft']['accuracy']:.3f}, macro-F1 {results['sft']['macro_f1']:.3f}, "
        f"adherence {results['sft']['adherence_rate']:.3f}, format {results['sft']['format_rate']:.3f}; per-class F1 "
        + ", ".join(f"{label} {f1:.3f}" for label, f1 in results["sft_f1"].items())
        + f" (`{results['sft_checkpoint']}`)",
        "",
        *(
            [f"**Partial table**: not finished yet: {', '.join(results['missing_runs'])}.", ""]
            if results.get("missing_runs")
            else []
        ),
        "| variant | seeds | accuracy | macro-F1 | "
        + " | ".join(f"F1 {label}" for label in labels)
        + " | adherence | format | runs reaching target | completions to target | stagnant (first quarter) | stagnant (last quarter) |",
        "|---" * (10 + len(labels)) + "|",
    ]
    for name, v in results["variants"].items():
        to_target = f"{v['completions_to_target']:.0f}" if v["completions_to_target"] is not None else "-"
        lines.append(
            f"| {name} | {len(v['runs'])} | {fmt(v['accuracy'])} | {fmt(v['macro_f1'])} | "
            + " | ".join(fmt(v["f1"][label]) for label in labels)
            + f" | {fmt(v['adherence'])} | {fmt(v['format_rate'])} | {v['reached_target']}/{len(v['runs'])} | {to_target} | "
            f"{fmt(v['stagnant_share_first_quarter'])} | {fmt(v['stagnant_share_last_quarter'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[list[dict]]], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("accuracy", "training accuracy (own samples, smoothed)"),
        ("adherence_rate", "rule adherence (own samples)"),
        ("low_accuracy_groups", "share of stagnant groups (acc <= 0.25)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.2))
    for ax, (key, title) in zip(axes, panels):
        for name, runs in curves.items():
            n = min(len(r) for r in runs)
            xs = [runs[0][i]["completions_generated"] for i in range(n)]
            ys = [smoothed([m[key] for m in r])[:n] for r in runs]
            mean = [sum(col) / len(col) for col in zip(*ys)]
            ax.plot(xs, mean, label=name)
            ax.fill_between(xs, [min(col) for col in zip(*ys)], [max(col) for col in zip(*ys)], alpha=0.15)
        if key == "accuracy":
            ax.axhline(target, color="gray", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("completions generated")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_label_shares(curves: dict[str, list[list[dict]]], labels: list[str], path: Path) -> None:
    """One panel per variant: the mean (over seeds) share of each predicted label among the policy's own samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.4), sharey=True, squeeze=False)
    for ax, (name, runs) in zip(axes[0], curves.items()):
        n = min(len(r) for r in runs)
        xs = [runs[0][i]["completions_generated"] for i in range(n)]
        for label in [*labels, "invalid"]:
            key = f"label_share_{label}"
            if not all(key in m for r in runs for m in r[:n]):
                continue
            ys = [smoothed([m[key] for m in r])[:n] for r in runs]
            ax.plot(xs, [sum(col) / len(col) for col in zip(*ys)], label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("completions generated")
    axes[0][0].set_ylabel("share of predicted labels (own samples)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main(tyro.cli(Args))
