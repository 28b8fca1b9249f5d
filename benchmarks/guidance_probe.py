"""Can a policy use AGR's guidance? For each prompt it samples the policy's own answers; the prompts
whose accuracy is <= tau are the stagnant ones AGR would guide. For each guidance mode it then makes
the guided answers exactly as agrl.py does (agrl.guided_answers) and counts how often they are kept
(correct, rule-adherent and well formed), per answer and per stagnant prompt (at least one kept).

    python benchmarks/guidance_probe.py --model runs/demo/sft/checkpoint --limit 32 --samples 4

Modes: hint (level 1: gold criteria in the prompt; level 2: and the gold label), prefix (level 1: the
gold answer's first segment forced as the start of the response; level 2: two segments), target (the
SFT target, always kept: the reference). Writes results/guidance-probe-<name>.json and prints a table.
Not a test: a measurement of one policy.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import agrl  # noqa: E402
import data as D  # noqa: E402
import rewards as R  # noqa: E402
from helpers import models, rollouts  # noqa: E402


@dataclass
class Args:
    model: str = "runs/demo/sft/checkpoint"
    """policy to probe"""
    name: str = "smollm2-sft-synthetic"
    """name of the result file"""
    limit: int = 32
    """training prompts probed (the seeded sample agrl.py --limit draws with the same seed)"""
    seed: int = 1
    """data seed (agrl.py's default)"""
    samples: int = 4
    """own answers per prompt (the group) and guided answers per stagnant prompt (K)"""
    tau: float = 0.25
    """a prompt is stagnant when the accuracy of its own answers is <= tau (agrl.py's default)"""
    order: str = "label_first"
    """output order the policy was trained for"""
    temperature: float = 1.0
    """sampling temperature (agrl.py's default)"""
    max_new_tokens: int = 96
    """generation budget"""
    device: str = "auto"
    """auto | cpu | cuda"""


def kept(score: R.Score) -> bool:
    return score.correct and score.adherent and score.format_ok


def main(args: Args) -> None:
    dataset = D.load_dataset("synthetic", "train", seed=args.seed, limit=args.limit)
    examples, book = dataset.examples, dataset.rulebook
    model, tokenizer = models.load_model(args.model, args.device)
    prompts = [D.encode_prompt(tokenizer, e, book, args.order)[0] for e in examples]
    own = rollouts.generate(
        model,
        tokenizer,
        prompts,
        n=args.samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seeds=list(range(len(prompts))),
    )
    score = lambda text, e: R.score_output(text, e.label, e.criteria, book, args.order)  # noqa: E731
    groups = []
    for i, e in enumerate(examples):
        scores = [score(t, e) for t in own.texts[i * args.samples : (i + 1) * args.samples]]
        groups.append(
            dict(
                position=i,
                example_index=i,
                prompt=prompts[i],
                correct=[s.correct for s in scores],
                criteria=[s.criteria for s in scores],
            )
        )
    stagnant = [g for g in groups if sum(g["correct"]) / args.samples <= args.tau]
    table = dict(
        own=dict(
            stagnant_prompts=len(stagnant),
            prompts=len(groups),
            kept_per_answer=sum(g["correct"].count(True) for g in groups) / (len(groups) * args.samples),
        )
    )
    modes = [("hint", 1), ("hint", 2), ("prefix", 1), ("prefix", 2), ("target", 1)]
    for mode, level in modes:
        run_args = agrl.Args(
            agr_guide=mode,
            order=args.order,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
        to_guide = [
            dict(
                position=k,
                group=g,
                level=level,
                guidance=agrl.guidance_text(examples[g["example_index"]], agrl.wrong_criteria(g), level),
            )
            for k, g in enumerate(stagnant)
        ]
        K = 1 if mode == "target" else args.samples
        answers = (
            agrl.guided_answers(model, tokenizer, to_guide, examples, book, run_args, K, model.device)
            if stagnant
            else []
        )
        per_prompt = [
            [kept(score(t, examples[stagnant[a["position"]]["example_index"]])) for t in a["texts"]] for a in answers
        ]
        n_answers = sum(len(p) for p in per_prompt)
        table[f"{mode} level {level}"] = dict(
            kept_per_answer=sum(map(sum, per_prompt)) / max(1, n_answers),
            stagnant_with_a_kept_answer=sum(any(p) for p in per_prompt) / max(1, len(per_prompt)),
            forced_tokens_mean=sum(f for a in answers for f in a["forced"]) / max(1, n_answers),
            answers=n_answers,
            example=answers[0]["texts"][0] if answers else None,
        )
    print(f"{len(stagnant)} of {len(groups)} prompts stagnant (own accuracy <= {args.tau} over {args.samples} samples)")
    print(
        "| guidance | kept per answer | stagnant prompts with >= 1 kept answer | forced tokens | answers |\n|---|---|---|---|---|"
    )
    for name, row in table.items():
        if name != "own":
            print(
                f"| {name} | {row['kept_per_answer']:.3f} | {row['stagnant_with_a_kept_answer']:.3f} | "
                f"{row['forced_tokens_mean']:.1f} | {row['answers']} |"
            )
    out_path = ROOT / "results" / f"guidance-probe-{args.name}.json"
    out_path.write_text(json.dumps(dict(args=vars(args), table=table), indent=2))
    print(f"wrote {out_path.relative_to(ROOT)}")


if __name__ == "__main__":
    main(tyro.cli(Args))
