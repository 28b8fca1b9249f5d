"""The GPU check, built for the lent GPU machine as it is: one H200 (~139 GiB), the image's python3 with torch,
transformers and accelerate but no tyro, no .venv and no network; it gets the working tree plus one carried folder
(64 MiB in all), and gives back only what is written under $OUT. No weights travel: every model is random at a
real width, built from a config.

Here (CPU):
    .venv/bin/python benchmarks/gpu_check.py prepare    # build .gpu_check/: tyro's wheels, the SmolLM2 tokenizer
    .venv/bin/python benchmarks/gpu_check.py dry-run    # (or --dry-run) what travels, each step's limit, the run call
There, through the device `run` call that dry-run prints:
    bash benchmarks/gpu_check.sh [STEP ...]            # every step (or those named): $OUT/gpu_check.log, .json

Steps (each a child process, killed at its time limit; each check one JSON object, `ok` true/false, or null
where it only measures):
  versions    python, torch, CUDA, the GPU, transformers, accelerate, the carried tyro
  generation  rollouts.generate against HF generate (greedy, same tokens), shared vs unshared prefill,
              behaviour vs training log-probs, decode speed against HF generate, one bf16 update (1 process)
  fsdp_step   2 steps of agrl.py under `accelerate launch` FSDP2 at world size 1, Qwen2.5-7B's width with as
              many of its layers as the plan fits in 75% of the card: peak memory per phase against the plan
  resume      agrl.py under FSDP: 2 steps, and 1 step then --resume to 2; the resumed run matches the
              uninterrupted one, and the update moved the fp32 master weights
`python benchmarks/gpu_check.py agrl FLAGS` is agrl.py with the check's patches (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data as D  # noqa: E402
from helpers import launch, memory, models, rollouts  # noqa: E402

GiB, MiB = 2**30, 2**20
CARRY = REPO / ".gpu_check"  # gitignored; the run call carries it
WHEELS, TOKENIZER = CARRY / "wheels", CARRY / "tokenizer"
# tyro (pinned in requirements.txt) and what the GPU image lacks of its needs (KINDS.md's package list has
# typing-extensions but no version: typeguard needs >= 4.14, so it travels too).
TYRO_NEEDS = ("docstring-parser", "typeguard", "typing-extensions")
STEPS = {"versions": 45, "generation": 90, "fsdp_step": 180, "resume": 200}  # seconds, each step's limit
STEP_BUDGET = 540  # the steps' limits together (9 of the run's 10 minutes)
TREE_LIMIT = 64 * MiB  # what one device call carries: the working tree + carried paths
OUTPUTS = ("gpu_check.log", "gpu_check.json")  # under $OUT: all that comes back
RUN_CALL = dict(command="bash benchmarks/gpu_check.sh", carry=[".gpu_check"], timeout_s=570)
PLAN_SHARE = 0.75  # the wide model's plan may fill this share of the card; the rest is for what the plan misses
LOG_CAP = 2 * MiB  # per step, in gpu_check.log (a file over 16 MiB would not come back)
MARK = "GPU_CHECK_RUN"  # env marker of every process a step starts: on a timeout those (and only those) are killed


# ==================================================================================================
# Models: random, at real widths, with the carried SmolLM2 tokenizer
# ==================================================================================================
def shapes(tiny: bool, vocab: int) -> dict[str, dict]:
    """generation: Qwen2.5-0.5B's shape with the tokenizer's vocabulary; resume: its first 4 layers; wide:
    Qwen2.5-7B's shape (its layer count cut by the plan). tiny: 2 layers of width 64, for CPU runs here."""
    if tiny:
        small = dict(zip(memory.SHAPE_FIELDS, (64, 128, 2, 4, 2, vocab, True)))
        return dict(generation=small, resume=dict(small), wide=dict(small, tie_word_embeddings=False))
    half = dict(zip(memory.SHAPE_FIELDS, memory.MODEL_SHAPES["qwen2.5-0.5b"]), vocab_size=vocab)
    wide = dict(zip(memory.SHAPE_FIELDS, memory.MODEL_SHAPES["qwen2.5-7b"]))  # Qwen's vocabulary, 152,064
    return dict(generation=half, resume=dict(half, num_hidden_layers=4), wide=wide)


