"""The decode step of `rollouts.generate` for Llama-family models, and its compiled CPU kernels.

`decode_step` runs one token per row through the model's own modules with a hand-written attention over
a grouped KV cache (`GroupedKV`: each prompt's keys once for its group of samples). On CPU in fp32 the
projections, the attention, whole decoder layers and the sampler run as compiled ops from
cpu_decode.cpp beside this file (torch builds it on first use); anywhere else, or with
AGRL_CPU_KERNEL=0, the same arithmetic runs as plain torch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

FAST_DECODE_MODELS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


def fast_decoder_supports(model, length: int) -> bool:
    """Whether `decode_step` can run this model: a plain Llama-family decoder (the architectures above,
    unwrapped layers, full attention over `length` tokens). Anything else decodes through model(...)."""
    if type(model).__name__ not in FAST_DECODE_MODELS:
        return False
    config, layers = model.config, model.model.layers
    window = getattr(config, "sliding_window", None)
    return (
        all(type(layer).__name__.endswith("DecoderLayer") for layer in layers)
        and (window is None or window >= length)
        and all(t == "full_attention" for t in (getattr(config, "layer_types", None) or ["full_attention"]))
    )


class GroupedKV:
    """The decode step's KV cache: each prompt's keys/values once for its group of samples, and a
    preallocated block for the tokens each row generates (written in place, never grown or copied).

    prompt_k[l]: [prompts, kv_heads, prompt_len, head_dim], prompt_bias: [prompts, 1, 1, prompt_len]
    (0 or -inf for left padding), gen_k[l]: [rows, kv_heads, max_new_tokens, head_dim]; row r belongs to
    prompt r // group.
    """

    def __init__(self, cache, mask: torch.Tensor, group: int, rows: int, max_new_tokens: int):
        self.group, self.rows = group, rows
        self.prompt_k = [layer.keys for layer in cache.layers]
        self.prompt_v = [layer.values for layer in cache.layers]
        k = self.prompt_k[0]
        self.prompt_bias = torch.zeros(mask.shape, dtype=torch.float32, device=k.device).masked_fill_(
            mask == 0, -float("inf")
        )[:, None, None, :]
        shape = (rows, k.shape[1], max_new_tokens, k.shape[3])
        self.gen_k = [torch.empty(shape, dtype=k.dtype, device=k.device) for _ in self.prompt_k]
        self.gen_v = [torch.empty(shape, dtype=k.dtype, device=k.device) for _ in self.prompt_k]
        self.compiled_layers = None  # decode_step's per-layer arguments of the compiled decode_layer, gathered once


# The CPU decode step's matmuls and attention: a few rows against every weight, a shape at which MKL's
# sgemm runs far below its large-matmul rate, and small batched attention products. cpu_decode.cpp does
# both near that rate, and a whole decoder layer and the sampler in one call each, where torch spends
# more on per-op overhead than on the arithmetic of a 16-row step (the measurements: benchmarks/README.md).
# torch builds it on first use, then keeps it in ~/.cache/torch_extensions. AGRL_CPU_KERNEL=0 turns it off;
# without a C++ compiler it is off too, and the same arithmetic runs as plain torch.
SKINNY_MAX_ROWS = 128  # faster than MKL up to here (benchmarks/README.md); one pass over W per 32 rows


def cxx_compiler() -> str | None:
    """The C++ compiler torch's extension builder would call ($CXX, else c++), or None where there is none."""
    return shutil.which(os.environ.get("CXX", "c++"))


CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def build_name(source: Path, compiler: str) -> str:
    """The kernels' name in torch's extension cache: the CPU's vector width, then a digest of the source's
    content and of the toolchain (compiler version, torch, flags). Any number of clones with the same source
    share one build; a changed source, compiler or torch builds once under its own name, and never evicts
    another checkout's build (a name alone made two clones rebuild each other's)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256()
    for part in (source.read_bytes(), version.encode(), torch.__version__.encode(), " ".join(CFLAGS).encode()):
        key.update(part)
    return f"agrl_cpu_decode_{torch.backends.cpu.get_cpu_capability().lower()}_{key.hexdigest()[:12]}"


@functools.cache
def cpu_decode_ops():
    """torch.ops.agrl (`skinny_linear`, `grouped_attention`, `decode_layer`, `gumbel_sample`) compiled, or
    None (said once) where they cannot be."""
    if os.environ.get("AGRL_CPU_KERNEL", "1") == "0":
        return None
    if cxx_compiler() is None:
        print(
            f"warning: no C++ compiler ({os.environ.get('CXX', 'c++')} is not on PATH) to build the CPU decode kernels; "
            "decoding with plain torch (about a third of the speed)",
            file=sys.stderr,
        )
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        if (
            shutil.which("ninja") is None
        ):  # pip's ninja (requirements.txt) sits beside the interpreter of a venv not activated
            os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        # -march=native: the name carries the CPU's vector width, so a shared cache never serves another machine's build
        source = Path(__file__).resolve().with_name("cpu_decode.cpp")
        name = build_name(source, cxx_compiler())
        built = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
        if built.exists():  # any clone's or venv's build of this source and toolchain (the name says so): no rebuild
            with contextlib.suppress(OSError):  # (torch's own check would rebuild: its build file names venv paths)
                torch.ops.load_library(str(built))
                return torch.ops.agrl
        load(name=name, sources=[str(source)], extra_cflags=CFLAGS, is_python_module=False, verbose=False)
        return torch.ops.agrl
    except Exception as e:  # a failed build, no ninja, a read-only cache: the decode still runs, slower
        print(
            f"warning: the CPU decode kernels could not be built ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "decoding with plain torch (about a third of the speed)",
            file=sys.stderr,
        )
        return None


def ops_for(x: torch.Tensor):
    """The compiled ops where they apply to `x` (float32 on CPU, no autograd), else None."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled():
        return cpu_decode_ops()
    return None


def decode_linear(x: torch.Tensor, linear: torch.nn.Module) -> torch.Tensor:
    """`linear(x)` for the decode step: the skinny kernel for a plain fp32 nn.Linear on CPU, else the module."""
    ops = ops_for(x) if type(linear) is torch.nn.Linear and x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS else None
    if ops is not None and linear.weight.dtype == torch.float32:
        return ops.skinny_linear(x, linear.weight, linear.bias)
    return linear(x)


def _attend(q: torch.Tensor, kv: GroupedKV, layer: int, t: int, scaling: float) -> torch.Tensor:
    """Attention of each row's new query [rows, heads, head_dim] over its prompt and its own t+1 new tokens.

    The prompt's keys are read once per group: a group's queries are stacked into one matmul against
    them (as grouped-query attention stacks a KV head's query heads), so a group of 8 samples costs one
    pass over the prompt cache instead of eight copies of it. On CPU in fp32 the compiled
    `grouped_attention` does the same (tested equal to the torch lines below, which run everywhere else).
    """
    rows, heads, dim = q.shape
    ops = ops_for(q) if dim % 16 == 0 else None
    if ops is not None:  # the same arithmetic, compiled (cpu_decode.cpp)
        return ops.grouped_attention(
            q,
            kv.prompt_k[layer],
            kv.prompt_v[layer],
            kv.prompt_bias.view(len(kv.prompt_bias), -1),
            kv.gen_k[layer],
            kv.gen_v[layer],
            t,
            scaling,
        )
    prompts, kv_heads = kv.prompt_k[layer].shape[:2]
    rep, group = heads // kv_heads, kv.group
    # [prompts, kv_heads, group * rep, dim]: the group's rows side by side for each KV head
    stacked = q.view(prompts, group, kv_heads, rep, dim).transpose(1, 2).reshape(prompts, kv_heads, group * rep, dim)
    s_prompt = torch.matmul(stacked, kv.prompt_k[layer].transpose(-1, -2)).float() * scaling + kv.prompt_bias
    per_row = q.view(rows, kv_heads, rep, dim)
    s_new = torch.matmul(per_row, kv.gen_k[layer][:, :, : t + 1].transpose(-1, -2)).float() * scaling
    # one softmax over [prompt | new tokens], the prompt part back in the stacked layout
    s_prompt = s_prompt.view(prompts, kv_heads, group, rep, -1).transpose(1, 2).reshape(rows, kv_heads, rep, -1)
    probs = torch.softmax(torch.cat([s_prompt, s_new], -1), dim=-1).to(q.dtype)
    width = s_prompt.shape[-1]
    p_prompt = (
        probs[..., :width]
        .view(prompts, group, kv_heads, rep, width)
        .transpose(1, 2)
        .reshape(prompts, kv_heads, group * rep, width)
    )
    out = torch.matmul(p_prompt, kv.prompt_v[layer]).view(prompts, kv_heads, group, rep, dim).transpose(1, 2)
    out = out.reshape(rows, kv_heads, rep, dim) + torch.matmul(probs[..., width:], kv.gen_v[layer][:, :, : t + 1])
    return out.reshape(rows, heads * dim)


