"""Evaluate a relevance judge: accuracy, macro-F1, per-class F1, rule adherence and format rate.

    python eval.py --model smollm2-135m --dataset synthetic --split dev
    python eval.py --model runs/sft/checkpoint --dataset esci --data-path data/esci --split dev --label-only
    python eval.py --compare runs/sft runs/grpo runs/agrl

In the order of the file: the label-only serving path (one forward pass reads the label distribution),
metrics (natural and class-balanced), `evaluate` (greedy generation, or the label-only path), the
comparison of finished runs, and the `eval.py` command, whose `final_eval` closes every training script.
The plumbing (models, rollouts, runs, checkpoints, launch) is in helpers/.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data as D
import rewards as R
from helpers import cli, flags, launch, models, rollouts, runs
from helpers.errors import UserError


# ==================================================================================================
# Label-only serving path: one forward pass, the distribution over label tokens, tiering
# ==================================================================================================
def label_token_ids(tokenizer, rulebook: R.Rulebook) -> tuple[list[int], list[int]]:
    """The shared token prefix of "<label>X" over all labels, and the first distinct token of each label."""
    encoded = [tokenizer.encode(f"<label>{label}", add_special_tokens=False) for label in rulebook.labels]
    prefix = 0
    while all(len(e) > prefix + 1 for e in encoded) and len({e[prefix] for e in encoded}) == 1:
        prefix += 1
    first = [e[prefix] for e in encoded]
    if len(set(first)) != len(first):
        raise ValueError(f"labels {rulebook.labels} share their first token after '<label>': no label-only path")
    return encoded[0][:prefix], first


@torch.no_grad()
def label_distribution(
    model, tokenizer, prompts: list[list[int]], rulebook: R.Rulebook, batch_size: int = 32
) -> torch.Tensor:
    """P(label | prompt) renormalised over the labels, read at the label position: [len(prompts), n_labels]."""
    prefix, first = label_token_ids(tokenizer, rulebook)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs = []
    for start in range(0, len(prompts), batch_size):
        logits = rollouts.prefill(
            model, [p + prefix for p in prompts[start : start + batch_size]], tokenizer.pad_token_id, device
        )[0]
        probs.append(torch.softmax(logits[:, first].float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(probs)


def tier(probs: torch.Tensor, labels: tuple[str, ...], threshold: float = 0.5) -> list[str]:
    """Cumulative-probability tiering: from the best level down, the first level where the sum reaches t."""
    cumulative = probs.float().cumsum(-1)
    index = (cumulative < threshold - 1e-6).sum(-1).clamp(max=len(labels) - 1)  # float32 sums: a tolerance
    return [labels[i] for i in index.tolist()]


# ==================================================================================================
# Metrics (METHOD.md section 9)
# ==================================================================================================
INVALID = "(invalid)"


def classification_metrics(
    gold: list[str],
    predicted: list[str | None],
    labels: tuple[str, ...],
    format_ok: list[bool] | None = None,
    adherent: list[bool] | None = None,
) -> dict:
    """Accuracy, macro-F1, per-class P/R/F1, confusion (rows gold, columns predicted + invalid)."""
    n = len(gold)
    pred = [p if p in labels else INVALID for p in predicted]
    columns = list(labels) + [INVALID]
    confusion = [[sum(1 for g, p in zip(gold, pred) if g == gl and p == pl) for pl in columns] for gl in labels]
    per_class = {}
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        predicted_as = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        precision = tp / predicted_as if predicted_as else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = dict(precision=precision, recall=recall, f1=f1, support=support)
    present = [label for label in labels if per_class[label]["support"] > 0]
    return dict(
        n=n,
        accuracy=sum(g == p for g, p in zip(gold, pred)) / n if n else 0.0,
        macro_f1=sum(per_class[label]["f1"] for label in present) / len(present) if present else 0.0,
        per_class=per_class,
        confusion=confusion,
        confusion_labels=columns,
        format_rate=sum(format_ok) / n if format_ok is not None and n else None,
        adherence_rate=sum(adherent) / n if adherent is not None and n else None,
    )


# --- what a policy's own samples say about it (the RL scripts log it every step) -----------------------
def label_shares(groups: list[dict], labels: tuple[str, ...]) -> dict[str, float]:
    """Share of each predicted label (None: unreadable) over the policy's samples, their entropy, and the
    samples' macro-F1 against the gold labels: a collapse onto one label shows as one share going to 1,
    the entropy to 0 and the macro-F1 to that of a constant answer."""
    predicted = [label for g in groups for label in g["labels"]]
    shares = {label: predicted.count(label) / len(predicted) for label in (*labels, None)}
    entropy = -sum(p * math.log(p) for p in shares.values() if p > 0)
    gold = [g["gold"] for g in groups for _ in g["labels"]]
    return {
        **{f"label_share_{label or 'invalid'}": p for label, p in shares.items()},
        "label_entropy": entropy,
        "macro_f1": classification_metrics(gold, predicted, labels)["macro_f1"],
    }


COLLAPSE_SHARE = 0.9  # samples giving one label at least this often: the policy has collapsed onto it


def collapsed_onto(metrics: dict, labels: tuple[str, ...]) -> tuple[str, float] | None:
    """(label, share) when the policy's own samples went to one label, else None."""
    share, label = max((metrics[f"label_share_{label}"], label) for label in labels)
    return (label, share) if share >= COLLAPSE_SHARE else None