def carried_tokenizer():
    from transformers import AutoTokenizer

    if (TOKENIZER / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(TOKENIZER)
    return models.embedded_tokenizer()  # here, before `prepare`


def qwen_config(shape: dict, tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(
        **shape,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def random_model(config, device: str, dtype: torch.dtype, seed: int = 0):
    """Initialised where it runs (a 7B-wide model initialised on a CPU takes a minute; on the GPU, moments)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def config_only(path: str) -> bool:
    folder = Path(path)
    return (folder / "config.json").exists() and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin"))


def write_model_folder(folder: Path, config, tokenizer, device: str = "cpu", weights: bool = False) -> None:
    """A folder the scripts load: config and tokenizer, and random fp32 weights when asked. Without weights,
    `models.load_model` refuses it; `agrl_driver` builds such a model from its config on the device instead."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if weights:
        random_model(config, device, torch.float32).save_pretrained(folder, safe_serialization=True)


def synthetic_prompts(tokenizer, n: int = 8) -> list[list[int]]:
    dataset = D.load_dataset("synthetic", "dev", seed=0, limit=n)
    return [D.encode_prompt(tokenizer, e, dataset.rulebook, "label_first", 256)[0] for e in dataset.examples]


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    return weights


# ==================================================================================================
# Results: one JSON object per check, appended to the step's results file
# ==================================================================================================
RESULTS: Path | None = None
DEADLINE = float("inf")  # time.monotonic() at which the running step is killed: its children get what is left


def left(at_most: float = float("inf")) -> float:
    return max(1.0, min(at_most, DEADLINE - time.monotonic() - 5))


def record(check: str, ok: bool | None, **values) -> None:
    line = json.dumps(dict(check=check, ok=ok, **values), default=str)
    print(line, flush=True)
    if RESULTS is not None:
        with open(RESULTS, "a") as f:
            f.write(line + "\n")


def cuda_sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ==================================================================================================
# Step: versions
# ==================================================================================================
def versions(device: str, tiny: bool, work: Path) -> None:
    import accelerate
    import transformers

    values = dict(
        python=sys.version.split()[0],
        torch=torch.__version__,
        cuda=torch.version.cuda,
        transformers=transformers.__version__,
        accelerate=accelerate.__version__,
        cuda_available=torch.cuda.is_available(),
    )
    try:
        import tyro

        values["tyro"] = tyro.__version__
    except ImportError as e:
        values["tyro"] = f"missing: {e}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        values.update(
            gpu=props.name, gpu_gib=round(props.total_memory / GiB, 1), capability=f"{props.major}.{props.minor}"
        )
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        query = "--query-gpu=name,memory.total,driver_version"
        values["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    ok = not values["tyro"].startswith("missing") and (values["cuda_available"] or not device.startswith("cuda"))
    record("versions", ok, **values)


# ==================================================================================================
# Step: generation (and the single-process bf16 update)
# ==================================================================================================
def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def greedy_against_hf(model, tokenizer, prompts, device: str, new_tokens: int, tie: float) -> dict:
    """rollouts.generate (greedy) against HF `generate` one prompt at a time. A row that differs is a near tie
    when HF's own top-2 logits at the first differing token are closer than `tie` (two exact computations
    that round differently may pick either); anything else is a wrong token."""
    ours = rollouts.generate(model, tokenizer, prompts, max_new_tokens=new_tokens, temperature=0.0)
    stops, rows = models.stop_token_ids(tokenizer), []
    for prompt, mine in zip(prompts, ours.completion_ids):
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            hf = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(prompt) :].tolist()
        at = first_divergence(mine, hf)
        gap = None
        if at is not None:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + hf[:at]], device=device)).logits[0, -1].float()
            top = logits.topk(2).values
            gap = (top[0] - top[1]).item()
        rows.append(dict(diverges_at=at, top2_gap=gap, tokens=len(mine)))
    equal = sum(r["diverges_at"] is None for r in rows)
    near_tie = sum(r["diverges_at"] is not None and r["top2_gap"] < tie for r in rows)
    return dict(rows=len(rows), equal=equal, near_tie=near_tie, tie_below=tie, per_row=rows)


def decode_speed(model, tokenizer, prompts, device: str, n: int, new_tokens: int) -> dict:
    """Tokens per second of rollouts.generate and of HF `generate` on the same rows (len(prompts) x n, a fixed
    length, temperature 1, no top-k), each after a short warm-up."""
    stops, pad = models.stop_token_ids(tokenizer), tokenizer.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

    def ours(tokens: int):
        seeds = list(range(len(prompts)))
        return rollouts.generate(
            model, tokenizer, prompts, n=n, max_new_tokens=tokens, min_new_tokens=tokens, temperature=1.0, seeds=seeds
        )

    def hf(tokens: int):
        with torch.no_grad():
            return model.generate(
                ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=n,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                eos_token_id=stops,
                pad_token_id=pad,
            )

    seconds = {}
    for name, fn in (("ours", ours), ("hf", hf)):
        fn(4)
        cuda_sync(device)
        start = time.perf_counter()
        fn(new_tokens)
        cuda_sync(device)
        seconds[name] = time.perf_counter() - start
    tokens = len(prompts) * n * new_tokens
    return dict(
        rows=len(prompts) * n,
        new_tokens_each=new_tokens,
        ours_tokens_per_second=tokens / seconds["ours"],
        hf_tokens_per_second=tokens / seconds["hf"],
        speedup=seconds["hf"] / seconds["ours"],
    )


def moved_shares(before: dict, after: dict) -> dict:
    """Shares of the weights an update changed: in fp32 (the master weights), and where the bf16 rounding of
    the weight changed (what a pure-bf16 policy would have kept). `blocks`: the transformer layers only
    (embedding rows of tokens never seen get no gradient)."""
    counts = dict(all=[0, 0, 0], blocks=[0, 0, 0])
    for name, old in before.items():
        if name not in after:  # a tied head saved once on one side
            continue
        new = after[name].float().to(old.device)
        old = old.float()
        for key in ("all", "blocks") if ".layers." in name else ("all",):
            counts[key][0] += (new != old).sum().item()
            counts[key][1] += (new.bfloat16() != old.bfloat16()).sum().item()
            counts[key][2] += old.numel()
    return {f"{key}_{what}": c[i] / max(1, c[2]) for key, c in counts.items() for i, what in ((0, "fp32"), (1, "bf16"))}


def update_ok(shares: dict) -> bool:
    return shares["blocks_fp32"] >= 0.9 and shares["blocks_bf16"] <= 0.2 * shares["blocks_fp32"]


