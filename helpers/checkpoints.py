"""Checkpoints: atomic save, validated resume, RNG state, and the signal that asks for a checkpoint and a clean exit.

A checkpoint is `<run>/checkpoints/step-N/`: the Hugging Face model, `train_state.pt` (optimizer,
RNG, data position, whatever the script adds) and a manifest of file sizes; `--resume` continues from
the newest one that validates. Under FSDP the weights and optimizer states are each rank's own shards
(torch.distributed.checkpoint), and the whole Hugging Face model is written once, to `<run>/checkpoint/`.
"""

from __future__ import annotations

import contextlib
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
    whose last step checkpoint exists always has its final folder. Every process calls it; only the main
    process writes. Under FSDP it is `save_sharded_checkpoint` instead: every rank writes its own shard.
    """
    if launch.is_fsdp(model):
        return save_sharded_checkpoint(run_dir, step, model, tokenizer, train_state, keep_last, final, optimizer)
    weights = accelerator.get_state_dict(model) if accelerator is not None else None
    if optimizer is not None:
        train_state = dict(train_state, optimizer=optimizer.state_dict())
    if not runs.is_main_process():
        return None
    folder, tmp = step_folders(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    models.unwrapped(model).save_pretrained(tmp, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(dict(train_state, step=step), tmp / "train_state.pt")
    write_manifest(tmp, step)
    if final:  # before the step folder is in place: a crash in between leaves step-1 newest, and resuming redoes both
        final_tmp = run_dir / "checkpoint.tmp"
        shutil.rmtree(final_tmp, ignore_errors=True)
        shutil.copytree(tmp, final_tmp, ignore=shutil.ignore_patterns("train_state.pt"))
        replace_folder(final_tmp, run_dir / "checkpoint")
    return put_in_place(run_dir, tmp, folder, keep_last)


def save_sharded_checkpoint(
    run_dir: Path, step: int, model, tokenizer, train_state: dict, keep_last: int, final: bool, optimizer
) -> Path | None:
    """Under FSDP: every rank writes its own shard of the weights and AdamW states through
    torch.distributed.checkpoint (DCP: `__<rank>_0.distcp`, and `.metadata` from rank 0), so no rank
    ever holds a whole copy; rank 0 adds the config, tokenizer and `train_state.pt`, and once every rank
    has written, the manifest of every file. `final` exports the whole Hugging Face model to
    `<run>/checkpoint/` one parameter at a time (`export_hf`), before the step folder is in place."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder, tmp = step_folders(run_dir, step)
    main = runs.is_main_process()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # the folder is there and empty before any rank writes into it
    # keyed by parameter name, the values this rank's DTensor shards (of the optimizer accelerate wraps)
    weights, optimizer_state = get_state_dict(model, getattr(optimizer, "optimizer", optimizer))
    weights = stored_once(model, weights)
    # tensors only: DCP reads other values with torch.load(weights_only=False); param_groups go to train_state.pt
    dcp.save(dict(model=weights, optimizer=optimizer_state["state"]), checkpoint_id=tmp)
    # dcp.save returns on every rank once all ranks' files are written and rank 0 has written .metadata
    if final:
        export_hf(model, tokenizer, run_dir / "checkpoint.tmp")
    if not main:
        return None
    save_config(model, tokenizer, tmp)
    train_state = dict(train_state, step=step, optimizer_param_groups=optimizer_state["param_groups"])
    torch.save(train_state, tmp / "train_state.pt")
    write_manifest(tmp, step)
    if final:
        replace_folder(run_dir / "checkpoint.tmp", run_dir / "checkpoint")
    return put_in_place(run_dir, tmp, folder, keep_last)


def step_folders(run_dir: Path, step: int) -> tuple[Path, Path]:
    folder = run_dir / "checkpoints" / f"step-{step:07d}"
    return folder, folder.with_name(folder.name + ".tmp")


def save_config(model, tokenizer, folder: Path) -> None:
    """config.json, generation_config.json and the tokenizer (save_pretrained would walk the sharded weights)."""
    module = models.unwrapped(model)
    module.config.save_pretrained(folder)
    if module.generation_config is not None:
        module.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_manifest(folder: Path, step: int) -> None:
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    runs.write_json(folder / "manifest.json", dict(step=step, files=files))