def empty_step_cause(metrics: dict, dropped: dict, labels: tuple[str, ...], from_checkpoint: bool = False) -> str:
    """The likely reason why dynamic sampling dropped every group, and what to do."""
    if metrics["format_rate"] == 0:
        return (
            "the policy never produced a parseable answer (format rate 0"
            + (f", {metrics['truncation_rate']:.0%} cut off by --max-new-tokens" if metrics["truncation_rate"] else "")
            + (
                "): this checkpoint does not write the answer format at this budget: raise --max-new-tokens, or "
                "train it longer with sft.py"
                if from_checkpoint
                else "): start from an SFT checkpoint (sft.py)"
            )
        )
    collapse = collapsed_onto(metrics, labels)
    if collapse:
        return (
            f"the policy collapsed onto '{collapse[0]}' ({collapse[1]:.0%} of its samples), so every group is scored "
            "alike: lower --lr, raise --temperature, balance the prompts (--prompt-sampling balanced), add a KL "
            "penalty (--beta) or raise --group-size"
        )
    if dropped["all_correct"] > dropped["all_wrong"] + dropped["other"]:
        return "every group was answered right by all its completions: the prompts are too easy for this policy"
    return (
        f"the completions of every group were scored alike (accuracy {metrics['accuracy']:.2f}): each prompt's samples "
        "agree, right or wrong, so the policy is too sure of its answers for this temperature: raise --temperature "
        "or --group-size, or lower --lr (the sampled answers go deterministic before they go right)"
    )


def natural_and_balanced(
    examples: list[D.Example], predicted, rulebook: R.Rulebook, format_ok=None, adherent=None, seed: int = 0
) -> dict:
    """Metrics on the natural distribution (top level) and on a class-balanced resample of it."""
    gold = [e.label for e in examples]
    metrics = classification_metrics(gold, predicted, rulebook.labels, format_ok, adherent)
    index = {id(e): i for i, e in enumerate(examples)}
    chosen = [index[id(e)] for e in D.balanced_sample(examples, rulebook.labels, seed)]
    pick = lambda xs: None if xs is None else [xs[i] for i in chosen]  # noqa: E731
    metrics["balanced"] = classification_metrics(
        pick(gold), pick(predicted), rulebook.labels, pick(format_ok), pick(adherent)
    )
    return metrics


