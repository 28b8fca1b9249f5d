"""TaoSR1 stage 1: supervised fine-tuning on label + criteria + reason (completion-only loss).

    python sft.py --model smollm2-135m --dataset synthetic --total-steps 200
    python sft.py --model Qwen2.5-7B-Instruct --dataset esci --data-path data/esci --num-gpus 8

Targets are built from the gold criteria through templates (data.sft_target): every target is
rule-adherent by construction. The loss is the mean cross-entropy over completion tokens of the
whole optimizer batch, exact across micro-batches and processes. The label is about one of sixty
target tokens, so `--label-weight` can weigh its tokens more (a weighted mean), and `--balanced`
draws every gold label equally often.
"""

from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import data as D
import eval as E
from helpers import checkpoints, cli, errors, flags, launch, memory, models, runs


@dataclass
class Args(flags.TrainFlags):
    # and the flags every training script shares: helpers/flags.py (model, data, seeds, run folder, processes)
    max_new_tokens: int = 128
    """generation budget per answer in the final evaluation"""
    total_steps: int = flags.may_change_on_resume(200)
    """optimizer steps"""
    batch_size: int = 8
    """sequences per micro-batch per process"""
    grad_accum: int = 2
    """micro-batches per optimizer step"""
    lr: float = 5e-5
    """peak learning rate (AdamW)"""
    warmup_steps: int = 10
    """linear warm-up steps, then cosine decay to 10%"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    label_weight: float = 1.0
    """weight of the label's tokens in the loss (a weighted mean over completion tokens; 1: plain mean)"""
    balanced: bool = False
    """class-balanced sampling: each epoch draws every gold label as often as the most frequent one"""
    shared_prefix: bool = True
    """run a micro-batch's common prompt prefix (the system prompt) once for all its rows (exact)"""
    log_every: int = flags.may_change_on_resume(5)
    """steps between metric lines"""
    save_every: int = flags.may_change_on_resume(100)
    """steps between checkpoints"""


