"""Speed and memory of grpo.py / sft.py against Hugging Face TRL's GRPOTrainer / SFTTrainer at equal work.

    pip install -r benchmarks/requirements-trl.txt        # a separate venv (see that file)
    python benchmarks/bench_trl.py --config cpu            # embedded SmolLM2-135M on this CPU, ESCI prompts
    python benchmarks/bench_trl.py --config gpu            # Qwen2.5-0.5B-shaped random model on one GPU
    python benchmarks/bench_trl.py --config tiny           # seconds: the plumbing, on tiny-random + synthetic
    python benchmarks/bench_trl.py --task perflog          # the micro-measurements of the README's performance log

Not a test: a benchmark. Each side runs in its own subprocess (this file re-invoked with --side ours|trl),
so the peak resident memory is per side; the sides alternate (ours, trl, ours, trl, ...) for --repeats
rounds, each child running --steps steps of which the first is warm-up and not measured. Equal work:
the same model weights, the same prompts in the same order (grpo.py's / sft.py's seeded stream), the
same token ids (checked), group size, prompts per step, a fixed completion length (min = max new
tokens on both sides), beta 0, one optimizer update per generation batch, the same micro-batch size,
fp32 on CPU and no gradient checkpointing on either side (TRL's default turns it on; --trl-gradient-checkpointing).
Writes results/bench-trl-<config>.md and .json (repo root).
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MARK = "BENCH_RESULT "

CONFIGS = {
    # The acceptance configuration: the embedded model on a 2-core CPU, ESCI-length prompts (~520 tokens).
    "cpu": dict(
        model="smollm2-135m",
        device="cpu",
        dataset="esci",
        prompts_per_step=2,
        group_size=8,
        max_new_tokens=64,
        micro_batch_size=8,
        sft_batch_size=8,
        matmul_size=2048,
    ),
    # A Qwen2.5-0.5B-shaped random model (SmolLM2 tokenizer: no Qwen tokenizer offline) on one GPU, bf16.
    "gpu": dict(
        model="qwen2.5-0.5b-shaped",
        device="cuda",
        dataset="esci",
        prompts_per_step=8,
        group_size=8,
        max_new_tokens=256,
        micro_batch_size=8,
        sft_batch_size=8,
        matmul_size=8192,
    ),
    # Smoke configuration: the plumbing in seconds (tiny-random model, synthetic data). Numbers mean little.
    "tiny": dict(
        model="tiny-random",
        device="cpu",
        dataset="synthetic",
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=16,
        micro_batch_size=4,
        sft_batch_size=4,
        matmul_size=512,
    ),
}


@dataclass
class Args:
    config: Literal["cpu", "gpu", "tiny"] = "cpu"
    """cpu: embedded model on CPU (acceptance); gpu: Qwen2.5-0.5B-shaped random model on CUDA; tiny: smoke run"""
    task: Literal["all", "grpo", "sft", "perflog"] = "all"
    """grpo, sft, both, or the README's performance-log micro-measurements"""
    repeats: int = 2
    """rounds of (ours, trl) per task, alternating"""
    steps: int = 3
    """steps per child process; the first is warm-up and excluded"""
    data_path: str = "/work/shared/data/esci"
    """ESCI folder (train.jsonl, dev.jsonl); synthetic prompts are used when it is missing"""
    sides: tuple[str, ...] = ("ours", "trl")
    """which sides to run (both for a ratio)"""
    trl_gradient_checkpointing: bool = False
    """TRL's own default (True) recomputes activations: less memory, more work; off here for equal work"""
    results_dir: str = "results"
    """where bench-trl-<config>.md/.json go (relative to the repo root)"""
    child_timeout: int = 3600
    """seconds before a child is killed"""
    # --- internal: set by the parent when it re-invokes this file --------------------------------
    side: Literal["parent", "ours", "trl"] = "parent"
    """(internal) which side this process runs"""
    model_dir: str | None = None
    """(internal) directory of the gpu config's random model"""
    work_dir: str | None = None
    """(internal) scratch folder of a child"""


# ==================================================================================================
# Shared setup: the model name, the prompts in grpo.py's / sft.py's stream order
# ==================================================================================================
def config_of(args: Args) -> dict:
    cfg = dict(CONFIGS[args.config])
    if cfg["dataset"] == "esci" and not (Path(args.data_path) / "train.jsonl").exists():
        print(f"[bench] no ESCI data at {args.data_path}: using synthetic prompts", file=sys.stderr)
        cfg["dataset"] = "synthetic"
    cfg["data_path"] = args.data_path if cfg["dataset"] == "esci" else None
    return cfg