def replace_folder(tmp: Path, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def put_in_place(run_dir: Path, tmp: Path, folder: Path, keep_last: int) -> Path:
    """The finished step folder renamed into place, and all but the last `keep_last` deleted."""
    replace_folder(tmp, folder)
    for old in sorted((run_dir / "checkpoints").glob("step-???????"))[: -max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def stored_once(model, weights: dict) -> dict:
    """The state dict without the names of tied weights (the head that is the embedding), as save_pretrained does."""
    tied = getattr(models.unwrapped(model), "all_tied_weights_keys", None) or {}  # {"lm_head.weight": "model.embed..."}
    return {k: v for k, v in weights.items() if k not in tied or k == tied[k]}


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def export_hf(model, tokenizer, folder: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """The whole Hugging Face model (weights, config, tokenizer; no optimizer) from FSDP shards, written by
    rank 0 one parameter at a time: every rank gathers each parameter in turn (a collective), rank 0
    appends its bytes to the safetensors file being written and drops it. Safetensors files are a JSON
    header of names, shapes and offsets, then the raw tensors, so the header is written first from the
    shapes alone. Files of at most `max_shard_bytes` (one file, or several and an index, as Hugging Face
    does). Tied weights are stored once, as save_pretrained does."""
    tensors = stored_once(model, models.unwrapped(model).state_dict())
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    main = runs.is_main_process()
    if main:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        save_config(model, tokenizer, folder)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in shard:
            t = tensors[name]
            end = offset + t.numel() * t.element_size()
            header[name] = dict(dtype=SAFETENSORS_DTYPES[t.dtype], shape=list(t.shape), data_offsets=[offset, end])
            offset = end
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the tensor data starts 8-byte aligned
        with open(folder / file, "wb") if main else contextlib.nullcontext() as f:
            if main:
                f.write(len(encoded).to_bytes(8, "little") + encoded)
            for name in shard:
                t = tensors[name]
                whole = t.full_tensor() if hasattr(t, "full_tensor") else t  # every rank, same order
                if main:
                    f.write(whole.detach().cpu().contiguous().view(torch.uint8).numpy())
                del whole
    if main and len(shards) > 1:
        weight_map = {name: file for file, shard in zip(names, shards) for name in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        runs.write_json(
            folder / "model.safetensors.index.json", dict(metadata=dict(total_size=total), weight_map=weight_map)
        )


def is_sharded(folder: Path) -> bool:
    """Whether a step checkpoint was written by an FSDP run (DCP shards, no whole weights)."""
    return (folder / ".metadata").exists()


def check_strategy(folder: Path, fsdp: bool) -> None:
    """A sharded checkpoint resumes under FSDP only (with any number of processes: DCP reshards), a whole one
    without FSDP only."""
    if fsdp and not is_sharded(folder):
        raise UserError(
            f"{folder} was written without FSDP (whole weights, no shards): resume it without --strategy fsdp"
        )
    if is_sharded(folder) and not fsdp:
        raise UserError(f"{folder} holds FSDP shards (no whole weights): resume it with --strategy fsdp")


def load_policy(
    model_name: str,
    resume_from: Path | None,
    accelerator,
    gradient_checkpointing: str = "auto",
    whole_on_every_rank: bool = False,
):
    """The policy to train, before `accelerator.prepare`: `model_name`, or the checkpoint `--resume` continues.

    Every rank reads the whole model without FSDP, and under FSDP when the script uses the unprepared policy
    whole on every rank (`whole_on_every_rank`: DPO's pass@N sampling and reference log-probs, a --beta
    reference copy). Otherwise under FSDP no rank but 0 reads weights: the others build the model from its
    config in memory that is never written (`empty_model`). Starting, rank 0 reads the whole model and
    `prepare` broadcasts it into every rank's shard (accelerate's cpu_ram_efficient_loading); resuming from a
    sharded checkpoint, every rank builds it so and `load_training_state` reads each rank's shard."""
    import torch.distributed as dist
    from accelerate.utils import DistributedType
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if resume_from is not None:
        check_strategy(resume_from, fsdp)
    if fsdp:  # the same on every rank: prepare's collectives follow it
        accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = resume_from is None and not whole_on_every_rank
    if not fsdp or (resume_from is None and whole_on_every_rank):
        return models.load_policy(str(resume_from or model_name), accelerator, gradient_checkpointing)
    if resume_from is not None:
        generation = resume_from / "generation_config.json"
        generation = GenerationConfig.from_pretrained(resume_from) if generation.exists() else None
        model = empty_model(AutoConfig.from_pretrained(resume_from), generation)
        tokenizer = AutoTokenizer.from_pretrained(resume_from)
    else:  # rank 0 reads the model (on the CPU: prepare moves it to the GPUs a parameter at a time)
        loaded = [None]
        if runs.is_main_process():
            try:
                model, tokenizer = models.load_model(model_name, "cpu", dtype="float32")
                loaded = [(model.config, model.generation_config, tokenizer)]
            except Exception as e:
                failed = (
                    UserError(str(e)) if isinstance(e, UserError) else RuntimeError(f"rank 0: {type(e).__name__}: {e}")
                )
                dist.broadcast_object_list([failed])
                raise
        dist.broadcast_object_list(loaded)  # the others wait for rank 0's config and tokenizer, or its error
        if isinstance(loaded[0], Exception):
            raise loaded[0]
        if not runs.is_main_process():
            config, generation, tokenizer = loaded[0]
            model = empty_model(config, generation)
    if models.gradient_checkpointing_on(gradient_checkpointing, str(accelerator.device)):
        models.enable_checkpointing(model)
    return model, tokenizer


def empty_model(config, generation_config=None):
    """The policy built from its config in memory that is allocated but never written: the OS commits only the
    pages a rank later copies its shard out of. Buffers (the rotary frequencies) are computed as usual."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # parameters on meta
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device="cpu")  # fully_shard moves each unit to the GPU and keeps this rank's shard
    model.tie_weights()
    with torch.no_grad():
        for name, buffer in buffers.items():
            model.get_buffer(name).copy_(buffer)
    if generation_config is not None:
        model.generation_config = generation_config
    return model


def whole_weights(model_name: str, resume_from: Path | None) -> str:
    """Where the policy's whole Hugging Face weights are, for a vLLM engine to start from: the checkpoint, or for
    a sharded one the start model (the trained weights are pushed to the engine before its first rollout)."""
    return str(resume_from if resume_from is not None and not is_sharded(resume_from) else model_name)


# The globals DCP's `.metadata` pickle holds: its metadata classes, shapes, layouts, paths (and torch dtypes)
DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in "Metadata MetadataIndex ChunkStorageMetadata TensorStorageMetadata BytesStorageMetadata".split()
    + "TensorProperties StorageMeta _MEM_FORMAT_ENCODING".split()
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
}


def check_dcp_metadata(folder: Path) -> None:
    """DCP reads `.metadata` with plain pickle, which runs whatever a crafted file names: unpickle it first with
    nothing but the globals DCP writes there (and torch dtypes), so that a checkpoint folder stays data."""
    import pickle

    class MetadataUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in DCP_METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
            ):
                return super().find_class(module, name)
            raise UserError(f"{folder / '.metadata'} names {module}.{name}, which DCP metadata never holds: not loaded")

    with open(folder / ".metadata", "rb") as f:
        MetadataUnpickler(f).load()


def load_training_state(model, optimizer, folder: Path, state: dict) -> None:
    """`--resume`, after `accelerator.prepare`. Under FSDP each rank reads its own shard of the weights and
    AdamW states from the DCP files into the sharded model and optimizer (DCP reshards if the number of
    processes changed); otherwise the optimizer state in train_state.pt (the weights came with the model)."""
    check_strategy(folder, launch.is_fsdp(model))
    if not launch.is_fsdp(model):
        optimizer.load_state_dict(state["optimizer"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_optimizer_state_dict

    check_dcp_metadata(folder)
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper: torch's own optimizer
    weights, optimizer_state = get_state_dict(model, optimizer)  # this rank's shards (AdamW's made by a zero step)
    # read in place: into the parameters' own shards (a tied head with its embedding), and the AdamW states
    dcp.load(dict(model=stored_once(model, weights), optimizer=optimizer_state["state"]), checkpoint_id=folder)
    optimizer_state = dict(state=optimizer_state["state"], param_groups=state["optimizer_param_groups"])
    set_optimizer_state_dict(model, optimizer, optimizer_state)


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