def evaluate(
    model,
    tokenizer,
    examples: list[D.Example],
    rulebook: R.Rulebook,
    order: str = "label_first",
    max_item_tokens: int = 256,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    label_only: bool = False,
    tier_threshold: float = 0.5,
    backend=None,
    seed: int = 0,
) -> tuple[dict, list[dict]]:
    """Greedy generation (or the label-only path) over `examples`: (metrics, per-example records)."""
    prompts, truncated = zip(*(D.encode_prompt(tokenizer, e, rulebook, order, max_item_tokens) for e in examples))
    start = time.perf_counter()
    if label_only:
        probs = label_distribution(model, tokenizer, list(prompts), rulebook, batch_size=batch_size)
        predicted = tier(probs, rulebook.labels, tier_threshold)
        records = [
            dict(source_id=e.source_id, gold=e.label, predicted=p, probs=[round(x, 4) for x in pr.tolist()])
            for e, p, pr in zip(examples, predicted, probs)
        ]
        metrics = natural_and_balanced(examples, predicted, rulebook, seed=seed)
    else:
        gen = backend or rollouts.generate
        out = gen(
            model,
            tokenizer,
            list(prompts),
            n=1,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            batch_size=batch_size,
            desc="eval",
        )
        scores = [R.score_output(t, e.label, e.criteria, rulebook, order) for t, e in zip(out.texts, examples)]
        predicted = [s.parsed.label for s in scores]
        records = [
            dict(
                source_id=e.source_id,
                query=e.query,
                gold=e.label,
                predicted=s.parsed.label,
                correct=s.correct,
                format_ok=s.format_ok,
                adherent=s.adherent,
                errors=s.parsed.errors[:3],
                output=t,
            )
            for e, s, t in zip(examples, scores, out.texts)
        ]
        metrics = natural_and_balanced(
            examples, predicted, rulebook, [s.format_ok for s in scores], [s.adherent for s in scores], seed=seed
        )
    seconds = time.perf_counter() - start
    metrics.update(
        examples_per_second=len(examples) / seconds,
        seconds=seconds,
        prompts_truncated=sum(truncated),
        mode="label_only" if label_only else "generate",
    )
    return metrics, records