def model_name(args: Args, cfg: dict) -> str:
    return args.model_dir if cfg["model"] == "qwen2.5-0.5b-shaped" else cfg["model"]


def stream_indices(n_examples: int, count: int, seed: int = 1) -> list[int]:
    """The first `count` example indices of grpo.py's / sft.py's shuffled stream (epoch = position // n)."""
    out = []
    for position in range(count):
        order = list(range(n_examples))
        random.Random(seed * 1000 + position // n_examples).shuffle(order)
        out.append(order[position % n_examples])
    return out


def prompt_messages(tokenizer, example, rulebook, order: str = "label_first", max_item_tokens: int = 256) -> list[dict]:
    """data.encode_prompt's chat messages (item text cut at the token budget), for a trainer that templates itself."""
    import data as D

    text = D.item_text(example)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) > max_item_tokens:
        text = tokenizer.decode(ids[:max_item_tokens]) + " ..."
    return D.build_messages(example, rulebook, order, item_text=text)


def make_gpu_model(folder: Path) -> None:
    """Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, tied embeddings), random
    weights, the SmolLM2 tokenizer (vocabulary 49152 instead of Qwen's 151936: no Qwen tokenizer offline)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from helpers import models

    tokenizer = models.embedded_tokenizer()
    config = Qwen2Config(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def load_tokenizer(args: Args, cfg: dict):
    """The tokenizer alone (the ours-side child must not hold a second copy of the model)."""
    from helpers import models

    if cfg["model"] in ("smollm2-135m", "tiny-random"):
        return models.embedded_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_name(args, cfg))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class RssSampler:
    """Resident memory every 0.2 s, so the peak of the training steps can be told from loading, eval and saving."""

    def __init__(self):
        import threading

        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            with open("/proc/self/status") as f:
                kib = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            self.samples.append((time.time(), kib / 2**20))
            self.stop.wait(0.2)

    def peak_between(self, start: float, end: float) -> float | None:
        inside = [gib for t, gib in self.samples if start <= t <= end]
        return max(inside) if inside else None


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


def report(result: dict) -> None:
    result["peak_rss_gib"] = peak_rss_gib()  # the whole child: loading, steps, (ours) final eval and checkpoint
    print(MARK + json.dumps(result), flush=True)


# ==================================================================================================
# GRPO: ours (grpo.main) and TRL (GRPOTrainer)
# ==================================================================================================
def grpo_prompts(args: Args, cfg: dict, tokenizer):
    import data as D

    dataset = D.load_dataset(cfg["dataset"], "train", cfg["data_path"], seed=1)
    picks = stream_indices(len(dataset.examples), args.steps * cfg["prompts_per_step"])
    prompt_ids = [D.encode_prompt(tokenizer, dataset.examples[i], dataset.rulebook)[0] for i in picks]
    return dataset, picks, prompt_ids


def ours_grpo(args: Args, cfg: dict) -> dict:
    import grpo

    work = Path(args.work_dir)
    run = grpo.Args(
        model=model_name(args, cfg),
        dataset=cfg["dataset"],
        data_path=cfg["data_path"],
        prompts_per_step=cfg["prompts_per_step"],
        group_size=cfg["group_size"],
        max_new_tokens=cfg["max_new_tokens"],
        min_new_tokens=cfg["max_new_tokens"],
        beta=0.0,
        num_updates_per_batch=1,
        dynamic_sampling=False,
        temperature=1.0,
        top_p=1.0,
        lr=1e-6,
        micro_batch_size=cfg["micro_batch_size"],
        gen_batch_size=16,
        total_steps=args.steps,
        eval_limit=1,
        device=cfg["device"],
        seed=1,
        output_dir=str(work),
        run_name="ours",
        save_every=10**9,
        log_samples_every=10**9,
    )
    sampler = RssSampler()
    grpo.main(run)
    sampler.stop.set()
    rows = [json.loads(line) for line in (work / "ours" / "metrics.jsonl").read_text().splitlines()]
    steps_end = (work / "ours" / "metrics.jsonl").stat().st_mtime  # the last step's metrics line
    steps_start = steps_end - sum(r["step_seconds"] for r in rows)
    _, _, prompt_ids = grpo_prompts(args, cfg, load_tokenizer(args, cfg))
    G, P, T = cfg["group_size"], cfg["prompts_per_step"], cfg["max_new_tokens"]
    steps = []
    for k, r in enumerate(rows):
        completion_tokens = round(r["completion_len_mean"] * P * G)
        prompts = prompt_ids[k * P : (k + 1) * P]
        steps.append(
            dict(
                step_seconds=r["step_seconds"],
                generation_seconds=r["time_generation"] + r["time_scoring"],
                training_seconds=r["time_training"],
                generated_tokens=completion_tokens,
                trained_tokens=completion_tokens,
                sequence_tokens=G * sum(map(len, prompts)) + completion_tokens,
                # what grpo.py executes with a group's prompt run once (shared prefix, group = micro-batch)
                executed_tokens=sum(len(p) - 1 + G * (1 + T) for p in prompts),
                groups=r["groups_kept"],
            )
        )
    return dict(steps=steps, rss_steps_gib=sampler.peak_between(steps_start, steps_end))


def trl_grpo(args: Args, cfg: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import rewards as R
    from helpers import models

    model, tokenizer = models.load_model(model_name(args, cfg), cfg["device"])
    dataset, picks, prompt_ids = grpo_prompts(args, cfg, tokenizer)
    examples, rulebook = dataset.examples, dataset.rulebook
    messages = [prompt_messages(tokenizer, examples[i], rulebook) for i in picks]
    G, P, T, mb = cfg["group_size"], cfg["prompts_per_step"], cfg["max_new_tokens"], cfg["micro_batch_size"]

    def outcome(prompts, completions, example_index, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [
            R.score_output(t, examples[i].label, examples[i].criteria, rulebook).outcome
            for t, i in zip(texts, example_index)
        ]

    config = GRPOConfig(
        output_dir=str(Path(args.work_dir) / "trl"),
        num_generations=G,
        per_device_train_batch_size=mb,
        gradient_accumulation_steps=P * G // mb,  # -> generation_batch_size = P*G, steps_per_generation = P*G/mb
        max_completion_length=T,
        generation_kwargs={"min_new_tokens": T},
        beta=0.0,
        num_iterations=1,
        temperature=1.0,
        top_p=1.0,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=args.steps,
        use_cpu=cfg["device"] == "cpu",
        bf16=False,
        gradient_checkpointing=args.trl_gradient_checkpointing,
        shuffle_dataset=False,
        seed=1,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    train = Dataset.from_list([dict(prompt=m, example_index=i) for m, i in zip(messages, picks)])
    timing = dict(steps=[], generation=[], tokens=[], prompts=[])

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if device_sync:
                device_sync()
            timing["t0"] = time.perf_counter()
            timing["gen"] = 0.0

        def on_step_end(self, *_, **__):
            if device_sync:
                device_sync()
            timing["steps"].append(time.perf_counter() - timing["t0"])
            timing["generation"].append(timing["gen"])
            timing["last_end"] = time.time()

    device_sync = torch.cuda.synchronize if cfg["device"].startswith("cuda") else None
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[outcome],
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    generate_and_score, tokenize = trainer._generate_and_score_completions, trainer._tokenize_prompts

    def timed_generate_and_score(inputs):  # generation + decoding + rewards (grpo.py's time_generation covers the same)
        t0 = time.perf_counter()
        out = generate_and_score(inputs)
        if device_sync:
            device_sync()
        timing["gen"] += time.perf_counter() - t0
        timing["tokens"].append(int(out["completion_mask"].sum()))
        return out

    def checked_tokenize(prompts):
        out = tokenize(prompts)
        timing["prompts"].append([list(ids) for ids in out[0]])
        return out

    trainer._generate_and_score_completions, trainer._tokenize_prompts = timed_generate_and_score, checked_tokenize
    sampler = RssSampler()
    steps_start = time.time()
    trainer.train()
    sampler.stop.set()
    # equal work: TRL saw exactly grpo.py's prompt token ids, G copies each, and generated P*G*T tokens per step
    for k, seen in enumerate(timing["prompts"]):
        expected = [ids for ids in prompt_ids[k * P : (k + 1) * P] for _ in range(G)]
        if seen != expected:
            raise AssertionError(f"step {k + 1}: TRL's prompt token ids differ from grpo.py's")
    steps = []
    for k, (seconds, gen, tokens) in enumerate(zip(timing["steps"], timing["generation"], timing["tokens"])):
        prompts = prompt_ids[k * P : (k + 1) * P]
        steps.append(
            dict(
                step_seconds=seconds,
                generation_seconds=gen,
                training_seconds=seconds - gen,
                generated_tokens=tokens,
                trained_tokens=tokens,
                sequence_tokens=G * sum(map(len, prompts)) + tokens,
                executed_tokens=G * sum(map(len, prompts)) + tokens,
                groups=P,
            )
        )
    return dict(
        steps=steps,
        prompt_ids_checked=len(timing["prompts"]),
        rss_steps_gib=sampler.peak_between(steps_start, timing["last_end"]),
    )


# ==================================================================================================
# SFT: ours (sft.main) and TRL (SFTTrainer), the same (prompt, target) token ids in the same order
# ==================================================================================================
def sft_rows(args: Args, cfg: dict, tokenizer):
    import data as D

    dataset = D.load_dataset(cfg["dataset"], "train", cfg["data_path"], seed=1)
    picks = stream_indices(len(dataset.examples), args.steps * cfg["sft_batch_size"])
    encoded = [D.encode_sft(tokenizer, dataset.examples[i], dataset.rulebook) for i in picks]
    return [(ids, [0 if label == -100 else 1 for label in labels]) for ids, labels, _ in encoded]


def ours_sft(args: Args, cfg: dict) -> dict:
    import sft

    work = Path(args.work_dir)
    run = sft.Args(
        model=model_name(args, cfg),
        dataset=cfg["dataset"],
        data_path=cfg["data_path"],
        batch_size=cfg["sft_batch_size"],
        grad_accum=1,
        total_steps=args.steps,
        lr=5e-5,
        log_every=1,
        eval_limit=1,
        device=cfg["device"],
        seed=1,
        output_dir=str(work),
        run_name="ours",
        save_every=10**9,
    )
    sampler = RssSampler()
    sft.main(run)
    sampler.stop.set()
    rows = [json.loads(line) for line in (work / "ours" / "metrics.jsonl").read_text().splitlines()]
    steps_end = (work / "ours" / "metrics.jsonl").stat().st_mtime
    steps_start = steps_end - sum(r["step_seconds"] for r in rows)
    data = sft_rows(args, cfg, load_tokenizer(args, cfg))
    B = cfg["sft_batch_size"]
    steps = []
    for k, r in enumerate(rows):
        batch = data[k * B : (k + 1) * B]
        trained = sum(sum(mask) for _, mask in batch)
        steps.append(
            dict(
                step_seconds=r["step_seconds"],
                training_seconds=r["step_seconds"],
                trained_tokens=trained,
                logged_tokens_per_second=r["tokens_per_second"],
                sequence_tokens=sum(len(ids) for ids, _ in batch),
            )
        )
    return dict(steps=steps, rss_steps_gib=sampler.peak_between(steps_start, steps_end))


def trl_sft(args: Args, cfg: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from helpers import models

    model, tokenizer = models.load_model(model_name(args, cfg), cfg["device"])
    data = sft_rows(args, cfg, tokenizer)
    B = cfg["sft_batch_size"]
    config = SFTConfig(
        output_dir=str(Path(args.work_dir) / "trl"),
        per_device_train_batch_size=B,
        gradient_accumulation_steps=1,
        completion_only_loss=True,
        packing=False,
        padding_free=False,
        max_length=None,
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=args.steps,
        use_cpu=cfg["device"] == "cpu",
        bf16=False,
        gradient_checkpointing=args.trl_gradient_checkpointing,
        shuffle_dataset=False,
        train_sampling_strategy="sequential",
        seed=1,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    # already tokenized: TRL skips its own templating and builds labels (-100 off the completion) from the mask
    train = Dataset.from_dict(dict(input_ids=[ids for ids, _ in data], completion_mask=[m for _, m in data]))
    times, last_end = [], [0.0]
    device_sync = torch.cuda.synchronize if cfg["device"].startswith("cuda") else None

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if device_sync:
                device_sync()
            times.append(-time.perf_counter())

        def on_step_end(self, *_, **__):
            if device_sync:
                device_sync()
            times[-1] += time.perf_counter()
            last_end[0] = time.time()

    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer, callbacks=[Timer()])
    labels = trainer.train_dataset["labels"]
    ids_seen = trainer.train_dataset["input_ids"]
    if [list(x) for x in ids_seen] != [ids for ids, _ in data]:
        raise AssertionError("TRL's SFT input ids differ from sft.py's")
    sampler = RssSampler()
    steps_start = time.time()
    trainer.train()
    sampler.stop.set()
    steps = []
    for k, seconds in enumerate(times):
        batch = range(k * B, (k + 1) * B)
        trained = sum(sum(1 for x in labels[i] if x != -100) for i in batch)
        if trained != sum(sum(data[i][1]) for i in batch):
            raise AssertionError("TRL's SFT labels cover other tokens than sft.py's completion")
        steps.append(
            dict(
                step_seconds=seconds,
                training_seconds=seconds,
                trained_tokens=trained,
                sequence_tokens=sum(len(data[i][0]) for i in batch),
            )
        )
    return dict(steps=steps, rss_steps_gib=sampler.peak_between(steps_start, last_end[0]))


# ==================================================================================================
# The parent: matmul rate, alternating children, the table
# ==================================================================================================
def matmul_rate(device: str, size: int, repeats: int = 5) -> dict:
    """Dense matmul rate of this machine (fp32 on CPU, bf16 on GPU: each config's training dtype), best of `repeats`."""
    import torch

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return dict(
        gflops=2 * size**3 / best / 1e9,
        size=size,
        dtype=str(dtype).replace("torch.", ""),
        threads=torch.get_num_threads(),
    )


def run_child(args: Args, task: str, side: str, model_dir: str | None, log_dir: Path, round_: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{task}-{side}-") as work:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--side",
            side,
            "--task",
            task,
            "--config",
            args.config,
            "--steps",
            str(args.steps),
            "--data-path",
            args.data_path,
            "--work-dir",
            work,
        ]
        if model_dir:
            command += ["--model-dir", model_dir]
        if args.trl_gradient_checkpointing:
            command += ["--trl-gradient-checkpointing"]
        log = log_dir / f"{task}-{side}-{round_}.log"
        print(f"[bench] {task} {side} round {round_ + 1}/{args.repeats} ...", flush=True)
        started = time.time()
        with open(log, "w") as f:
            try:
                code = subprocess.call(
                    command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=args.child_timeout
                )
            except subprocess.TimeoutExpired:
                code = "timeout"
        lines = log.read_text(errors="replace").splitlines()
        found = [json.loads(line[len(MARK) :]) for line in lines if line.startswith(MARK)]
        if code != 0 or not found:
            reason = "killed (out of memory?)" if code in (-9, 137) else f"exit {code}"
            print(f"[bench]   failed: {reason}; last lines of {log}:\n" + "\n".join(lines[-15:]), flush=True)
            return dict(failed=reason)
        result = found[-1]
        print(
            f"[bench]   {time.time() - started:.0f}s wall, steps {[round(s['step_seconds'], 2) for s in result['steps']]}, "
            f"peak RSS {result['peak_rss_gib']:.2f} GiB",
            flush=True,
        )
        return result


def summarise(results: list[dict], params: int) -> dict:
    """Median over the measured steps (warm-up excluded) of every round; peak RSS: the highest round."""
    ok = [r for r in results if "failed" not in r]
    if not ok:
        return dict(failed=results[0]["failed"] if results else "not run")
    measured = [s for r in ok for s in r["steps"][1:]] or [s for r in ok for s in r["steps"]]
    med = lambda key: statistics.median(s[key] for s in measured) if key in measured[0] else None  # noqa: E731
    out = dict(
        step_seconds=med("step_seconds"),
        training_seconds=med("training_seconds"),
        generation_seconds=med("generation_seconds"),
        generated_tokens=med("generated_tokens"),
        trained_tokens=med("trained_tokens"),
        sequence_tokens=med("sequence_tokens"),
        executed_tokens=med("executed_tokens"),
        params=params,
        peak_rss_gib=max(r["peak_rss_gib"] for r in ok),
        peak_rss_each=[r["peak_rss_gib"] for r in ok],
        rss_steps_gib=max((r["rss_steps_gib"] for r in ok if r.get("rss_steps_gib")), default=None),
        step_seconds_all=[round(s["step_seconds"], 3) for r in ok for s in r["steps"]],
        measured_steps=len(measured),
        rounds_failed=len(results) - len(ok),
    )
    if out["generation_seconds"] is not None:
        out["generated_tokens_per_second"] = out["generated_tokens"] / out["generation_seconds"]
    out["trained_tokens_per_second"] = out["trained_tokens"] / out["training_seconds"]
    out["step_tokens_per_second"] = (out["generated_tokens"] or out["trained_tokens"]) / out["step_seconds"]
    # 6 * N * tokens / time: the nominal training FLOPs of the equal work (every token of every trained
    # sequence forward and backward; attention FLOPs left out), over the training time
    out["train_flops_per_second"] = 6 * out["params"] * out["sequence_tokens"] / out["training_seconds"]
    if out["executed_tokens"] is not None:
        out["executed_flops_per_second"] = 6 * out["params"] * out["executed_tokens"] / out["training_seconds"]
    return out


def table(task: str, summary: dict, matmul: dict) -> str:
    ours, trl = summary.get("ours", {}), summary.get("trl", {})
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
    rows = [
        ("median step time (s)", "step_seconds", ".2f", lambda o, t: ratio(t, o)),
        ("generated tok/s (generation + scoring phase)", "generated_tokens_per_second", ".1f", ratio),
        ("trained tok/s (completion tokens / training phase)", "trained_tokens_per_second", ".1f", ratio),
        ("end-to-end tok/s (completion tokens / step)", "step_tokens_per_second", ".1f", ratio),
        ("peak RSS of the process (GiB)", "peak_rss_gib", ".2f", lambda o, t: ratio(o, t)),
        ("peak RSS during the steps (GiB, sampled every 0.2 s)", "rss_steps_gib", ".2f", lambda o, t: ratio(o, t)),
    ]
    lines = [f"### {task.upper()}", "", "| metric | ours | TRL | ours / TRL |", "|---|---|---|---|"]
    for name, key, spec, r in rows:
        if ours.get(key) is None and trl.get(key) is None:
            continue
        lines.append(
            f"| {name} | {f(ours.get(key), spec)} | {f(trl.get(key), spec)} | {r(ours.get(key), trl.get(key))} |"
        )
    for side, s in (("ours", ours), ("TRL", trl)):
        if "failed" in s:
            lines.append(f"| {side} failed | {s['failed']} | | |")
    rate = matmul["gflops"] * 1e9
    for side, s in (("ours", ours), ("TRL", trl)):
        if s.get("train_flops_per_second"):
            extra = ""
            if side == "ours" and s.get("executed_flops_per_second") and s["executed_tokens"] != s["sequence_tokens"]:
                extra = (
                    f"; executed (prompt run once per group): {s['executed_flops_per_second'] / 1e9:.1f} GFLOP/s = "
                    f"{s['executed_flops_per_second'] / rate:.0%}"
                )
            lines.append(
                f"| training FLOP rate, {side} (6·N·T/t) | {s['train_flops_per_second'] / 1e9:.1f} GFLOP/s | "
                f"{s['train_flops_per_second'] / rate:.0%} of matmul{extra} | |"
            )
    return "\n".join(lines)


def acceptance(summary: dict) -> str:
    """The issue's bar: GRPO >= 2x TRL's throughput with peak memory <= TRL's; SFT >= TRL's throughput."""
    lines = ["### Against the acceptance bar", ""]
    grpo, sft = summary.get("grpo", {}), summary.get("sft", {})
    if grpo.get("ours", {}).get("step_seconds") and grpo.get("trl", {}).get("step_seconds"):
        o, t = grpo["ours"], grpo["trl"]
        speed = t["step_seconds"] / o["step_seconds"]
        lines.append(f"- GRPO throughput ours / TRL = {speed:.2f}x (bar: >= 2x): {'met' if speed >= 2 else 'NOT met'}")
        lines.append(
            f"- GRPO peak RSS ours {o['peak_rss_gib']:.2f} GiB vs TRL {t['peak_rss_gib']:.2f} GiB (bar: <=): "
            f"{'met' if o['peak_rss_gib'] <= t['peak_rss_gib'] else 'NOT met'}"
        )
    if sft.get("ours", {}).get("step_seconds") and sft.get("trl", {}).get("step_seconds"):
        speed = sft["trl"]["step_seconds"] / sft["ours"]["step_seconds"]
        lines.append(f"- SFT throughput ours / TRL = {speed:.2f}x (bar: >= 1x): {'met' if speed >= 1 else 'NOT met'}")
    return "\n".join(lines) + "\n"


def parent(args: Args) -> None:
    import signal

    # Stopped from outside: raise, so subprocess.call kills the running child instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg = config_of(args)
    if cfg["device"].startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--config gpu needs a CUDA device")
    tasks = ["grpo", "sft"] if args.task == "all" else [args.task]
    out_dir = ROOT / args.results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix=f"bench-trl-{args.config}-logs-"))
    load_start = os.getloadavg()
    matmul = matmul_rate(cfg["device"], cfg["matmul_size"])
    print(
        f"[bench] matmul {matmul['size']}^3 {matmul['dtype']}: {matmul['gflops']:.1f} GFLOP/s "
        f"({matmul['threads']} threads); child logs in {log_dir}",
        flush=True,
    )
    model_tmp = None
    if cfg["model"] == "qwen2.5-0.5b-shaped":
        model_tmp = tempfile.TemporaryDirectory(prefix="bench-qwen-shaped-")
        make_gpu_model(Path(model_tmp.name))
    from helpers import models

    counted = models.load_model(model_name(args, cfg) if model_tmp is None else model_tmp.name, "cpu")[0]
    params = param_count(counted)
    del counted
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    G, P, T = cfg["group_size"], cfg["prompts_per_step"], cfg["max_new_tokens"]
    raw = {task: {side: [] for side in args.sides} for task in tasks}

    def write(final: bool) -> str:
        """The table and JSON from the rounds finished so far (rewritten after every child: a killed run keeps them)."""
        summary = {
            task: {side: summarise(rs, params) for side, rs in raw[task].items()}
            for task in tasks
            if any(raw[task].values())
        }
        done = {task: {side: len(rs) for side, rs in raw[task].items()} for task in tasks}
        head = [
            f"## TRL comparison, config `{args.config}`" + ("" if final else " (PARTIAL: run still going or killed)"),
            "",
            f"Model {cfg['model']} ({params / 1e6:.1f}M parameters, tied embeddings counted once) on {cfg['device']}, "
            f"{cfg['dataset']} prompts; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}; "
            f"{matmul['threads']} torch threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}).",
            f"GRPO: {P} prompts x {G} completions x {T} tokens (min = max), beta 0, one update per generation batch, "
            f"micro-batch {cfg['micro_batch_size']} on both sides; SFT: one step of {cfg['sft_batch_size']} sequences. "
            f"{args.repeats} rounds alternating ours/TRL, {args.steps} steps each, first step of each round excluded; "
            f"medians over the measured steps. TRL gradient checkpointing: {args.trl_gradient_checkpointing}. "
            f"Rounds finished: {done}.",
            f"Matmul rate: {matmul['gflops']:.1f} GFLOP/s ({matmul['size']}^3 {matmul['dtype']}, best of 5). "
            "FLOP rate = 6 x N x (prompt + completion tokens of the trained sequences) / training time. "
            f"Machine load average (1 min) at start {load_start[0]:.1f}, now {os.getloadavg()[0]:.1f} "
            f"on {os.cpu_count()} CPUs.",
            "",
        ]
        body = [table(task, summary[task], matmul) + "\n" for task in summary]
        body.append(acceptance(summary))
        text = "\n".join(head + body)
        (out_dir / f"bench-trl-{args.config}.md").write_text(text + "\n")
        (out_dir / f"bench-trl-{args.config}.json").write_text(
            json.dumps(
                dict(
                    config=args.config,
                    final=final,
                    settings=cfg,
                    args=asdict(args),
                    matmul=matmul,
                    results=summary,
                    rounds=raw,
                    load_average=dict(start=load_start, now=os.getloadavg()),
                    cpus=os.cpu_count(),
                    versions=dict(torch=torch.__version__, transformers=transformers.__version__, trl=trl_version),
                ),
                indent=2,
            )
        )
        return text

    try:
        for task in tasks:
            for round_ in range(args.repeats):
                for side in args.sides:
                    raw[task][side].append(run_child(args, task, side, model_tmp and model_tmp.name, log_dir, round_))
                    write(final=False)
    finally:
        if model_tmp:
            model_tmp.cleanup()
    print("\n" + write(final=True))
    print(f"\nwrote {out_dir}/bench-trl-{args.config}.md and .json; child logs in {log_dir}")