def _mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP of Llama-family layers, down(act(gate(x)) * up(x)), through `decode_linear`."""
    if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return mlp(x)
    return decode_linear(mlp.act_fn(decode_linear(x, mlp.gate_proj)) * decode_linear(x, mlp.up_proj), mlp.down_proj)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (HF's rotate-half layout) of [rows, heads, head_dim] at one position per row."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _compiled_layer_weights(model, layer) -> tuple[list, list[float]] | None:
    """The tensors and norm epsilons `decode_layer` (cpu_decode.cpp) takes for this layer, or None where
    it does not apply: another activation or norm, a projection that is not a plain fp32 nn.Linear (LoRA)."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    qk_norms = (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else ()  # Qwen3
    norms = (layer.input_layernorm, layer.post_attention_layernorm) + qk_norms
    if (
        getattr(model.config, "hidden_act", None) != "silu"
        or attn.head_dim % 16
        or any(type(m) is not torch.nn.Linear or m.weight.dtype != torch.float32 for m in linears)
        or any(not type(m).__name__.endswith("RMSNorm") or not hasattr(m, "variance_epsilon") for m in norms)
    ):
        return None
    q_norm, k_norm = (m.weight for m in qk_norms) if qk_norms else (None, None)
    weights = [
        layer.input_layernorm.weight,
        attn.q_proj.weight,
        attn.q_proj.bias,
        attn.k_proj.weight,
        attn.k_proj.bias,
        attn.v_proj.weight,
        attn.v_proj.bias,
        q_norm,
        k_norm,
        attn.o_proj.weight,
        attn.o_proj.bias,
        layer.post_attention_layernorm.weight,
        mlp.gate_proj.weight,
        mlp.gate_proj.bias,
        mlp.up_proj.weight,
        mlp.up_proj.bias,
        mlp.down_proj.weight,
        mlp.down_proj.bias,
    ]
    eps = [
        layer.input_layernorm.variance_epsilon,
        qk_norms[0].variance_epsilon if qk_norms else 0.0,
        layer.post_attention_layernorm.variance_epsilon,
    ]
    return weights, eps


def decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, kv: GroupedKV, t: int) -> torch.Tensor:
    """One token per row through a Llama-family decoder: the last hidden state [rows, hidden] (before the LM head).

    The model's own modules (norms, projections, MLP, rotary table) with a hand-written attention over
    `GroupedKV`, the projections through `decode_linear`: the same arithmetic as the HF forward, without
    its per-call overhead or cache copies (fp32: equal to it within 1e-4 in log-prob, tested; under bf16
    autocast the two round differently, as the HF decode and training forwards already do, and a sample
    can flip at a bf16 near-tie). On CPU in fp32 each layer is one compiled `decode_layer` call, the lines
    of the loop below in C++ (tested equal to them).
    """
    inner = model.model
    x = inner.embed_tokens(tokens)
    cos, sin = inner.rotary_emb(x, positions[:, None])  # [rows, 1, head_dim]: broadcasts over heads
    rows = tokens.shape[0]
    ops = ops_for(x) if rows <= SKINNY_MAX_ROWS else None
    if ops is not None:
        if kv.compiled_layers is None:  # once per generation: the module lookups cost more than a layer's call
            kv.compiled_layers = [_compiled_layer_weights(model, layer) for layer in inner.layers]
        cos_2d, sin_2d, bias_2d = cos.view(rows, -1), sin.view(rows, -1), kv.prompt_bias.view(len(kv.prompt_bias), -1)
    for i, layer in enumerate(inner.layers):
        compiled = kv.compiled_layers[i] if ops is not None else None
        if compiled is not None:  # x updated in place
            ops.decode_layer(
                x,
                *compiled,
                cos_2d,
                sin_2d,
                kv.prompt_k[i],
                kv.prompt_v[i],
                bias_2d,
                kv.gen_k[i],
                kv.gen_v[i],
                t,
                layer.self_attn.scaling,
            )
            continue
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        dim = attn.head_dim
        q = decode_linear(h, attn.q_proj).view(rows, -1, dim)
        k = decode_linear(h, attn.k_proj).view(rows, -1, dim)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm of each head's query and key
            q, k = attn.q_norm(q), attn.k_norm(k)
        kv.gen_k[i][:, :, t] = _rotate(k, cos, sin)
        kv.gen_v[i][:, :, t] = decode_linear(h, attn.v_proj).view(rows, -1, dim)
        x = x + decode_linear(_attend(_rotate(q, cos, sin), kv, i, t, attn.scaling), attn.o_proj)
        x = x + _mlp(layer.mlp, layer.post_attention_layernorm(x))
    return inner.norm(x)
