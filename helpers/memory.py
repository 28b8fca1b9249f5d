"""Memory estimates for `--dry-run`, without loading weights: a model's shape (local config, else a table of
common families), the memory per GPU in each phase of a step, and host RAM at load, checkpoint and export.

The training side is checked against a measured peak in tests/test_memory_plan.py; docs/SCALING.md shows the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from helpers import models

# The shapes of common families, for the --dry-run memory plan when no config is reachable offline:
# hidden, intermediate, layers, attention heads, key/value heads, vocabulary, tied embeddings.
MODEL_SHAPES = {
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-3b": (2048, 11008, 36, 16, 2, 151936, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False),
    "qwen2.5-14b": (5120, 13824, 48, 40, 8, 152064, False),
    "qwen2.5-32b": (5120, 27648, 64, 40, 8, 152064, False),
    "qwen2.5-72b": (8192, 29568, 80, 64, 8, 152064, False),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256, False),
    "llama-3-70b": (8192, 28672, 80, 64, 8, 128256, False),
}


SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)


def model_shape(name: str) -> tuple[dict | None, str]:
    """(shape, where it came from) without loading weights: the local config, else the family table, else None."""
    import re

    resolved = models.resolve_model_name(name)
    if resolved == "tiny-random":
        return dict(zip(SHAPE_FIELDS, (64, 128, 2, 4, 2, 49152, True))), "the built-in tiny-random config"
    try:
        from transformers import AutoConfig

        path = models.embedded_model_dir() if resolved == "smollm2-135m" else resolved
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        return {f: getattr(config, f) for f in SHAPE_FIELDS}, f"config of {path}"
    except Exception:  # not local: the table below, never the network (a dry run must answer in seconds)
        pass
    key = resolved.split("/")[-1].lower().replace("meta-", "")
    key = re.sub(r"^llama-?3(\.\d)?-", "llama-3-", key)
    for family, shape in MODEL_SHAPES.items():
        if key == family or key.startswith(family + "-"):
            return dict(zip(SHAPE_FIELDS, shape)), f"built-in table ({family}; no config found locally)"
    return None, f"no local config for {resolved} and not in the built-in table ({', '.join(MODEL_SHAPES)})"


def parameter_count(shape: dict) -> int:
    h, i, layers, heads, kv_heads, vocab, tied = (shape[f] for f in SHAPE_FIELDS)
    kv = h // heads * kv_heads
    block = h * h * 2 + h * kv * 2 + (h + 2 * kv) + 3 * h * i + 2 * h  # q, o; k, v; q/k/v biases (Qwen); MLP; norms
    return vocab * h * (1 if tied else 2) + layers * block + h


# A 80 GB and a 141 GB card (H100, H200) in GiB, the units of the memory plan.
GPU_GIB = {"80 GB": 79.6, "141 GB": 140.4}


@dataclass
class Workload:
    """What a training script holds in memory besides the model and its optimizer, for the --dry-run plan:
    each script states its own."""

    rows: int  # sequences per forward/backward pass per process
    max_new_tokens: int  # completion tokens per sequence
    max_item_tokens: int  # the item's token budget in the prompt
    reference: bool = False  # a frozen reference policy is kept whole
    prompts_per_step: int = 0  # RL: prompts per step, over all processes (0: no rollouts)
    group_size: int = 0  # RL: completions sampled per prompt
    gen_batch_size: int = 0  # RL: prompts per generation forward pass
    vllm_gpu_memory: float | None = None  # RL with --vllm: the engine's share of GPU memory


def memory_plan(
    workload: Workload, shape: dict, world: int, strategy: str, precision: str, checkpointing: bool
) -> list[tuple[str, float, str]]:
    """Estimated GiB per GPU: (item, GiB, phase) with phase static | generation | training. An estimate:
    activations count the tensors a Llama/Qwen block keeps for backward (bf16), logits in fp32 as
    token_logprobs makes them; allocator fragmentation and NCCL buffers are a flat 3 GiB."""
    GiB = 2**30
    h, i, layers, heads, kv_heads, vocab, tied = (shape[f] for f in SHAPE_FIELDS)
    kv = h // heads * kv_heads
    n = parameter_count(shape)
    shard = world if strategy == "fsdp" else 1
    compute = 2 if precision == "bf16" else 4
    rows, completion = workload.rows, workload.max_new_tokens
    seq = 350 + workload.max_item_tokens + completion  # system prompt + item budget + completion
    per_layer = rows * seq * (8 * h + 2 * kv + 4 * i) * compute  # block tensors saved for backward
    activations = rows * seq * h * compute * layers + per_layer if checkpointing else per_layer * layers
    plan = [
        (f"parameters fp32 (1/{shard} shard)" if shard > 1 else "parameters fp32", 4 * n / shard / GiB, "static"),
        (f"AdamW states fp32 (1/{shard} shard)" if shard > 1 else "AdamW states fp32", 8 * n / shard / GiB, "static"),
    ]
    vllm = workload.vllm_gpu_memory is not None
    if vllm:
        plan.append(
            (
                f"vLLM engine share (--vllm-gpu-memory {workload.vllm_gpu_memory}) of an 80 GB card",
                workload.vllm_gpu_memory * GPU_GIB["80 GB"],
                "static",
            )
        )
    elif strategy == "fsdp" and workload.group_size:
        plan.append(
            (
                "rollout inference copy, whole, bf16" if compute == 2 else "rollout inference copy, whole, fp32",
                compute * n / GiB,
                "static",
            )
        )
    if workload.reference:
        plan.append(("reference policy, whole (--beta > 0)", compute * n / GiB, "static"))
    if workload.group_size and not vllm:
        gen_rows = min(workload.gen_batch_size, max(1, workload.prompts_per_step // world)) * workload.group_size
        plan.append(
            (
                f"rollout KV cache ({gen_rows} rows x {seq} tokens)",
                gen_rows * seq * layers * 2 * kv * compute / GiB,
                "generation",
            )
        )
        plan.append(("rollout sampling logits fp32", gen_rows * vocab * 4 * 3 / GiB, "generation"))
    plan.append(
        (
            f"gradients fp32 (1/{shard} shard: reduce-scattered after every micro-batch)"
            if shard > 1
            else "gradients fp32",
            4 * n / shard / GiB,
            "training",
        )
    )
    if strategy == "ddp":  # param.grad and DDP's buckets are two copies (gradient_as_bucket_view is off)
        plan.append(("DDP all-reduce buckets fp32 (a second copy of the gradients)", 4 * n / GiB, "training"))
    if strategy == "fsdp":
        root = vocab * h * (1 if tied else 2) + h
        # a unit's gradients are whole until its reduce-scatter, in the compute dtype plus an fp32 copy to reduce;
        # the root unit (embeddings, head) reduces only when the whole backward has finished
        reduce_bytes = compute + (4 if compute != 4 else 0)
        plan.append(
            (
                "FSDP whole gradients until their reduce-scatter (embeddings/head + 1 block)",
                reduce_bytes * (root + (n - root) / layers) / GiB,
                "training",
            )
        )
        plan.append(
            (
                "FSDP gathered units bf16 (embeddings/head + 2 blocks)"
                if compute == 2
                else "FSDP gathered units fp32 (embeddings/head + 2 blocks)",
                compute * (root + 2 * (n - root) / layers) / GiB,
                "training",
            )
        )
    plan.append(
        (
            f"activations ({rows} seqs x {seq} tokens, checkpointing {'on' if checkpointing else 'off'})",
            activations / GiB,
            "training",
        )
    )
    plan.append(
        (
            f"completion logits fp32 + grad ({rows} x {completion + 1} x {vocab})",
            rows * (completion + 1) * vocab * (compute + 8) / GiB,
            "training",
        )
    )
    plan.append(("CUDA context, NCCL, allocator slack", 3.0, "static"))
    return plan


def host_ram_lines(workload: Workload, shape: dict, world: int, strategy: str) -> list[str]:
    """Host RAM per process when the model is loaded, saved and exported (docs/SCALING.md, measured at small
    scale by benchmarks/checkpoint_memory.py): under FSDP only rank 0 reads the weights, unless the script uses
    the unprepared policy whole on every rank (a reference copy, DPO)."""
    GiB = 2**30
    whole = 4 * parameter_count(shape) / GiB
    largest = 4 * shape["vocab_size"] * shape["hidden_size"] / GiB  # the embedding
    if strategy != "fsdp":
        return [f"  host RAM   start load: every process reads the whole model, {whole:.1f} GiB"]
    readers = (
        f"every rank, {whole * world:.0f} GiB per node"
        if workload.reference
        else "rank 0 only, the others build it empty"
    )
    return [
        f"  host RAM   start load: {whole:.1f} GiB ({readers}); prepare puts each rank's shard on its GPU",
        "  host RAM   step checkpoint: < 1 GiB per rank (each writes its own shard, one tensor at a time); "
        "resume: < 1 GiB (each reads its own)",
        f"  host RAM   final export (once): rank 0 <= 2 x the largest parameter, {2 * largest:.1f} GiB",
    ]
