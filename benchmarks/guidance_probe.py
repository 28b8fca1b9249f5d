"""Does a policy follow AGR's guidance? Samples each prompt with no guidance, level-1 guidance (the gold
values of every known criterion) and level-2 guidance (those plus the gold label), and counts how often
the answer is correct, adherent and well formed: the selection rule AGR keeps a guided sample by.

    python benchmarks/guidance_probe.py --model runs/demo/sft/checkpoint --limit 16 --samples 4

Writes results/guidance-probe-<name>.json and prints a table. Not a test: a measurement of one policy.
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
import eval as E  # noqa: E402
import rewards as R  # noqa: E402


@dataclass
class Args:
    model: str = "runs/demo/sft/checkpoint"
    """policy to probe"""
    name: str = "smollm2-sft-synthetic"
    """name of the result file"""
    limit: int = 16
    """training prompts probed (the seeded sample agrl.py --limit draws with the same seed)"""
    seed: int = 1
    """data seed (agrl.py's default)"""
    samples: int = 4
    """completions per prompt and condition"""
    temperature: float = 1.0
    """sampling temperature (agrl.py's default)"""
    max_new_tokens: int = 96
    """generation budget"""
    device: str = "auto"
    """auto | cpu | cuda"""


def main(args: Args) -> None:
    dataset = D.load_dataset("synthetic", "train", seed=args.seed, limit=args.limit)
    model, tokenizer = E.load_model(args.model, args.device)
    book = dataset.rulebook
    known = lambda e: [c for c, v in e.criteria.items() if v != R.UNKNOWN]  # noqa: E731
    conditions = {  # agrl.py's own guidance text, naming every known criterion rather than the wrong ones
        "none": lambda e: None,
        "level 1 (gold criteria)": lambda e: agrl.guidance_text(e, known(e), 1),
        "level 2 (criteria + label)": lambda e: agrl.guidance_text(e, known(e), 2),
    }
    table = {}
    for name, guide in conditions.items():
        prompts = [D.encode_prompt(tokenizer, e, book, guidance=guide(e))[0] for e in dataset.examples]
        out = E.generate(model, tokenizer, prompts, n=args.samples, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, seeds=list(range(len(prompts))), desc=name)
        scores = [R.score_output(text, dataset.examples[i // args.samples].label, dataset.examples[i // args.samples].criteria, book)
                  for i, text in enumerate(out.texts)]
        n = len(scores)
        table[name] = dict(correct=sum(s.correct for s in scores) / n, format=sum(s.format_ok for s in scores) / n,
                           adherent=sum(s.adherent for s in scores) / n,
                           selected=sum(s.correct and s.adherent and s.format_ok for s in scores) / n, n=n,
                           example=out.texts[0])
    print("| guidance | correct | format | adherent | kept by AGR (all three) | n |\n|---|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['correct']:.3f} | {row['format']:.3f} | {row['adherent']:.3f} | {row['selected']:.3f} | {row['n']} |")
    out_path = ROOT / "results" / f"guidance-probe-{args.name}.json"
    out_path.write_text(json.dumps(dict(args=vars(args), table=table), indent=2))
    print(f"wrote {out_path.relative_to(ROOT)}")


if __name__ == "__main__":
    main(tyro.cli(Args))
