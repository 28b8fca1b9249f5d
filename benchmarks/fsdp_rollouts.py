"""FSDP rollouts: an inference copy gathered once per step vs generating on the sharded model in lockstep.

    python benchmarks/fsdp_rollouts.py --model smollm2-135m --prompts 2 --group-size 4 --max-new-tokens 32 --num-gpus 2 --device cpu

Each rank generates the same amount (lockstep needs that, or it hangs), first on the FSDP2-sharded policy
directly (every forward of every decode step all-gathers every block), then on the unsharded copy after
one gather (`eval.refresh_rollout_weights`). Writes one JSON line per rank count to --out.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data as D  # noqa: E402
from helpers import launch, models, rollouts  # noqa: E402


@dataclass
class Args:
    model: str = "smollm2-135m"
    """policy"""
    prompts: int = 2
    """prompts per rank"""
    group_size: int = 4
    """completions per prompt"""
    max_new_tokens: int = 32
    """fixed completion length (min = max)"""
    num_gpus: int = 2
    """processes"""
    device: str = "cpu"
    """cpu | cuda"""
    strategy: str = "fsdp"
    """always fsdp here"""
    out: str = "results/fsdp-rollouts-cpu.json"
    """result file (rank 0 writes it)"""


def main(args: Args) -> None:
    launch.relaunch(args.num_gpus, args.device, args.strategy)
    accelerator = launch.make_accelerator(args.device, args.strategy)
    model, tokenizer = models.load_policy(args.model, accelerator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model, optimizer = accelerator.prepare(model, optimizer)
    dataset = D.load_dataset("synthetic", "train", seed=0, limit=args.prompts * accelerator.num_processes)
    mine = dataset.examples[accelerator.process_index :: accelerator.num_processes]
    prompts = [D.encode_prompt(tokenizer, e, dataset.rulebook, "label_first", 256)[0] for e in mine]
    kwargs = dict(
        n=args.group_size,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        temperature=1.0,
        seeds=list(range(len(prompts))),
    )
    # the sharded model itself: FSDP2 gathers each block in every forward, a collective per layer per token
    start = time.perf_counter()
    lockstep = rollouts.generate(model, tokenizer, prompts, **kwargs)
    lockstep_seconds = time.perf_counter() - start
    start = time.perf_counter()
    rollouts.refresh_rollout_weights(model, accelerator)
    gather_seconds = time.perf_counter() - start
    start = time.perf_counter()
    copied = rollouts.rollout_generate(model, accelerator, None, tokenizer, prompts, **kwargs)
    copy_seconds = time.perf_counter() - start
    copy_bytes = sum(p.numel() * p.element_size() for p in rollouts._INFERENCE_COPIES[id(model)].parameters())
    shard_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) / accelerator.num_processes
    result = dict(
        model=args.model,
        world=accelerator.num_processes,
        device=str(accelerator.device),
        completions_per_rank=len(prompts) * args.group_size,
        tokens_each=args.max_new_tokens,
        lockstep_generation_s=round(lockstep_seconds, 2),
        copy_gather_s=round(gather_seconds, 2),
        copy_generation_s=round(copy_seconds, 2),
        copy_mib=round(copy_bytes / 2**20, 1),
        shard_mib=round(shard_bytes / 2**20, 1),
        same_tokens=lockstep.completion_ids == copied.completion_ids,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    if accelerator.is_main_process:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(tyro.cli(Args))