def single_process_update(model, tokenizer, prompts, device: str) -> dict:
    """One agrl.update_policy at lr 1e-6 on the single-process path (accelerate's bf16 mixed precision over fp32
    weights: --precision auto on a GPU, bf16 asked for on a CPU), rows sampled from the model itself."""
    import agrl

    accelerator = launch.make_accelerator(device, "auto", "auto" if device.startswith("cuda") else "bf16")
    # no reference model here (beta 0): the check is the size of one update, not the KL term
    args = agrl.Args(device=device, lr=1e-6, micro_batch_size=8, max_new_tokens=32, group_size=4, beta=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    with accelerator.autocast():
        out = rollouts.generate(
            models.unwrapped(model), tokenizer, prompts[:2], n=4, max_new_tokens=32, temperature=1.0, seeds=[0, 1]
        )
    rows = [
        dict(
            prompt=p,
            completion=c,
            old_logprobs=lp,
            advantages=[1.0 if i % 2 else -1.0] * len(c),
            guided=False,
            forced=0,
        )
        for i, (p, c, lp) in enumerate(zip(out.prompt_ids, out.completion_ids, out.logprobs))
    ]
    before = {k: v.detach().clone() for k, v in models.unwrapped(model).named_parameters()}
    stats, _ = agrl.update_policy(model, None, optimizer, accelerator, tokenizer, rows, args, 0, 0)
    after = {k: v.detach() for k, v in models.unwrapped(model).named_parameters()}
    return dict(lr=args.lr, mixed_precision=accelerator.mixed_precision, grad_norm=stats["grad_norm"]) | moved_shares(
        before, after
    )


def attempt(check: str, fn) -> bool:
    """One check: its exception is its failure (recorded, traceback in the log), and the step goes on."""
    try:
        fn()
        return True
    except Exception as e:
        traceback.print_exc()
        record(check, False, error=f"{type(e).__name__}: {str(e)[:1000]}")
        return False


def generation(device: str, tiny: bool, work: Path) -> None:
    tokenizer = carried_tokenizer()
    shape = shapes(tiny, len(tokenizer))["generation"]
    model = random_model(qwen_config(shape, tokenizer), device, torch.float32).eval()
    prompts = synthetic_prompts(tokenizer)
    new_tokens = 8 if tiny else 32

    def greedy_fp32():
        greedy = greedy_against_hf(model, tokenizer, prompts, device, new_tokens, tie=1e-3)
        record("greedy_vs_hf_fp32", greedy["equal"] + greedy["near_tie"] == greedy["rows"], shape=shape, **greedy)

    def sampling_fp32():
        sampled = [
            rollouts.generate(
                model,
                tokenizer,
                prompts,
                n=4,
                max_new_tokens=new_tokens,
                temperature=1.0,
                seeds=list(range(8)),
                shared_prefill=s,
            )
            for s in (True, False)
        ]
        same = sum(a == b for a, b in zip(sampled[0].completion_ids, sampled[1].completion_ids))
        rows = len(sampled[0].completion_ids)
        record("sampling_shared_vs_unshared_prefill_fp32", same == rows, rows=rows, same_tokens=same)
        batch = models.pad_batch(sampled[0].prompt_ids, sampled[0].completion_ids, tokenizer.pad_token_id, device)
        with torch.no_grad():
            train_logp = models.token_logprobs(model, batch, temperature=1.0)[0]
        behaviour = torch.zeros_like(train_logp)
        for i, lp in enumerate(sampled[0].logprobs):
            behaviour[i, : len(lp)] = torch.tensor(lp)
        gap = (train_logp - behaviour)[batch["completion_mask"].bool()].abs()
        max_abs, mean_abs = gap.max().item(), gap.mean().item()
        record("behaviour_vs_training_logprobs_fp32", max_abs < 2e-3, max_abs=max_abs, mean_abs=mean_abs)

    def bf16():
        model16 = copy.deepcopy(model).to(torch.bfloat16)
        greedy = greedy_against_hf(model16, tokenizer, prompts, device, new_tokens, tie=0.125)
        record("greedy_vs_hf_bf16", None, note="bf16 rounds differently in the two paths: measured only", **greedy)
        speed = decode_speed(model16, tokenizer, prompts, device, n=8, new_tokens=8 if tiny else 128)
        record("decode_speed_bf16", None, shape=shape, **speed)

    def update():  # last: accelerate's prepare wraps the model's forward in autocast
        shares = single_process_update(model, tokenizer, prompts, device)
        record("bf16_update_single_process", update_ok(shares), **shares)

    attempt("greedy_vs_hf_fp32", greedy_fp32)
    attempt("sampling_shared_vs_unshared_prefill_fp32", sampling_fp32)
    attempt("greedy_vs_hf_bf16", bf16)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    attempt("bf16_update_single_process", update)


# ==================================================================================================
# The agrl.py driver: agrl.py itself, with the check's patches, relaunched by its own --num-gpus
# ==================================================================================================
def mixed_score_group(texts, example, rulebook, args):
    """A random model's answers never parse (every reward equal, every advantage 0): instead k = (example number
    mod 5) of a group's answers count as correct, reward 1, the rest 0. Groups are mixed (k = 1-4), so updates
    move the weights, or all wrong (k = 0), so AGR guides them. A function of the data only: resumable."""
    import rewards as R

    k = int(example.source_id.rsplit(":", 1)[1]) % 5
    scores = [R.score_output(t, example.label, example.criteria, rulebook, args.order) for t in texts]
    return [dataclasses.replace(s, correct=j < k) for j, s in enumerate(scores)], [
        float(j < k) for j in range(len(texts))
    ]


class PhaseMemory:
    """Peak GPU memory per phase of the run: each wrapped call (and the time between two) is a segment; at every
    boundary the segment's peak is read and the peak counters reset. Device use = the allocator's reserved
    memory + what the process holds outside it (CUDA context, NCCL), read at the boundary."""

    def __init__(self, device: str):
        self.cuda = device != "cpu" and torch.cuda.is_available()
        self.step, self.stack, self.segments, self.starts = 0, [], [], []
        self.last = time.perf_counter()

    def _state(self) -> dict:
        if not self.cuda:
            return {}
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        reserved = torch.cuda.memory_reserved()
        return dict(
            allocated_gib=torch.cuda.memory_allocated() / GiB,
            reserved_gib=reserved / GiB,
            outside_allocator_gib=(total - free - reserved) / GiB,
        )

    def boundary(self) -> None:
        now = time.perf_counter()
        segment = dict(step=self.step, phase=self.stack[-1] if self.stack else "other", seconds=now - self.last)
        self.last = now
        state = self._state()
        if self.cuda:
            segment.update(
                peak_allocated_gib=torch.cuda.max_memory_allocated() / GiB,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB,
                peak_device_gib=torch.cuda.max_memory_reserved() / GiB + state["outside_allocator_gib"],
                **state,
            )
            torch.cuda.reset_peak_memory_stats()
        self.segments.append(segment)

    def enter(self, phase: str) -> None:
        self.boundary()
        self.stack.append(phase)

    def exit(self) -> None:
        self.boundary()
        self.stack.pop()

    def wrap(self, phase: str, fn, new_step: bool = False):
        def wrapped(*args, **kwargs):
            if new_step:
                self.step += 1
                self.starts.append(dict(step=self.step, **self._state()))
            self.enter(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()

        return wrapped

    def report(self, error: str | None = None) -> dict:
        self.boundary()
        card = torch.cuda.get_device_properties(0).total_memory / GiB if self.cuda else None
        return dict(card_gib=card, error=error, step_starts=self.starts, segments=self.segments)


def patch(module, name: str, value) -> None:
    if not hasattr(module, name):
        raise RuntimeError(f"gpu_check: {module.__name__}.{name} is gone; the driver patches it (update gpu_check.py)")
    setattr(module, name, value)


def agrl_driver(argv: list[str]) -> None:
    """`agrl.main` on tyro's parse of `argv`, as `python agrl.py ARGV` runs it, with these patches:
    - the mixed scorer above (a random model's answers never parse);
    - a model folder without weights (config and tokenizer only) is built from its config, randomly, on the
      device the script loads it to (models.load_model refuses such a folder; 7B-wide weights would be 15-30 GB
      to write and read);
    - peak GPU memory per phase (rollout weight refresh, generation, training forward/backward, optimizer
      step), written with the plan's inputs to $GPU_CHECK_MEMORY by rank 0 where the final eval would run;
    - GPU_CHECK_NO_SAVE=1: no checkpoints (a 7B-wide FSDP checkpoint is tens of GB), and never the final eval.
    `--num-gpus` relaunches this same command under accelerate, so every rank has the patches."""
    import tyro
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    import agrl
    import eval as E
    from helpers import checkpoints

    args = tyro.cli(agrl.Args, args=argv)
    original_load = models.load_model

    def load_model(name, device="auto", dtype="auto", trust_remote_code=False):
        if not config_only(name):
            return original_load(name, device, dtype, trust_remote_code)
        from transformers import AutoConfig, AutoTokenizer

        device = models.pick_device(device)
        auto = torch.bfloat16 if device.startswith("cuda") else torch.float32
        torch_dtype = dict(auto=auto, float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)[dtype]
        # seeded: the script called checkpoints.seed_everything(args.seed) just before
        with torch.device(device):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name), dtype=torch_dtype)
        return model, AutoTokenizer.from_pretrained(name)

    phases = PhaseMemory(args.device)  # not `memory`: that is helpers.memory, the plan's module
    patch(agrl, "score_group", mixed_score_group)
    patch(models, "load_model", load_model)
    patch(rollouts, "refresh_rollout_weights", phases.wrap("refresh", rollouts.refresh_rollout_weights, new_step=True))
    patch(rollouts, "rollout_generate", phases.wrap("generation", rollouts.rollout_generate))
    patch(agrl, "update_policy", phases.wrap("training", agrl.update_policy))
    register_optimizer_step_pre_hook(lambda *_: phases.enter("optimizer step"))
    register_optimizer_step_post_hook(lambda *_: phases.exit())
    if os.environ.get("GPU_CHECK_NO_SAVE") == "1":
        patch(checkpoints, "save_checkpoint", lambda *a, **k: None)

    def write_report(error: str | None = None) -> None:
        path = os.environ.get("GPU_CHECK_MEMORY")
        if path and int(os.environ.get("RANK", "0")) == 0:
            report = phases.report(error)
            report.update(world=int(os.environ.get("WORLD_SIZE", "1")), shape=memory.model_shape(args.model)[0])
            Path(path).write_text(json.dumps(report, indent=1))

    def final_eval(*_, **__):
        write_report()
        return {}

    patch(E, "final_eval", final_eval)
    try:
        agrl.main(args)
    except Exception as e:  # an out-of-memory error too: what was measured until then is the finding
        write_report(f"{type(e).__name__}: {str(e)[:1500]}")
        raise