# ==================================================================================================
# The performance log: micro-measurements of single changes (README, "Performance log")
# ==================================================================================================
def perflog(args: Args) -> None:
    import torch

    import data as D
    import eval as E
    from helpers import models, rollouts

    cfg = config_of(args)
    model, tokenizer = models.load_model(model_name(args, cfg), "cpu")
    dataset = D.load_dataset(cfg["dataset"], "train", cfg["data_path"], seed=1)
    # The two shortest of the stream's first 10 prompts (real ESCI prompts, ~330 tokens): keeps each
    # measurement short on a 2-core CPU; a group of 4 and 8 completion tokens for the same reason.
    first = [
        D.encode_prompt(tokenizer, dataset.examples[i], dataset.rulebook)[0]
        for i in stream_indices(len(dataset.examples), 10)
    ]
    pair = sorted(first, key=len)[:2]
    prompt = pair[0]
    G, C = 4, 8
    gen = torch.Generator().manual_seed(0)
    completions = [torch.randint(0, len(tokenizer) - 1, (C,), generator=gen).tolist() for _ in range(G)]

    def clock(fn, repeats=2):
        """Best of `repeats` (the least disturbed by other processes on a shared machine)."""
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    rows = []

    def add(row):
        rows.append(row)
        print(
            f"[perflog] {row[0]}: without {row[1]:.3f}s, with {row[2]:.3f}s, {row[1] / row[2]:.2f}x ({row[3]})",
            flush=True,
        )

    rollouts.generate(model, tokenizer, [prompt], n=2, max_new_tokens=2)  # warm-up (threads, allocator)
    # (1) shared-prompt prefill in generation
    outs = {}

    def gen_fn(shared):
        def run():
            outs[shared] = rollouts.generate(
                model, tokenizer, [prompt], n=G, max_new_tokens=C, temperature=0.0, shared_prefill=shared
            )

        return run

    t_on, t_off = clock(gen_fn(True)), clock(gen_fn(False))
    same = outs[True].completion_ids == outs[False].completion_ids
    add(("shared-prompt prefill in generation", t_off, t_on, f"greedy tokens identical: {same}"))

    # (2)-(4) one GRPO group through the training pass
    def train_pass(share, recompute=False, full_logits=False):
        def run():
            batch = models.pad_batch([prompt] * G, completions, tokenizer.pad_token_id, "cpu", share)
            if recompute:
                with torch.no_grad():
                    models.token_logprobs(model, batch)
            if full_logits:  # the plain way: logits (and log-softmax) at every position, then the completion slice
                logits = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"],
                ).logits.float()
                logp = torch.log_softmax(logits, -1)[:, -C - 1 : -1].gather(-1, batch["input_ids"][:, -C:, None])
            else:
                logp = models.token_logprobs(model, batch)[0]
            (-logp.sum()).backward()
            model.zero_grad(set_to_none=True)

        return run

    model.train()
    train_pass(True)()  # warm-up
    base = clock(train_pass(True))
    add(
        (
            "behaviour log-probs reused as old log-probs",
            clock(train_pass(True, recompute=True)),
            base,
            "recompute_old_logprobs=True adds one no-grad forward",
        )
    )
    plain = clock(train_pass(False))
    add(("shared-prefix training pass (fwd+bwd)", plain, base, f"group of {G}, prompt {len(prompt)} tokens"))
    add(
        (
            "completion-only logits (logits_to_keep)",
            clock(train_pass(False, full_logits=True)),
            plain,
            "no shared prefix on either side",
        )
    )
    # (6) not in eval.py (a proposed change): the generation prefill asks for the last position's logits only
    width = max(map(len, pair))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in pair])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in pair])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def prefill(keep):
        def run():
            with torch.no_grad():
                return model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=keep
                ).logits[:, -1]

        return run

    model.eval()
    add(
        (
            "(proposed) prefill logits of the last position only",
            clock(prefill(0)),
            clock(prefill(1)),
            f"2 prompts of {list(map(len, pair))} tokens, as grpo.py's prefill; last logits equal: "
            f"{torch.allclose(prefill(0)(), prefill(1)(), atol=1e-4)}",
        )
    )
    model.train()
    # (5) label-only eval vs full generation
    dev = D.load_dataset(cfg["dataset"], "dev", cfg["data_path"], seed=0, limit=4)
    per_s = {}
    for label_only in (True, False):
        metrics, _ = E.evaluate(model, tokenizer, dev.examples, dev.rulebook, max_new_tokens=64, label_only=label_only)
        per_s[label_only] = metrics["examples_per_second"]
    add(
        (
            "label-only eval vs generation (64 new tokens max)",
            1 / per_s[False],
            1 / per_s[True],
            f"{per_s[True]:.2f} vs {per_s[False]:.2f} examples/s",
        )
    )
    lines = ["| change | without (s) | with (s) | measured gain | note |", "|---|---|---|---|---|"]
    for name, without, with_, note in rows:
        lines.append(f"| {name} | {without:.3f} | {with_:.3f} | {without / with_:.2f}x | {note} |")
    text = (
        f"Performance log micro-measurements: {cfg['model']}, {torch.get_num_threads()} threads, prompt "
        f"{len(prompt)} tokens, group {G}, {C} completion tokens\n\n" + "\n".join(lines)
    )
    print(text)
    out = ROOT / args.results_dir / f"bench-perflog-{args.config}-{torch.get_num_threads()}t.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


def child(args: Args) -> None:
    cfg = config_of(args)
    fn = {("grpo", "ours"): ours_grpo, ("grpo", "trl"): trl_grpo, ("sft", "ours"): ours_sft, ("sft", "trl"): trl_sft}
    result = fn[(args.task, args.side)](args, cfg)
    result.update(task=args.task, side=args.side)
    report(result)


if __name__ == "__main__":
    a = tyro.cli(Args)
    if a.task == "perflog":
        perflog(a)
    elif a.side == "parent":
        parent(a)
    else:
        child(a)