def cosine_lr(step: int, args: Args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.total_steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def label_token_mask(tokenizer, example: D.Example, rulebook, order: str) -> list[bool]:
    """Per completion token (the target, then end of turn): does it spell the gold label in <label>..</label>?"""
    target = D.sft_target(example, rulebook, order)
    start = target.index(f"<label>{example.label}</label>") + len("<label>")
    end = start + len(example.label)
    offsets = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [a < end and b > start for a, b in offsets] + [False]


def epoch_order(gold: list[str], seed: int, epoch: int, balanced: bool) -> list[int]:
    """The example indices of one epoch, shuffled. Balanced: every label as often as the most frequent
    one (smaller classes repeat, each pass in a new order), so an epoch is n_labels x the largest class."""
    rng = random.Random(seed * 1000 + epoch)
    if not balanced:
        order = list(range(len(gold)))
        rng.shuffle(order)
        return order
    classes = {label: [i for i, g in enumerate(gold) if g == label] for label in sorted(set(gold))}
    largest = max(len(members) for members in classes.values())
    order = []
    for members in classes.values():
        drawn = []
        while len(drawn) < largest:
            drawn += rng.sample(members, len(members))
        order += drawn[:largest]
    rng.shuffle(order)
    return order


def main(args: Args) -> dict:
    script = Path(__file__).stem  # a copy of this file names its own runs
    args.run_name = args.run_name or f"{script}-{Path(args.model).name}-{args.dataset}-s{args.seed}"
    launch.launch(args, script, memory.Workload(args.batch_size, args.max_new_tokens, args.max_item_tokens))
    accelerator = launch.make_accelerator(args.device, args.strategy, args.precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    run = runs.Run(args, script)
    checkpoints.seed_everything(args.seed)

    # --- data: every example encoded once; the order is a seeded permutation per epoch -------------
    dataset = D.load_for(args)
    resume_from, state = checkpoints.resume_point(run) if args.resume else (None, None)
    model, tokenizer = checkpoints.load_policy(args.model, resume_from, accelerator, args.gradient_checkpointing)
    encoded = [D.encode_sft(tokenizer, e, dataset.rulebook, args.order, args.max_item_tokens) for e in dataset.examples]
    # (prompt, completion) pairs: the loss covers the completion (label, criteria, reason, end of turn)
    starts = [labels.count(-100) for _, labels, _ in encoded]  # labels are -100 over the prompt, then the target
    rows = [(ids[:start], ids[start:]) for (ids, _, _), start in zip(encoded, starts)]
    # per completion token: the label's tokens weigh label_weight, the others 1 (all 1: today's plain mean)
    is_label = [label_token_mask(tokenizer, e, dataset.rulebook, args.order) for e in dataset.examples]
    weights = [[args.label_weight if flag else 1.0 for flag in flags] for flags in is_label]
    if any(len(flags) != len(completion) for flags, (_, completion) in zip(is_label, rows)):
        raise RuntimeError(
            "label token mask and completion differ in length: the tokenizer splits the target differently"
        )
    data_stats = dict(dataset.stats, prompts_truncated=sum(t for _, _, t in encoded))
    if run.main:
        runs.write_json(run.dir / "data_stats.json", data_stats)
        runs.write_prompt(run.dir, args.split, tokenizer.decode(rows[0][0]))
    per_step = args.batch_size * args.grad_accum * world

    gold = [e.label for e in dataset.examples]

    @functools.lru_cache(maxsize=2)
    def example_order(epoch: int) -> list[int]:
        return epoch_order(gold, args.seed, epoch, args.balanced)

    epoch_size = len(example_order(0))

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start_step = 0
    if resume_from is not None:
        checkpoints.set_rng_state(state["rng"])
        start_step = state["step"]
        print(f"[resume] from {resume_from} at step {start_step}")
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from is not None:  # after prepare: under FSDP each rank loads its own shard
        checkpoints.load_training_state(model, optimizer, resume_from, state)
    stop = checkpoints.StopFlag()

    # --- training loop -------------------------------------------------------------------------
    nan_skips, window = 0, dict(steps=0, loss=0.0, label_loss=0.0, tokens=0, seconds=0.0)
    progress = tqdm(
        range(start_step, args.total_steps),
        desc="sft",
        disable=not run.main,
        initial=start_step,
        total=args.total_steps,
    )
    for step in progress:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args)
        # This step's sequences: position step * per_step in the endless shuffled stream; each rank
        # takes its own slice, so the global batch is the same for any number of processes.
        first = step * per_step
        stream = [example_order((first + i) // epoch_size)[(first + i) % epoch_size] for i in range(per_step)]
        mine = stream[rank::world]
        micro_batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
        # Weighted mean over the completion tokens of the whole global batch: each micro-batch contributes
        # its weighted token-sum divided by the global weight (DDP averages over ranks, hence * world).
        total_tokens = sum(len(rows[i][1]) for i in stream)
        total_weight = sum(sum(weights[i]) for i in stream)
        label_tokens = sum(sum(is_label[i]) for i in stream)
        step_loss = torch.zeros((), device=accelerator.device)
        step_label_loss = torch.zeros((), device=accelerator.device)
        for k, batch_index in enumerate(micro_batches):
            batch = models.pad_batch(
                [rows[i][0] for i in batch_index],
                [rows[i][1] for i in batch_index],
                tokenizer.pad_token_id,
                accelerator.device,
                args.shared_prefix,
            )
            token_weight = torch.zeros_like(batch["completion_mask"])  # [B, C], zero over the padding
            label_mask = torch.zeros_like(batch["completion_mask"])
            for row, i in enumerate(batch_index):
                token_weight[row, : len(weights[i])] = torch.tensor(weights[i])
                label_mask[row, : len(is_label[i])] = torch.tensor(is_label[i], dtype=torch.float32)
            # gradients accumulate over micro-batches; DDP all-reduces after the last, FSDP reduce-scatters each
            with launch.micro_batch_sync(accelerator, model, last=k == len(micro_batches) - 1):
                logp, _ = models.token_logprobs(model, batch)  # logits only at completion positions
                token_loss = -(logp * token_weight).sum()
                loss = token_loss / total_weight * world
                accelerator.backward(loss)
            step_loss += token_loss.detach()
            step_label_loss += -(logp.detach() * label_mask).sum()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        step_loss = accelerator.reduce(step_loss, "sum") / total_weight
        step_label_loss = accelerator.reduce(step_label_loss, "sum") / max(1, label_tokens)
        done = step + 1
        if torch.isfinite(step_loss) and torch.isfinite(grad_norm):
            nan_skips = 0
            optimizer.step()
            window["steps"] += 1
            window["loss"] += step_loss.item()
            window["label_loss"] += step_label_loss.item()
            window["tokens"] += total_tokens
            window["seconds"] += time.perf_counter() - started
        else:  # skip the update, say so, and give up after too many in a row
            nan_skips += 1
            run.log(dict(nan_skipped=1, nan_skips_consecutive=nan_skips), step=done)
            if nan_skips >= args.max_nan_skips:
                raise errors.RunStopped(
                    f"{nan_skips} consecutive steps with a non-finite loss or gradient: stopping at step {done}"
                )
        optimizer.zero_grad(set_to_none=True)
        if window["steps"] and (done % args.log_every == 0 or done == args.total_steps):
            metrics = dict(
                loss=window["loss"] / window["steps"],
                label_loss=window["label_loss"] / window["steps"],
                lr=cosine_lr(step, args),
                grad_norm=grad_norm.item(),
                epoch=first / len(rows),
                tokens_per_second=window["tokens"] / window["seconds"],
                step_seconds=window["seconds"] / window["steps"],
            )
            run.log(metrics, step=done)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
            window = dict(steps=0, loss=0.0, label_loss=0.0, tokens=0, seconds=0.0)
        if done % args.save_every == 0 or done == args.total_steps or stop.requested:
            checkpoints.save_checkpoint(
                run.dir,
                done,
                model,
                tokenizer,
                dict(rng=checkpoints.rng_state()),
                keep_last=args.keep_last,
                final=done == args.total_steps,
                accelerator=accelerator,
                optimizer=optimizer,
            )
        if stop.requested:
            print(f"stopped at step {done}; continue with --resume")
            return {}
    accelerator.wait_for_everyone()

    # --- evaluation on the dev split ------------------------------------------------------------
    metrics = E.final_eval(args, model, tokenizer, run, str(accelerator.device))
    run.finish(dict(eval=metrics))
    return metrics


if __name__ == "__main__":
    cli.run(main, Args)