# ==================================================================================================
# Step: fsdp_step (the wide model's memory against the plan)
# ==================================================================================================
def plan_totals(plan: list[tuple[str, float, str]]) -> dict:
    """As dry_run_report adds the plan up: static + max(generation, training). `flat`: the plan's fixed
    allowance for what is outside PyTorch's allocated tensors (context, NCCL, allocator slack)."""
    totals = {phase: sum(g for _, g, p in plan if p == phase) for phase in ("static", "generation", "training")}
    totals["peak"] = totals["static"] + max(totals["generation"], totals["training"])
    totals["flat"] = sum(g for item, g, _ in plan if item.startswith("CUDA context"))
    return totals


def wide_flags(folder: Path, out: Path, device: str, tiny: bool) -> list[str]:
    """The wide run: 8 prompts x 8 completions of exactly 128 tokens (synthetic prompts are ~340 tokens, so the
    plan's item budget is 64), micro-batches of 8, 2 steps (the second runs with the AdamW states in place).
    Gradient checkpointing on, as `auto` is on a GPU: the same path on a CPU here."""
    size = ["2", "4", "4", "8"] if tiny else ["8", "8", "8", "128"]
    return [
        *("--model", str(folder), "--dataset", "synthetic", "--limit", "64", "--device", device),
        *("--num-gpus", "1", "--strategy", "fsdp", "--total-steps", "2", "--prompts-per-step", size[0]),
        *("--group-size", size[1], "--micro-batch-size", size[2], "--max-new-tokens", size[3]),
        *("--min-new-tokens", size[3], "--max-item-tokens", "64", "--no-dynamic-sampling", "--save-every", "1000"),
        *("--gradient-checkpointing", "on", "--eval-limit", "4", "--output-dir", str(out), "--run-name", "wide"),
        "--overwrite",
    ]


