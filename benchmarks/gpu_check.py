"""The in-process half of benchmarks/gpu_check.sh (one CUDA GPU): correctness of generation, the bf16
update, and a 7B-shaped model's speed and memory. Prints one JSON object per check.

    python benchmarks/gpu_check.py generation | update | seven_b | make_05b DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data as D  # noqa: E402
import eval as E  # noqa: E402
from helpers import launch, models, rollouts  # noqa: E402

GiB = 2**30


def report(name: str, **values) -> None:
    print(json.dumps(dict(check=name, **values), default=str), flush=True)


def generation() -> None:
    """Greedy `generate` vs transformers' generate; shared prefill on/off; behaviour vs training log-probs."""
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = models.load_model(
            "smollm2-135m", "cuda", dtype="float32" if dtype == torch.float32 else "bfloat16"
        )
        dataset = D.load_dataset("synthetic", "dev", seed=0, limit=8)
        prompts = [D.encode_prompt(tokenizer, e, dataset.rulebook, "label_first", 256)[0] for e in dataset.examples]
        ours = rollouts.generate(model, tokenizer, prompts, max_new_tokens=32, temperature=0.0)
        same_as_hf = 0
        for p, completion in zip(prompts, ours.completion_ids):
            hf = model.generate(
                torch.tensor([p], device="cuda"),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=models.stop_token_ids(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
            )
            same_as_hf += hf[0, len(p) :].tolist()[: len(completion)] == completion
        sampled = [
            rollouts.generate(
                model,
                tokenizer,
                prompts,
                n=4,
                max_new_tokens=32,
                temperature=1.0,
                seeds=list(range(8)),
                shared_prefill=share,
            )
            for share in (True, False)
        ]
        batch = models.pad_batch(sampled[0].prompt_ids, sampled[0].completion_ids, tokenizer.pad_token_id, "cuda")
        with torch.no_grad():
            train_logp = models.token_logprobs(model, batch, temperature=1.0)[0]
        mask = batch["completion_mask"].bool()
        behaviour = torch.zeros_like(train_logp)
        for i, lp in enumerate(sampled[0].logprobs):
            behaviour[i, : len(lp)] = torch.tensor(lp)
        gap = (train_logp - behaviour)[mask].abs()
        report(
            "generation",
            dtype=str(dtype),
            greedy_equal_hf=f"{same_as_hf}/{len(prompts)}",
            shared_prefill_same_tokens=sampled[0].completion_ids == sampled[1].completion_ids,
            behaviour_vs_training_logprob_max_abs=gap.max().item(),
            mean_abs=gap.mean().item(),
        )


def update() -> None:
    """lr 1e-6 on the real path (accelerate bf16 mixed precision, fp32 master weights): share of weights moved."""
    import grpo

    args = grpo.Args(
        model="smollm2-135m",
        dataset="synthetic",
        limit=16,
        total_steps=1,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=16,
        lr=1e-6,
        warmup_steps=1,
        device="cuda",
        dynamic_sampling=False,
        eval_limit=4,
        output_dir="/tmp/gpu_check_runs",
        run_name="update",
    )
    grpo.score_group = lambda texts, example, rulebook, a: (
        [E.R.score_output(t, example.label, example.criteria, rulebook, a.order) for t in texts],
        [float(sum(map(ord, t)) % 3) / 2 for t in texts],
    )
    before = {
        k: v.float().clone()
        for k, v in models.load_model("smollm2-135m", "cpu", dtype="float32")[0].state_dict().items()
    }
    grpo.main(args)
    from safetensors.torch import load_file

    after = load_file("/tmp/gpu_check_runs/update/checkpoint/model.safetensors")
    moved = sum((after[k].float() != before[k]).sum().item() for k in after)
    total = sum(after[k].numel() for k in after)
    report("bf16_update", lr=1e-6, weights_moved=moved / total, dtype=str(next(iter(after.values())).dtype))


def seven_b() -> None:
    """A Qwen2.5-7B-shaped random model: generation tok/s (28 layers, bf16), and with 8 of its layers in fp32
    master weights under bf16 autocast: one forward/backward's activation memory with and without
    checkpointing, and one AdamW step."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(zip(launch.SHAPE_FIELDS, launch.MODEL_SHAPES["qwen2.5-7b"]))
    config = Qwen2Config(**shape, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    tokenizer = models.embedded_tokenizer()
    prompts = [[int(t) for t in torch.randint(0, 49152, (600,))] for _ in range(16)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = rollouts.generate(
        model,
        tokenizer,
        prompts,
        n=8,
        max_new_tokens=128,
        min_new_tokens=128,
        temperature=1.0,
        seeds=list(range(16)),
        batch_size=16,
    )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    report(
        "7b_generation",
        rows=16 * 8,
        tokens=sum(map(len, out.completion_ids)),
        seconds=seconds,
        tokens_per_second=sum(map(len, out.completion_ids)) / seconds,
        peak_gib=torch.cuda.max_memory_allocated() / GiB,
    )
    del model, out
    torch.cuda.empty_cache()
    config.num_hidden_layers = 8
    for checkpointing in (False, True):
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(config).train()
        if checkpointing:
            models.enable_checkpointing(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        batch = models.pad_batch([[1] * 600] * 8, [[2] * 256] * 8, 0, "cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logp, _ = models.token_logprobs(model, batch)
        logp.sum().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        start = time.perf_counter()
        optimizer.step()
        torch.cuda.synchronize()
        plan = {
            item.split(" (")[0]: gib
            for item, gib, _ in launch.memory_plan(
                launch.Workload(rows=8, max_new_tokens=256, max_item_tokens=250),
                shape | dict(num_hidden_layers=8),
                1,
                "single",
                "bf16",
                checkpointing,
            )
        }
        report(
            "7b_shape_8_layers_fwd_bwd",
            checkpointing=checkpointing,
            rows=8,
            tokens_each=856,
            fwd_bwd_peak_above_weights_gib=peak / GiB,
            plan_activations_gib=plan["activations"],
            plan_logits_gib=plan["completion logits fp32 + grad"],
            adamw_step_seconds=time.perf_counter() - start,
        )
        del model, optimizer, logp
        torch.cuda.empty_cache()


def make_05b(folder: str) -> None:
    """A random model of Qwen2.5-0.5B's shape with the embedded tokenizer (its chat template), saved to `folder`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = models.embedded_tokenizer()
    shape = dict(zip(launch.SHAPE_FIELDS, launch.MODEL_SHAPES["qwen2.5-0.5b"]), vocab_size=len(tokenizer))
    model = Qwen2ForCausalLM(
        Qwen2Config(
            **shape,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    report("made_05b_shape", folder=folder, parameters=sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
    {"generation": generation, "update": update, "seven_b": seven_b, "make_05b": make_05b}[sys.argv[1]](*sys.argv[2:])