def plot_confusion(metrics: dict, labels: tuple[str, ...], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(metrics["confusion"], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(metrics["confusion_labels"])), metrics["confusion_labels"], rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, int(value), ha="center", va="center", color="black")
    ax.set_title(title or f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def metrics_table(rows: dict[str, dict], labels: tuple[str, ...]) -> str:
    """Markdown table in the layout of the papers: per-class F1, macro-F1, accuracy, adherence, format rate,
    and n, the examples each row was scored on."""
    head = (
        "| run | sample | n | "
        + " | ".join(f"F1 {label}" for label in labels)
        + " | macro-F1 | accuracy | adherence | format |"
    )
    lines = [head, "|" + "---|" * (len(labels) + 7)]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for name, m in rows.items():
        for sample, mm in (("natural", m), ("balanced", m.get("balanced"))):
            if mm is None:
                continue
            f1s = " | ".join(fmt(mm["per_class"].get(label, {}).get("f1")) for label in labels)
            lines.append(
                f"| {name} | {sample} | {mm.get('n', '-')} | {f1s} | {fmt(mm['macro_f1'])} | {fmt(mm['accuracy'])} | "
                f"{fmt(mm.get('adherence_rate'))} | {fmt(mm.get('format_rate'))} |"
            )
    return "\n".join(lines)


def model_for_eval(model, run_dir: Path, device: str):
    """The trained policy for the final evaluation on the main process: the module itself, or under
    FSDP (sharded weights) the final checkpoint reloaded from disk."""
    if launch.is_fsdp(model):
        return models.load_model(str(run_dir / "checkpoint"), device)[0]
    return models.unwrapped(model)


# ==================================================================================================
# The eval.py command
# ==================================================================================================
@dataclass
class Args(flags.CommonFlags):
    # eval.py's own defaults of three common flags (helpers/flags.py): the dev split, a 200-example sample, seed 0
    split: str = "dev"
    """split to evaluate: train | dev | test (a single data file has train and dev; all: the whole file)"""
    limit: int | None = 200
    """evaluate on a seeded sample of this many examples (None: all)"""
    seed: int = 0
    """seed of the evaluation sample"""
    max_new_tokens: int = 128
    """generation budget per answer"""
    batch_size: int = 16
    """prompts per forward pass"""
    label_only: bool = False
    """serving path: one forward pass reads the label distribution (no reasoning generated)"""
    tier_threshold: float = 0.5
    """label-only path: cumulative-probability threshold for tiering"""
    compare: tuple[str, ...] = ()
    """instead of evaluating: build a comparison table and bar chart from these finished run folders"""


def run_eval(args: Args, model=None, tokenizer=None, run: runs.Run | None = None) -> dict:
    """Evaluate and write eval.json, eval_samples.jsonl and confusion.png into the run folder."""
    dataset = D.load_for(args)
    if model is None:
        model, tokenizer = models.load_model(args.model, args.device)
    metrics, records = evaluate(
        model,
        tokenizer,
        dataset.examples,
        dataset.rulebook,
        args.order,
        args.max_item_tokens,
        args.max_new_tokens,
        args.batch_size,
        args.label_only,
        args.tier_threshold,
        seed=args.seed,
    )
    metrics["data"] = {k: v for k, v in dataset.stats.items() if k != "skipped"}
    metrics["sample"] = dict(
        dataset=args.dataset,
        data_path=args.data_path,
        split=args.split,
        limit=args.limit,
        seed=args.seed,
        label_only=args.label_only,
        max_new_tokens=args.max_new_tokens,
    )
    if runs.is_main_process():
        out_dir = Path(args.output_dir) / args.run_name
        out_dir.mkdir(parents=True, exist_ok=True)
        runs.write_json(out_dir / "eval.json", metrics)
        runs.write_json(out_dir / "eval_data_stats.json", dataset.stats)  # every skipped row of the evaluated split
        first = D.encode_prompt(tokenizer, dataset.examples[0], dataset.rulebook, args.order, args.max_item_tokens)[0]
        runs.write_prompt(out_dir, args.split, tokenizer.decode(first))
        with open(out_dir / "eval_samples.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        plot_confusion(
            metrics,
            dataset.rulebook.labels,
            out_dir / "confusion.png",
            f"{args.run_name} on {args.dataset}/{args.split}: acc {metrics['accuracy']:.3f}",  # the run, not its start
        )
        if run is not None and run.wandb:
            import wandb

            run.wandb.log({"eval/confusion": wandb.Image(str(out_dir / "confusion.png"))})
            run.wandb.summary.update(runs.flatten(metrics, "eval/"))
    return metrics


def final_eval(args, model, tokenizer, run: runs.Run, device: str) -> dict:
    """A training script's closing evaluation on `args.eval_split`, written into its own run folder
    (main process only; under FSDP the final checkpoint is reloaded, see model_for_eval). The sample is
    drawn with eval.py's default seed whatever the training seed, so every run and stage is scored on
    the same examples as `python eval.py` scores a base model."""
    if not run.main:
        return {}
    eval_args = Args(
        model=args.model,
        dataset=args.dataset,
        data_path=args.data_path,
        split=args.eval_split,
        field_map=args.field_map,
        label_map=args.label_map,
        rulebook=args.rulebook,
        limit=args.eval_limit,
        order=args.order,
        max_item_tokens=args.max_item_tokens,
        max_new_tokens=args.max_new_tokens,
        seed=Args.seed,
        output_dir=args.output_dir,
        run_name=args.run_name,
        skip_bad_rows=args.skip_bad_rows,
    )
    metrics = run_eval(eval_args, model_for_eval(model, run.dir, device), tokenizer, run)
    if "per_class" in metrics:
        print(metrics_table({args.run_name: metrics}, tuple(metrics["per_class"])))
    return metrics


SAMPLE_FIELDS = ("dataset", "data_path", "split", "limit", "seed", "n")  # which examples were scored


def scoring_differences(rows: dict[str, dict]) -> str:
    """The fields in which runs' evaluations differ, each with every run's value: the examples scored
    (dataset, split, limit, seed, n) or how they were answered (max_new_tokens, label_only)."""
    recorded = {name: {**(m.get("sample") or {}), "n": m.get("n")} for name, m in rows.items()}
    keys = sorted({k for sample in recorded.values() for k in sample}, key=lambda k: (k not in SAMPLE_FIELDS, k))
    differing = [k for k in keys if len({json.dumps(sample.get(k)) for sample in recorded.values()}) > 1]
    what = (
        "were not scored on the same examples"
        if any(k in SAMPLE_FIELDS for k in differing)
        else "were scored on the same examples, answered under different settings"
    )
    return f"these runs {what}, so their rows do not compare like for like: " + "; ".join(
        f"{k}: " + ", ".join(f"{name} {sample.get(k)}" for name, sample in recorded.items()) for k in differing
    )


def compare_runs(folders: tuple[str, ...], out_dir: Path) -> str:
    """One table (markdown + JSON) and a bar chart from finished runs' eval.json files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    for folder in folders:
        path = Path(folder) / "eval.json"
        if not path.exists():
            raise UserError(f"{path} missing: is {folder} a finished run?")
        rows[Path(folder).name] = json.loads(path.read_text())
    labels = tuple(next(iter(rows.values()))["per_class"])
    samples = {name: (m.get("n"), json.dumps(m.get("sample"), sort_keys=True)) for name, m in rows.items()}
    unrecorded = [name for name, m in rows.items() if not m.get("sample")]
    if len(set(samples.values())) > 1:
        if unrecorded and len({n for n, _ in samples.values()}) == 1:
            # an eval.json written before runs recorded their sample: the check cannot be made, which is not a mismatch
            print(
                f"warning: cannot check that these runs were scored on the same examples: {', '.join(unrecorded)} "
                "do not record their sample (written by an older version; rerun eval.py on them to check)",
                file=sys.stderr,
            )
        else:
            print(f"warning: {scoring_differences(rows)}", file=sys.stderr)
    table = metrics_table(rows, labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.md").write_text(table + "\n")
    runs.write_json(
        out_dir / "comparison.json",
        {
            name: {
                k: m.get(k)
                for k in ("accuracy", "macro_f1", "per_class", "format_rate", "adherence_rate", "n", "balanced")
            }
            for name, m in rows.items()
        },
    )
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 3, 4))
    keys = ("accuracy", "macro_f1", "adherence_rate", "format_rate")
    for i, key in enumerate(keys):
        ax.bar([j + i * 0.2 for j in range(len(rows))], [m.get(key) or 0 for m in rows.values()], width=0.2, label=key)
    ax.set_xticks([j + 0.3 for j in range(len(rows))], list(rows), rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "comparison.png", dpi=100)
    plt.close(fig)
    return table


def main(args: Args) -> None:
    if args.compare:
        out = Path(args.output_dir) / (args.run_name or "comparison")
        print(compare_runs(args.compare, out))
        print(f"wrote {out}/comparison.md, comparison.json, comparison.png")
        return
    launch.check_device(args.device)
    args.run_name = args.run_name or f"eval-{Path(args.model).name}-{args.dataset}-{args.split}"
    run = runs.Run(args, "eval")
    metrics = run_eval(args, run=run)
    print(metrics_table({args.run_name: metrics}, tuple(metrics["per_class"])))
    print(
        f"{metrics['examples_per_second']:.2f} examples/s ({metrics['mode']}); wrote {Path(args.output_dir) / args.run_name}/eval.json"
    )
    run.finish()


if __name__ == "__main__":
    cli.run(main, Args)
