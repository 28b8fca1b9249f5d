"""Checkpoints: atomic save, validated resume, RNG state, and the signal that asks for a checkpoint and a clean exit.

A checkpoint is `<run>/checkpoints/step-N/`: the Hugging Face model, `train_state.pt` (optimizer,
RNG, data position, whatever the script adds) and a manifest of file sizes; `--resume` continues from
the newest one that validates.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from helpers import launch, models, runs
from helpers.errors import UserError


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    tokenizer,
    train_state: dict,
    keep_last: int = 2,
    final: bool = False,
    accelerator=None,
    optimizer=None,
) -> Path | None:
    """Hugging Face format plus `train_state.pt` (optimizer, scheduler, RNG, data position), atomically.

    Written into a temporary folder with a manifest of file sizes, then renamed into place, so a crash
    leaves either the previous checkpoint or the new one, never half of one. `final` also writes the
    weights to `<run>/checkpoint/`, the folder later stages load, before the step folder appears: a run
    whose last step checkpoint exists always has its final folder. Every process calls it (gathering
    FSDP-sharded weights and optimizer states is a collective); only the main process writes. Under
    FSDP the optimizer state is gathered whole by accelerate into `optimizer.bin` (keyed by parameter
    name, so any world size reads it back); otherwise it goes into `train_state.pt`.
    """
    weights = accelerator.get_state_dict(model) if accelerator is not None else None
    folder = run_dir / "checkpoints" / f"step-{step:07d}"
    tmp = folder.with_name(folder.name + ".tmp")
    if runs.is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    if optimizer is not None and launch.is_fsdp(model):
        from accelerate.utils import save_fsdp_optimizer

        save_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(tmp))
    elif optimizer is not None:
        train_state = dict(train_state, optimizer=optimizer.state_dict())
    if not runs.is_main_process():
        return None
    if launch.is_fsdp(
        model
    ):  # save_pretrained inspects the (sharded) module's own parameters: a collective rank 0 would hang in
        from huggingface_hub import save_torch_state_dict

        module = models.unwrapped(model)
        module.config.save_pretrained(tmp)
        if module.generation_config is not None:
            module.generation_config.save_pretrained(tmp)
        tied = getattr(module, "all_tied_weights_keys", None) or {}  # {"lm_head.weight": "model.embed_tokens.weight"}
        weights = {
            k: v for k, v in weights.items() if k not in tied or k == tied[k]
        }  # stored once, as save_pretrained does
        save_torch_state_dict(weights, tmp, max_shard_size="5GB")
    else:
        models.unwrapped(model).save_pretrained(tmp, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(dict(train_state, step=step), tmp / "train_state.pt")
    files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
    runs.write_json(tmp / "manifest.json", dict(step=step, files=files))
    if final:  # before the step folder is in place: a crash in between leaves step-1 newest, and resuming redoes both
        final_dir, final_tmp = run_dir / "checkpoint", run_dir / "checkpoint.tmp"
        shutil.rmtree(final_tmp, ignore_errors=True)
        shutil.copytree(tmp, final_tmp, ignore=shutil.ignore_patterns("train_state.pt", "optimizer.bin"))
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(final_tmp, final_dir)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    for old in sorted((run_dir / "checkpoints").glob("step-???????"))[: -max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_optimizer_state(optimizer, model, accelerator, folder: Path, state: dict) -> None:
    """`--resume`, after `accelerator.prepare`: under FSDP accelerate scatters the saved whole state into
    each process's own shard (loading it before `prepare`, as rank 0's shard, fails on every other rank)."""
    if launch.is_fsdp(model):
        from accelerate.utils import load_fsdp_optimizer

        if not (folder / "optimizer.bin").exists():
            raise UserError(
                f"{folder} was not written by an FSDP run (no optimizer.bin): resume it with the strategy it was trained with"
            )
        load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(folder))
    elif "optimizer" not in state:
        raise UserError(f"{folder} holds a sharded (FSDP) optimizer state: resume it with --strategy fsdp")
    else:
        optimizer.load_state_dict(state["optimizer"])


def validate_checkpoint(folder: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        return "manifest.json missing"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        return f"manifest.json unreadable: {e}"
    if f"step-{manifest.get('step', -1):07d}" != folder.name:
        return f"manifest step {manifest.get('step')} does not match folder {folder.name}"
    for name, size in manifest["files"].items():
        path = folder / name
        if not path.exists():
            return f"{name} missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, manifest says {size}"
    return None


def latest_checkpoint(run_dir: Path) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that validates, skipping (and reporting) broken ones."""
    for folder in sorted((run_dir / "checkpoints").glob("step-???????"), reverse=True):
        problem = validate_checkpoint(folder)
        if problem is None:
            try:
                state = torch.load(folder / "train_state.pt", weights_only=True, map_location="cpu")
                return folder, state
            except Exception as e:  # a truncated pickle: report and fall back
                problem = f"train_state.pt unreadable: {type(e).__name__}: {e}"
        print(f"[resume] skipping broken checkpoint {folder}: {problem}", file=sys.stderr)
    return None, None


def resume_point(run: runs.Run) -> tuple[Path | None, dict | None]:
    """`--resume`: the newest valid checkpoint and its train state, with the metric and sample lines logged
    after its step dropped (all of them when none is valid: the run starts over), so no step appears twice."""
    folder, state = latest_checkpoint(run.dir)
    if folder is None and runs.is_main_process():
        print(f"[resume] {run.dir} has no checkpoint yet (stopped before the first one): starting again from step 1")
    run.rewind(state["step"] if state is not None else -1)
    return folder, state


def rng_state(generator: torch.Generator | None = None) -> dict:
    state = dict(python=random.getstate(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


class StopFlag:
    """SIGINT / SIGTERM ask the loop to checkpoint at the end of the current step and exit cleanly."""

    def __init__(self):
        import signal

        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def agreed(self) -> bool:
        """Whether any process was asked to stop. Every rank calls it once a step, so all ranks checkpoint the
        same step and exit together: a signal reaching one rank alone would send it into the checkpoint's
        collectives while the others went on to the next step's."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.requested
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested

    def _handler(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        print(
            f"[signal {signum}] checkpointing after this step, then exiting (a second Ctrl-C aborts at once)",
            file=sys.stderr,
            flush=True,
        )
        self.requested = True