def wide_plan(shape: dict, flags: list[str], card_gib: float, tiny: bool) -> tuple[dict, list, object]:
    """The wide model's layers: as many of Qwen2.5-7B's 28 as keep the plan's peak within PLAN_SHARE of the card
    (its 122 GB of fp32 weights and AdamW states alone do not fit one H200). Returns (shape, plan, args)."""
    import tyro

    import agrl

    args = tyro.cli(agrl.Args, args=flags)
    workload = agrl.memory_workload(args)
    precision = launch.mixed_precision(args.precision, "cpu" if args.device == "cpu" else "cuda")
    checkpointing = models.gradient_checkpointing_on(args.gradient_checkpointing, args.device)
    for layers in range(shape["num_hidden_layers"], 0, -1):
        candidate = dict(shape, num_hidden_layers=layers)
        plan = memory.memory_plan(workload, candidate, 1, "fsdp", precision, checkpointing)
        if tiny or plan_totals(plan)["peak"] <= PLAN_SHARE * card_gib:
            return candidate, plan, args
    raise RuntimeError("not even one layer of this width fits the plan")


def compare_with_plan(plan: list, report: dict) -> dict:
    """The measured peaks of the last step (AdamW states in place) against the plan: allocated tensors against the
    plan without its flat allowance; the device's use (reserved + outside the allocator) against the whole plan."""
    totals = plan_totals(plan)
    if not report.get("segments") or report.get("card_gib") is None:
        return dict(plan=totals)
    last = max(s["step"] for s in report["segments"])
    segments = [s for s in report["segments"] if s["step"] == last]

    def peak(phases, key="peak_allocated_gib"):
        return max((s[key] for s in segments if s["phase"] in phases), default=None)

    tensors = totals["static"] - totals["flat"]
    rows = dict(
        static=(tensors, report["step_starts"][-1]["allocated_gib"] if report["step_starts"] else None),
        generation=(tensors + totals["generation"], peak({"generation"})),
        training_forward_backward=(tensors + totals["training"], peak({"training"})),
        optimizer_step=(tensors + totals["training"], peak({"optimizer step"})),
        whole_step_device=(totals["peak"], max(s["peak_device_gib"] for s in report["segments"])),
    )
    compared = {
        name: dict(plan_gib=p, measured_gib=m, measured_over_plan=None if m is None or not p else m / p)
        for name, (p, m) in rows.items()
    }
    return dict(plan=totals, last_step=last, compared=compared, card_gib=report["card_gib"])


def card_gib(device: str) -> float:
    """The GPU's memory from nvidia-smi (torch would give this process a CUDA context on the GPU the run
    measures), else a 141 GB card's."""
    if device.startswith("cuda"):
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            query = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "--id=0"]
            return float(subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()) / 1024
    return memory.GPU_GIB["141 GB"]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fsdp_step(device: str, tiny: bool, work: Path) -> None:
    tokenizer = carried_tokenizer()
    card = card_gib(device)
    folder, runs_dir = work / "wide-model", work / "runs"
    flags = wide_flags(folder, runs_dir, device, tiny)
    shape, plan, _ = wide_plan(shapes(tiny, len(tokenizer))["wide"], flags, card, tiny)
    write_model_folder(folder, qwen_config(shape, tokenizer), tokenizer)  # config only: no weights
    # agrl.py's own --dry-run of the same command (tyro, the launch command, the plan): into the log
    child([sys.executable, str(REPO / "agrl.py"), *flags, "--dry-run"], timeout=left(60))
    memory_file = work / "wide-memory.json"
    env = dict(GPU_CHECK_NO_SAVE="1", GPU_CHECK_MEMORY=str(memory_file))
    rc = child([sys.executable, str(Path(__file__).resolve()), "agrl", *flags], timeout=left(), env=env)
    report = json.loads(memory_file.read_text()) if memory_file.exists() else {}
    metrics = read_metrics(runs_dir / "wide")
    keep = ("loss", "grad_norm", "step_seconds", "time_generation", "time_training", "generated_tokens_per_second")
    steps = [{k: m.get(k) for k in ("step", *keep)} for m in metrics]
    ran = rc == 0 and len(metrics) == 2 and not report.get("error")
    trained = all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics) and any(m["grad_norm"] > 0 for m in metrics)
    record(
        "fsdp_wide_step",
        ran and trained,
        rc=rc,
        shape=shape,
        parameters=memory.parameter_count(shape),
        layers_of_qwen25_7b=f"{shape['num_hidden_layers']} of 28",
        error=report.get("error"),
        steps=steps,
        **compare_with_plan(plan, report),
        plan_items=[dict(item=i, gib=g, phase=p) for i, g, p in plan],
        segments=report.get("segments"),
    )


