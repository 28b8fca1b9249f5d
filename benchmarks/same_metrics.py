"""Does a change leave training as it was? Short runs of each training script from one start, their metrics
(timings left out), closing evaluation and final weights recorded, and compared with an earlier record.

    python benchmarks/same_metrics.py --start runs/sft-start-tiny-tf1000/checkpoint --out results/same-metrics/<commit>.json
    python benchmarks/same_metrics.py --start ... --out /tmp/now.json --against results/same-metrics/<commit>.json

A refactor that changes no behaviour gives equal records, bit for bit, on the same machine kind and threads
(each run is single-threaded here so that the record does not depend on the core count). The runs cover GRPO,
agrl.py as shipped, agrl.py with the other AGR and RRS choices (segment credit, own-sample advantages with the
likelihood term, hint guidance, refills) and DPO.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.runs import code_version  # noqa: E402

TIMING = ("time", "seconds", "per_second")
POOL = ["--dataset", "synthetic", "--data-seed", "7", "--limit", "64", "--eval-limit", "16", "--device", "cpu"]
RL = [*POOL, "--prompts-per-step", "4", "--group-size", "8", "--max-new-tokens", "96", "--temperature", "0.7"]
RL += ["--lr", "3e-4", "--warmup-steps", "2", "--prompt-sampling", "balanced", "--ds-max-tries", "1"]
RUNS = {  # name -> (script, flags)
    "grpo": ("grpo.py", [*RL, "--total-steps", "6"]),
    "agrl": ("agrl.py", [*RL, "--total-steps", "6"]),
    "agrl-choices": (
        "agrl.py",
        [*RL, "--total-steps", "6", "--rrs-credit", "segment", "--agr-advantage", "own", "--agr-mix", "append"]
        + ["--agr-nll-weight", "1", "--agr-guide", "hint", "--agr-tau", "0.25", "--beta", "0.04"],
    ),
    "dpo": ("dpo.py", [*POOL, "--total-steps", "3", "--n-samples", "4", "--max-new-tokens", "96", "--lr", "1e-4"]),
}


@dataclass
class Args:
    start: str = "runs/sft-start-tiny-tf1000/checkpoint"
    """checkpoint every run starts from (think_first: its run folder's args.json says so)"""
    out: str = "same-metrics.json"
    """where the record goes"""
    against: str | None = None
    """an earlier record to compare with (exit 1 on any difference)"""
    runs: tuple[str, ...] = tuple(RUNS)
    """which runs"""


def record_run(name: str, start: str, folder: Path) -> dict:
    script, flags = RUNS[name]
    order = json.loads((Path(start).parent / "args.json").read_text()).get("order", "label_first")
    command = [sys.executable, script, "--model", start, "--order", order, *flags]
    command += ["--output-dir", str(folder), "--run-name", name]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    run = folder / name
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    weights = hashlib.sha256((run / "checkpoint" / "model.safetensors").read_bytes()).hexdigest()
    return dict(
        command=" ".join(command[1:]),
        metrics=[{k: v for k, v in m.items() if not any(t in k for t in TIMING)} for m in metrics],
        eval={k: v for k, v in json.loads((run / "eval.json").read_text()).items() if not any(t in k for t in TIMING)},
        weights_sha256=weights,
    )


def differences(a: dict, b: dict, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def main(args: Args) -> None:
    code = code_version()
    record = dict(commit=code["commit"], dirty=code["dirty"], start=args.start, runs={})
    with tempfile.TemporaryDirectory() as folder:
        for name in args.runs:
            record["runs"][name] = record_run(name, args.start, Path(folder))
            print(f"{name}: {len(record['runs'][name]['metrics'])} steps recorded", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    if args.against:
        before = json.loads(Path(args.against).read_text())
        found = [
            d
            for name in args.runs
            for d in differences(
                {k: v for k, v in before["runs"][name].items() if k != "command"},
                {k: v for k, v in record["runs"][name].items() if k != "command"},
                name,
            )
        ]
        print(f"against {before['commit'][:7]}: " + ("the same" if not found else f"{len(found)} differences"))
        for d in found[:40]:
            print("  " + d)
        if found:
            raise SystemExit(1)


if __name__ == "__main__":
    main(tyro.cli(Args))
