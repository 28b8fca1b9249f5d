"""Host RAM per rank of FSDP checkpoints: the start load, a step save, the final export, a resume load.

    python benchmarks/checkpoint_memory.py --num-gpus 2 --out results/checkpoint-memory-cpu.json

Two gloo ranks on CPU (relaunched under torchrun), FSDP2 through the training scripts' own helpers, on a
random Llama of the given shape. Each phase reports the peak resident memory of each rank above what it
held when the phase began (sampled every 2 ms), next to the whole model's fp32 size. The resume runs in
fresh processes (a second launch), so that memory freed by the first cannot hide what it costs.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import checkpoints, launch, models  # noqa: E402


@dataclass
class Args:
    hidden: int = 1024
    """hidden size"""
    layers: int = 8
    """transformer blocks"""
    vocab: int = 32000
    """vocabulary (untied embedding and head)"""
    num_gpus: int = 2
    """processes"""
    work_dir: str = "/tmp/checkpoint-memory"
    """where the model and the run's checkpoints go"""
    resume: bool = False
    """(internal) the second launch: resume from the first one's checkpoint"""
    out: str = "results/checkpoint-memory-cpu.json"
    """the measurements, one JSON object"""


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_above_start(phases: dict, name: str):
    """Peak resident bytes above the phase's start, sampled by a thread (torch releases the GIL in its ops)."""
    gc.collect()
    start, peak, done = resident_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        phases[name] = max(peak[0], resident_bytes()) - start


def fake_step(model, optimizer) -> None:
    """One AdamW step on gradients of ones: the optimizer then holds its two states per parameter shard."""
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(args: Args) -> None:
    if "RANK" not in os.environ:  # two launches of N ranks: train, save and export; then resume
        import shutil
        import subprocess

        shutil.rmtree(args.work_dir, ignore_errors=True)
        for extra in ([], ["--resume"]):
            command = launch.launch_command(args.num_gpus, "cpu", script=[sys.argv[0], *sys.argv[1:], *extra])
            subprocess.run(command, check=True)
        return
    work, rank = Path(args.work_dir), int(os.environ["RANK"])
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before any phase: not counted)
    from accelerate import init_empty_weights  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    accelerator = launch.make_accelerator("cpu", "fsdp", "fp32")
    phases: dict[str, int] = {}
    if not args.resume:
        if rank == 0:  # the start model, in Hugging Face format (not measured)
            from transformers import LlamaConfig, LlamaForCausalLM

            config = LlamaConfig(
                vocab_size=args.vocab,
                hidden_size=args.hidden,
                intermediate_size=4 * args.hidden,
                num_hidden_layers=args.layers,
                num_attention_heads=args.hidden // 64,
                num_key_value_heads=args.hidden // 64,
                tie_word_embeddings=False,
            )
            model, tokenizer = LlamaForCausalLM(config), models.embedded_tokenizer()
            model.save_pretrained(work / "start")
            tokenizer.save_pretrained(work / "start")
            del model
        accelerator.wait_for_everyone()
        with peak_above_start(phases, "start load (rank 0 reads the model, the others build it empty)"):
            model, tokenizer = checkpoints.load_policy(str(work / "start"), None, accelerator)
        with peak_above_start(phases, "start: prepare (rank 0's weights broadcast into every rank's shard)"):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            model, optimizer = accelerator.prepare(model, optimizer)
        fake_step(model, optimizer)
        with peak_above_start(phases, "step save (each rank writes its shard)"):
            checkpoints.save_checkpoint(
                work / "run", 1, model, tokenizer, {}, accelerator=accelerator, optimizer=optimizer
            )
        with peak_above_start(phases, "final export (step save + whole HF model, one parameter at a time)"):
            checkpoints.save_checkpoint(
                work / "run", 2, model, tokenizer, {}, final=True, accelerator=accelerator, optimizer=optimizer
            )
    else:
        folder, state = checkpoints.latest_checkpoint(work / "run")
        with peak_above_start(phases, "resume: the model built from the checkpoint's config"):
            model, tokenizer = checkpoints.load_policy("unused", folder, accelerator)
        with peak_above_start(phases, "resume: prepare, then each rank reads its shard (parameters and AdamW)"):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            model, optimizer = accelerator.prepare(model, optimizer)
            checkpoints.load_training_state(model, optimizer, folder, state)
    whole = sum(p.numel() for p in model.parameters()) * 4  # fp32, from the shards' global shapes
    gathered = [None] * args.num_gpus
    torch.distributed.all_gather_object(gathered, phases)
    if rank == 0:
        out = Path(args.out)
        results = json.loads(out.read_text()) if args.resume and out.exists() else {}
        results.update(shape=dict(hidden=args.hidden, layers=args.layers, vocab=args.vocab), ranks=args.num_gpus)
        results["whole_model_fp32_mib"] = round(whole / 2**20, 1)
        for name in gathered[0]:
            results[name] = [round(g[name] / 2**20, 1) for g in gathered]  # MiB per rank
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(tyro.cli(Args))