# ==================================================================================================
# Step: resume
# ==================================================================================================
def resume(device: str, tiny: bool, work: Path) -> None:
    """agrl.py under FSDP (world size 1), lr 1e-6 from the first step: A runs 2 steps; B runs 1 step, then
    --resume to 2. Asserted: B's metric lines are steps 1 and 2, once each; B's step 2 took the same stream
    position and sample count as A's; B's final weights are A's within a tenth of step 2's update (L2; GPU
    kernels need not be bit-exact, a lost optimizer state or RNG misses by the update's size); step 1 moved
    the fp32 master weights (the step-1 weights are B's final checkpoint after its first run)."""
    tokenizer = carried_tokenizer()
    shape = shapes(tiny, len(tokenizer))["resume"]
    folder, runs_dir = work / "resume-model", work / "runs"
    write_model_folder(folder, qwen_config(shape, tokenizer), tokenizer, "cpu", weights=True)  # no GPU memory here
    initial = load_weights(folder)
    common = [
        *("--model", str(folder), "--dataset", "synthetic", "--limit", "32", "--device", device, "--num-gpus", "1"),
        *("--strategy", "fsdp", "--prompts-per-step", "4", "--group-size", "4", "--micro-batch-size", "8"),
        *("--max-new-tokens", "8" if tiny else "32", "--no-dynamic-sampling", "--save-every", "1"),
        *("--warmup-steps", "1", "--lr", "1e-6", "--gradient-checkpointing", "on", "--eval-limit", "4"),
        *("--output-dir", str(runs_dir)),
    ]
    driver = [sys.executable, str(Path(__file__).resolve()), "agrl", *common]
    rcs = [child([*driver, "--run-name", "A", "--total-steps", "2", "--overwrite"], timeout=left())]
    rcs.append(child([*driver, "--run-name", "B", "--total-steps", "1", "--overwrite"], timeout=left()))
    after_1 = load_weights(runs_dir / "B" / "checkpoint")
    rcs.append(child([*driver, "--run-name", "B", "--total-steps", "2", "--resume"], timeout=left()))
    a, b = read_metrics(runs_dir / "A"), read_metrics(runs_dir / "B")
    final_a, final_b = load_weights(runs_dir / "A" / "checkpoint"), load_weights(runs_dir / "B" / "checkpoint")
    if not (rcs == [0, 0, 0] and len(a) == 2 and final_a and final_b and after_1):
        record("resume_round_trip", False, rcs=rcs, steps_a=[m["step"] for m in a], steps_b=[m["step"] for m in b])
        return

    def distance(x: dict, y: dict) -> float:
        return sum(((x[k].double() - y[k].double()) ** 2).sum().item() for k in x if k in y) ** 0.5

    update_2, gap = distance(final_a, after_1), distance(final_b, final_a)
    same = ("data_position", "completions_generated")
    close = ("reward_mean", "completion_len_mean", "loss", "grad_norm")
    values = dict(
        steps_b=[m["step"] for m in b],
        same=same,
        step2_a={k: a[1].get(k) for k in same + close},
        step2_b={k: b[-1].get(k) for k in same + close},
        step2_update_l2=update_2,
        resumed_vs_uninterrupted_l2=gap,
        gap_over_update=gap / update_2 if update_2 else None,
        bitwise_equal=final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a),
    )
    ok = (
        values["steps_b"] == [1, 2]
        and all(a[1][k] == b[-1][k] for k in same)
        and update_2 > 0
        and gap <= 0.1 * update_2
    )
    record("resume_round_trip", ok, **values)
    shares = moved_shares(initial, after_1)
    record("bf16_update_fsdp", update_ok(shares), lr=1e-6, **shares)


# ==================================================================================================
# Running steps: child processes with time limits, their output into the log, their results into the JSON
# ==================================================================================================
def kill_marked(marker: str) -> list[int]:
    """SIGKILL every process whose environment carries `marker` (what one step or child started, torch's
    workers in their own sessions included), by pid; this process spared."""
    killed = []
    needle = marker.encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(entry.startswith(needle) for entry in environ):
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
    return killed


def child(command: list[str], timeout: float, env: dict | None = None) -> int:
    """A command of a step, its output into the step's; on its timeout it and everything it started is killed."""
    marker = f"{os.environ.get(MARK, 'gpu_check')}.{uuid.uuid4().hex[:6]}"
    print(f"[gpu_check] $ {' '.join(command)}  (limit {timeout:.0f} s)", flush=True)
    proc = subprocess.Popen(command, env={**os.environ, **(env or {}), MARK: marker}, cwd=REPO)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_marked(f"{MARK}={marker}")
        proc.wait()
        print(f"[gpu_check] killed after {timeout:.0f} s: {command[1:3]}", flush=True)
        return 124
    kill_marked(f"{MARK}={marker}")  # a worker its launcher left behind
    return rc


def summary(results: dict) -> str:
    """The end of the log (what the device call's output tail shows): each check's verdict, the key figures."""
    lines = ["checks (ok: true / false / - measured only):"]
    for name, check in results["checks"].items():
        lines.append(f"  {name:<42} {'-' if check['ok'] is None else check['ok']}")
    checks = results["checks"]
    if "decode_speed_bf16" in checks:
        c = checks["decode_speed_bf16"]
        lines.append(
            f"decode, {c['rows']} rows x {c['new_tokens_each']} tokens: ours {c['ours_tokens_per_second']:.0f} tok/s, "
            f"HF generate {c['hf_tokens_per_second']:.0f} tok/s ({c['speedup']:.2f}x)"
        )
    wide = checks.get("fsdp_wide_step", {})
    if wide.get("compared"):
        lines.append(f"wide model ({wide['layers_of_qwen25_7b']} layers): GiB on a {wide['card_gib']:.1f} GiB card")
        lines.append(f"  {'':<26} {'plan':>7} {'measured':>9} {'ratio':>6}")
        for row, c in wide["compared"].items():
            measured = "-" if c["measured_gib"] is None else f"{c['measured_gib']:9.2f}"
            ratio = "-" if c["measured_over_plan"] is None else f"{c['measured_over_plan']:6.2f}"
            lines.append(f"  {row:<26} {c['plan_gib']:7.2f} {measured:>9} {ratio:>6}")
    if "resume_round_trip" in checks and checks["resume_round_trip"].get("gap_over_update") is not None:
        c = checks["resume_round_trip"]
        lines.append(f"resume: resumed vs uninterrupted = {c['gap_over_update']:.2e} of step 2's update (L2)")
    for name, step in results["steps"].items():
        if step["rc"] != 0:
            lines.append(f"step {name}: rc {step['rc']}{' (killed at its limit)' if step['timed_out'] else ''}")
    return "\n".join(lines)


def run_steps(out: Path, names: list[str], device: str, tiny: bool) -> dict:
    """Each step in its own process, killed at its limit; its output teed into out/gpu_check.log (up to LOG_CAP),
    its checks merged into out/gpu_check.json after every step (so a run cut short still leaves what it found)."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check."))
    run_id = uuid.uuid4().hex[:8]
    results = dict(
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        device=device,
        tiny=tiny,
        work=str(work),
        steps={},
        checks={},
    )
    with open(out / OUTPUTS[0], "a") as log:

        def say(text: str) -> None:
            print(text, flush=True)
            log.write(text + "\n")
            log.flush()

        say(f"gpu_check {results['started']}: steps {' '.join(names)} on {device}{' (tiny)' if tiny else ''}")
        for name in names:
            limit, lines = STEPS[name], work / f"{name}.jsonl"
            command = [sys.executable, str(Path(__file__).resolve()), name, "--device", device, "--work", str(work)]
            command += ["--results", str(lines)] + (["--tiny"] if tiny else [])
            say(f"\n=== {name} (limit {limit} s)")
            marker = f"{run_id}.{name}"
            start = time.monotonic()
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, MARK: marker},
                cwd=REPO,
            )
            written = [0]

            def tee(stream=proc.stdout):
                for raw in iter(stream.readline, b""):
                    text = raw.decode(errors="replace")
                    sys.stdout.write(text)
                    if written[0] < LOG_CAP:
                        log.write(text)
                        written[0] += len(raw)
                log.flush()

            reader = threading.Thread(target=tee, daemon=True)
            reader.start()
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                rc = 124
            kill_marked(f"{MARK}={marker}")
            proc.wait()
            reader.join(timeout=10)
            seconds = time.monotonic() - start
            results["steps"][name] = dict(rc=rc, seconds=round(seconds, 1), limit_s=limit, timed_out=rc == 124)
            if lines.exists():
                for line in lines.read_text().splitlines():
                    check = json.loads(line)
                    results["checks"][check.pop("check")] = check
            say(f"=== {name}: rc {rc}, {seconds:.0f} s{' (killed at its limit)' if rc == 124 else ''}")
            tmp = out / (OUTPUTS[1] + ".tmp")
            tmp.write_text(json.dumps(results, indent=1, default=str))
            os.replace(tmp, out / OUTPUTS[1])
        try:
            say("\n" + summary(results))
        except (KeyError, TypeError) as e:  # a check that recorded less than usual: the JSON has it all
            say(f"\n(no summary: {type(e).__name__} {e}; see {OUTPUTS[1]})")
    shutil.rmtree(work, ignore_errors=True)
    return results


# ==================================================================================================
# Here: prepare the carried folder; the dry run
# ==================================================================================================
def pinned(name: str) -> str:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.split("#")[0].strip().startswith(f"{name}=="):
            return line.split("#")[0].strip()
    raise RuntimeError(f"{name} is not pinned in requirements.txt")


def prepare() -> None:
    """Build .gpu_check/: wheels of tyro (requirements.txt's pin) and of the needs the GPU image lacks, at the
    versions this environment runs (for Python 3.12 on x86-64), and the SmolLM2 tokenizer files."""
    from importlib.metadata import version

    shutil.rmtree(WHEELS, ignore_errors=True)
    WHEELS.mkdir(parents=True)
    platforms = [f"--platform={p}_x86_64" for p in ("manylinux_2_28", "manylinux_2_17", "manylinux2014", "manylinux1")]
    for spec in [pinned("tyro"), *(f"{name}=={version(name)}" for name in TYRO_NEEDS)]:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version=3.12"]
            + ["--implementation=cp", *platforms, "--dest", str(WHEELS), spec],
            check=True,
        )
    shutil.rmtree(TOKENIZER, ignore_errors=True)
    models.embedded_tokenizer().save_pretrained(TOKENIZER)
    print(f"prepared {CARRY.relative_to(REPO)}: {len(list(WHEELS.iterdir()))} wheels, the tokenizer")


def travelling_files() -> list[Path]:
    """The working tree a device call sends: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    return [REPO / p for p in listed.decode().split("\0") if p and (REPO / p).is_file()]


def missing_carried() -> list[str]:
    wheels = [f"{name.replace('-', '_')}-*.whl" for name in ("tyro", *TYRO_NEEDS)]
    missing = [w for w in wheels if not any(WHEELS.glob(w))]
    return missing + ([] if (TOKENIZER / "tokenizer.json").exists() else ["tokenizer/tokenizer.json"])


def dry_run_info() -> dict:
    carried = sorted(p for p in CARRY.rglob("*") if p.is_file()) if CARRY.exists() else []
    tree = travelling_files()
    carried_bytes, tree_bytes = sum(p.stat().st_size for p in carried), sum(p.stat().st_size for p in tree)
    vocab = 49152  # the SmolLM2 tokenizer's
    flags = wide_flags(Path("/tmp/wide-model"), Path("/tmp/runs"), "cuda", tiny=False)
    shape, plan, _ = wide_plan(shapes(False, vocab)["wide"], flags, memory.GPU_GIB["141 GB"], tiny=False)
    command = RUN_CALL["command"]
    return dict(
        carried=[(str(p.relative_to(REPO)), p.stat().st_size) for p in carried],
        missing=missing_carried(),
        carried_bytes=carried_bytes,
        tree_files=len(tree),
        tree_bytes=tree_bytes,
        total_bytes=carried_bytes + tree_bytes,
        limit_bytes=TREE_LIMIT,
        steps=dict(STEPS),
        steps_total_s=sum(STEPS.values()),
        step_budget_s=STEP_BUDGET,
        outputs=[f"$OUT/{name}" for name in OUTPUTS],
        wide_shape=shape,
        wide_parameters=memory.parameter_count(shape),
        wide_plan=plan_totals(plan),
        wide_plan_items=plan,
        card_gib=memory.GPU_GIB["141 GB"],
        run_call=dict(RUN_CALL),
        command_chars=len(command),
    )


def dry_run() -> dict:
    info = dry_run_info()
    print("carried (the run call's carry: .gpu_check):")
    for path, size in info["carried"]:
        print(f"  {path:<60} {size / MiB:7.2f} MiB" if size >= MiB / 10 else f"  {path:<60} {size / 1024:7.1f} KiB")
    if info["missing"]:
        print(
            f"  MISSING {', '.join(info['missing'])}: run `.venv/bin/python benchmarks/gpu_check.py prepare` first (tyro's wheels, the tokenizer)"
        )
    print(
        f"working tree that travels (tracked + untracked, not ignored): {info['tree_files']} files, {info['tree_bytes'] / MiB:.2f} MiB"
    )
    print(f"total {info['total_bytes'] / MiB:.2f} MiB of {info['limit_bytes'] / MiB:.0f} MiB")
    shape, totals = info["wide_shape"], info["wide_plan"]
    print("steps (child processes, each killed at its limit):")
    for name, limit in info["steps"].items():
        note = ""
        if name == "fsdp_step":
            note = (
                f"  Qwen2.5-7B width, {shape['num_hidden_layers']} of 28 layers ({info['wide_parameters'] / 1e9:.2f}B): "
                f"plan peak {totals['peak']:.1f} GiB of {info['card_gib']:.1f} (<= {PLAN_SHARE:.0%})"
            )
        print(f"  {name:<11} {limit:4d} s{note}")
    print(f"  {'total':<11} {info['steps_total_s']:4d} s (limit {info['step_budget_s']} s)")
    print("the wide model's plan (memory.memory_plan, as agrl.py --dry-run prints it), GiB:")
    for item, gib, phase in info["wide_plan_items"]:
        print(f"  {phase:<10} {item:<80} {gib:6.2f}")
    print(f"results (only under $OUT): {', '.join(info['outputs'])}")
    print("the device call:")
    print(f"  run {json.dumps(info['run_call'])}")
    print(
        f"  ({info['command_chars']} characters; a rerun of some steps: bash benchmarks/gpu_check.sh resume fsdp_step)"
    )
    return info


# ==================================================================================================
if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "agrl":  # the driver: everything after `agrl` is agrl.py's flags
        agrl_driver(sys.argv[2:])
        sys.exit(0)
    if sys.argv[1:2] == ["--dry-run"]:  # the scripts' spelling of it
        sys.argv[1] = "dry-run"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["prepare", "dry-run", "run", *STEPS])
    parser.add_argument("steps", nargs="*", help="run: the steps to run (default: all)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="run: where the log and the JSON go ($OUT)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="2-layer width-64 models (CPU runs here)")
    parser.add_argument("--work", help="a step's scratch folder")
    parser.add_argument("--results", help="a step's results file (JSON lines)")
    a = parser.parse_intermixed_args()  # `run --out DIR STEP ...`, as gpu_check.sh passes them
    if a.action == "prepare":
        prepare()
        dry_run()
    elif a.action == "dry-run":
        dry_run()
    elif a.action == "run":
        if not a.out:
            parser.error("run needs --out or $OUT")
        unknown = [s for s in a.steps if s not in STEPS]
        if unknown:
            parser.error(f"unknown steps {unknown}; steps: {', '.join(STEPS)}")
        results = run_steps(Path(a.out), a.steps or list(STEPS), a.device, a.tiny)
        sys.exit(0 if all(c["ok"] is not False for c in results["checks"].values()) else 1)
    else:
        RESULTS = Path(a.results) if a.results else None
        DEADLINE = time.monotonic() + STEPS[a.action]
        work = Path(a.work or tempfile.mkdtemp(prefix="gpu_check."))
        step = {"versions": versions, "generation": generation, "fsdp_step": fsdp_step, "resume": resume}[a.action]
        sys.exit(0 if attempt(f"{a.action}_step", lambda: step(a.device, a.tiny, work)) else 1)  # recorded too
