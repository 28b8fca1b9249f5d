"""TaoSR1 stage 3: GRPO with the sparse outcome reward and dynamic sampling.

    python grpo.py --model runs/sft/checkpoint --dataset esci --data-path data/esci --num-gpus 8
    python grpo.py --model tiny-random --dataset synthetic --total-steps 3 --prompts-per-step 2 --group-size 4 --max-new-tokens 16

One step, in the order it runs: take prompts from the shuffled stream -> sample a group of G
completions each (token ids and behaviour log-probs) -> score -> group-normalised advantages ->
dynamic sampling (drop groups whose rewards do not vary, refill) -> one or more optimizer updates
over micro-batches with the clipped token-level loss below -> log -> checkpoint.
"""

from __future__ import annotations

import copy
import functools
import itertools
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import data as D
import eval as E
import rewards as R
from helpers import checkpoints, cli, errors, flags, launch, memory, models, rollouts, runs


@dataclass
class Args(flags.TrainFlags):
    # and the flags every training script shares: helpers/flags.py (model, data, seeds, run folder, processes)
    total_steps: int = flags.may_change_on_resume(300)
    """generation batches (each followed by num_updates_per_batch optimizer updates)"""
    generation_budget: int = flags.may_change_on_resume(0)
    """stop once this many completions were generated, refills and guided samples included (0: no limit)"""
    prompts_per_step: int = 64
    """prompts per generation batch, over all processes"""
    group_size: int = 8
    """completions sampled per prompt (G)"""
    max_new_tokens: int = 256
    """generation budget per completion"""
    min_new_tokens: int = 0
    """forbid stopping before this many tokens (benchmarks force a fixed length with min = max)"""
    temperature: float = 1.0
    """sampling temperature (log-probs are taken of logits / temperature, in generation and training)"""
    top_p: float = 1.0
    """nucleus sampling"""
    lr: float = 1e-6
    """learning rate (AdamW), constant after warm-up"""
    warmup_steps: int = 10
    """linear warm-up of the learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    beta: float = 0.04
    """k3 KL penalty to the frozen initial policy (0: no reference model is loaded; why 0.04: results/agr-screening)"""
    clip_eps_low: float = 0.2
    """ratio clip below: 1 - eps_low"""
    clip_eps_high: float = 0.28
    """ratio clip above: 1 + eps_high (clip-higher, DAPO)"""
    loss_agg: Literal["token", "sequence", "constant"] = "token"
    """token: sum / all completion tokens (DAPO); sequence: mean per sequence then mean (GRPO); constant: sum / (sequences * max_new_tokens) (Dr. GRPO)"""
    adv_scale: Literal["group", "batch", "none"] = "group"
    """divide centred rewards by the group std, the batch std, or nothing (Dr. GRPO)"""
    adv_clamp: float = 0.0
    """scale a group's advantages down so none exceeds c in size (0: off); unlike a clip it keeps the group's zero sum"""
    num_updates_per_batch: int = 1
    """optimizer updates per generation batch, each over the whole batch, all against the stored old log-probs"""
    micro_batch_size: int = 8
    """sequences per forward/backward pass per process (= group_size: one group, one shared prompt per pass)"""
    shared_prefix: bool = True
    """run a micro-batch's common prompt prefix once for all its rows (exact; a group's rows stay on one process)"""
    dynamic_sampling: bool = True
    """drop groups that cannot teach (see ds_rule) and refill from new prompts"""
    ds_rule: Literal["variance", "accuracy"] = "variance"
    """variance: keep groups whose rewards differ (DAPO); accuracy: keep accuracy in [ds_low, ds_high] (TaoSR1)"""
    ds_low: float = 0.01
    """ds_rule accuracy: lowest group accuracy kept (0.01 drops all-wrong groups)"""
    ds_high: float = 0.99
    """ds_rule accuracy: highest group accuracy kept (0.99 drops all-correct groups)"""
    underfill_scale: bool = True
    """scale the learning rate of a step that kept fewer groups than prompts_per_step by kept / prompts_per_step"""
    prompt_sampling: Literal["natural", "balanced"] = "natural"
    """training prompt order: the data's natural label mix, or balanced by gold label"""
    ds_max_tries: int = 3
    """refill rounds per step before training on what was kept"""
    ordinal_reward: bool = False
    """partial outcome credit by label distance instead of 1/0"""
    recompute_old_logprobs: bool = False
    """recompute old log-probs with a training forward pass (always with --vllm, whose numerics differ, as verl does)"""
    vllm: bool = False
    """generate with a colocated vLLM engine (weights synced after each step); needs vllm installed"""
    vllm_gpu_memory: float = flags.may_change_on_resume(0.3)
    """share of GPU memory given to vLLM"""
    vllm_sleep: bool = flags.may_change_on_resume(False)
    """put the vLLM engine to sleep (weights and KV cache off the GPU) during each update"""
    gen_batch_size: int = flags.may_change_on_resume(16)
    """prompts per generation forward pass (HF backend)"""
    max_empty_steps: int = flags.may_change_on_resume(5)
    """stop after this many consecutive steps that train on nothing (every group dropped; 0: never stop)"""
    log_samples_every: int = flags.may_change_on_resume(10)
    """steps between tables of sample completions"""
    save_every: int = flags.may_change_on_resume(50)
    """steps between checkpoints"""


# ==================================================================================================
# Advantages and the policy loss (METHOD.md section 5)
# ==================================================================================================
def group_advantages(
    rewards: list[list[float]], scale: str = "group", clamp: float = 0.0, eps: float = 1e-4
) -> list[torch.Tensor]:
    """Rewards of each group (groups may differ in size) -> advantages of each group.

    A zero-variance group gets exactly zero. clamp > 0 scales a group down until no advantage exceeds
    it: a clip would cut a rare success (G = 8, one correct: +2.47 -> +2) and leave the group's
    advantages summing below zero, a net push away from the prompt the policy is just learning.
    """
    batch_std = torch.tensor([r for group in rewards for r in group]).std() if scale == "batch" else None
    advantages = []
    for group in rewards:
        r = torch.tensor(group, dtype=torch.float32)
        centred = r - r.mean()
        if scale == "group":
            centred = centred / (r.std() + eps)
        elif scale == "batch":
            centred = centred / (batch_std + eps)
        if (r == r[0]).all():  # exactly zero, not mean()'s rounding / eps
            centred = torch.zeros_like(r)
        if clamp > 0:
            centred = centred * min(1.0, clamp / max(centred.abs().max().item(), 1e-12))
        advantages.append(centred)
    return advantages


def token_weights(mask: torch.Tensor, agg: str, n_tokens: int, n_sequences: int, max_new_tokens: int) -> torch.Tensor:
    """Per-token weights that turn a sum of token losses into the chosen aggregate of the *global* batch.

    The counts are over every sequence of the update on every process, so summing micro-batch losses
    gives the same gradient however the batch is split.
    """
    if agg == "token":
        return mask / n_tokens
    if agg == "sequence":
        return mask / mask.sum(-1, keepdim=True).clamp(min=1) / n_sequences
    return mask / (n_sequences * max_new_tokens)


def grpo_loss(logp, old_logp, advantages, weights, eps_low: float, eps_high: float, beta: float = 0.0, ref_logp=None):
    """Clipped token-level policy-gradient loss with an optional k3 KL penalty; all tensors [B, T].

    advantages are per token (a sequence's advantage broadcast over its tokens); weights carry the
    completion mask and the aggregation (token_weights).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if beta > 0:
        q = ref_logp - logp
        per_token = per_token + beta * (torch.exp(q) - q - 1)
    loss = (per_token * weights).sum()
    on = weights > 0
    stats = dict(
        clip_low=((ratio < 1 - eps_low) & (advantages < 0) & on).sum(),
        clip_high=((ratio > 1 + eps_high) & (advantages > 0) & on).sum(),
        approx_kl=(((old_logp - logp).exp() - (old_logp - logp) - 1) * on).sum(),  # k3(pi_old || pi_theta)
    )
    return loss, stats


# ==================================================================================================
# Rollouts: generate, score, keep
# ==================================================================================================
def score_group(
    texts: list[str], example: D.Example, rulebook: R.Rulebook, args: Args
) -> tuple[list[R.Score], list[float]]:
    scores = [
        R.score_output(t, example.label, example.criteria, rulebook, args.order, args.ordinal_reward) for t in texts
    ]
    return scores, [R.grpo_reward(s) for s in scores]


def scored_group(
    out: rollouts.Rollouts,
    i: int,
    position: int,
    example_index: int,
    prompt: list[int],
    example: D.Example,
    rulebook: R.Rulebook,
    args: Args,
) -> dict:
    """The i-th prompt's group of a rollout batch (its completions i*G .. (i+1)*G), scored: what every later
    decision of the step reads."""
    G = args.group_size
    own = slice(i * G, (i + 1) * G)
    texts = out.texts[own]
    scores, group_rewards = score_group(texts, example, rulebook, args)
    return dict(
        position=position,
        example_index=example_index,
        prompt=prompt,
        gold=example.label,
        completions=out.completion_ids[own],
        old_logprobs=out.logprobs[own],
        truncated=out.truncated[own],
        texts=texts,
        rewards=group_rewards,
        correct=[s.correct for s in scores],
        format_ok=[s.format_ok for s in scores],
        labels=[s.parsed.label for s in scores],
        adherent=[s.adherent for s in scores],
    )


def keeps(group: dict, args: Args) -> bool:
    """Dynamic sampling: a group teaches only if its rewards differ (a zero-variance group has zero
    advantage everywhere); TaoSR1's rule keeps groups whose accuracy lies in [ds_low, ds_high]."""
    if args.ds_rule == "variance":
        return len(set(group["rewards"])) > 1
    return args.ds_low <= sum(group["correct"]) / len(group["correct"]) <= args.ds_high


def training_rows(groups: list[dict], advantages: list[torch.Tensor]) -> list[dict]:
    """One row per completion: the prompt it is trained under, its tokens, old log-probs, per-token advantages."""
    rows = []
    for g, group in enumerate(groups):
        for j, completion in enumerate(group["completions"]):
            rows.append(
                dict(
                    prompt=group["prompt"],
                    completion=completion,
                    old_logprobs=group["old_logprobs"][j],
                    advantages=[advantages[g][j].item()] * len(completion),
                )
            )
    return rows


NO_UPDATE = dict(
    loss=0.0, clip_low=0.0, clip_high=0.0, approx_kl=0.0, ref_kl=0.0, entropy=0.0, grad_norm=0.0, nan_skipped=0
)


def rows_per_rank(rows: list[dict], world: int, by_prompt: bool) -> list[list[dict]]:
    """The step's rows shared out over the ranks. by_prompt: a group's rows stay together, in order, on the rank
    with the fewest rows so far, so that their prompt is run once for them (models.token_logprobs); else every
    world-th row, length-sorted on each rank (little padding)."""
    if not by_prompt:
        return [sorted(rows[r::world], key=lambda r: len(r["prompt"]) + len(r["completion"])) for r in range(world)]
    shares = [[] for _ in range(world)]
    for _, group in itertools.groupby(rows, key=lambda r: r["prompt"]):  # a group's rows are adjacent
        min(shares, key=len).extend(group)
    return shares


def update_policy(
    model, reference, optimizer, accelerator, tokenizer, rows: list[dict], args: Args, step: int, nan_skips: int
) -> tuple[dict, int]:
    """Step 5: `num_updates_per_batch` optimizer updates over micro-batches of the step's rows, group-aligned when
    the prompt prefix is shared, else length-sorted (little padding); every rank runs as many (zero-weight filler
    rows where short). Returns the updates' statistics and the count of consecutive non-finite updates so far."""
    rank, world = accelerator.process_index, accelerator.num_processes
    update_stats, n_tokens = dict(NO_UPDATE), sum(len(r["completion"]) for r in rows)
    share_prefix = args.shared_prefix  # one forward call per micro-batch either way: under FSDP, on every rank
    shares = rows_per_rank(rows, world, share_prefix)
    mine = shares[rank]
    n_micro = max(-(-len(share) // args.micro_batch_size) for share in shares)
    mine += [dict(mine[0] if mine else rows[0], filler=True)] * (n_micro * args.micro_batch_size - len(mine))
    micro_batches = [mine[i : i + args.micro_batch_size] for i in range(0, len(mine), args.micro_batch_size)]
    for update in range(args.num_updates_per_batch):
        totals = torch.zeros(6)  # loss, clip_low, clip_high, approx_kl, ref_kl, entropy (token sums)
        for k, micro in enumerate(micro_batches):
            batch = models.pad_batch(
                [r["prompt"] for r in micro],
                [r["completion"] for r in micro],
                tokenizer.pad_token_id,
                accelerator.device,
                share_prefix,
            )
            mask = (
                batch["completion_mask"]
                * torch.tensor([0.0 if r.get("filler") else 1.0 for r in micro], device=accelerator.device)[:, None]
            )
            old_logp, adv = torch.zeros_like(mask), torch.zeros_like(mask)
            for i, r in enumerate(micro):
                old_logp[i, : len(r["completion"])] = torch.tensor(r["old_logprobs"])
                adv[i, : len(r["completion"])] = torch.tensor(r["advantages"])
            temperature = args.temperature if args.temperature > 0 else 1.0
            if (args.recompute_old_logprobs or args.vllm) and update == 0:  # stored back for the later updates
                with torch.no_grad():
                    old_logp = models.token_logprobs(model, batch, temperature)[0]
                for i, r in enumerate(micro):
                    r["old_logprobs"] = old_logp[i, : len(r["completion"])].tolist()
            ref_logp = None
            if reference is not None:
                with torch.no_grad():
                    ref_logp = models.token_logprobs(reference, batch, temperature)[0]
            # gradients accumulate over micro-batches; DDP all-reduces after the last, FSDP reduce-scatters each
            with launch.micro_batch_sync(accelerator, model, last=k == len(micro_batches) - 1):
                logp, entropy = models.token_logprobs(model, batch, temperature, with_entropy=True)
                weights = token_weights(mask, args.loss_agg, n_tokens, len(rows), args.max_new_tokens)
                loss, stats = grpo_loss(
                    logp, old_logp, adv, weights, args.clip_eps_low, args.clip_eps_high, args.beta, ref_logp
                )
                accelerator.backward(loss * world)  # DDP averages gradients over ranks; we want the sum
            ref_kl = (
                ((torch.exp(ref_logp - logp) - (ref_logp - logp) - 1) * mask).sum() if ref_logp is not None else 0.0
            )
            totals += torch.tensor(
                [
                    loss.item(),
                    stats["clip_low"].item(),
                    stats["clip_high"].item(),
                    stats["approx_kl"].item(),
                    float(ref_kl),
                    (entropy * mask).sum().item(),
                ]
            )
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), "sum").cpu()
        if not torch.isfinite(totals[0]) or not torch.isfinite(grad_norm):
            nan_skips += 1
            update_stats["nan_skipped"] += 1
            optimizer.zero_grad(set_to_none=True)
            if nan_skips >= args.max_nan_skips:
                raise errors.RunStopped(
                    f"{nan_skips} consecutive updates with a non-finite loss or gradient: stopping at step {step + 1}"
                )
            continue
        nan_skips = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_stats.update(
            loss=totals[0].item(),
            clip_low=totals[1].item() / n_tokens,
            clip_high=totals[2].item() / n_tokens,
            approx_kl=totals[3].item() / n_tokens,
            ref_kl=totals[4].item() / n_tokens,
            entropy=totals[5].item() / n_tokens,
            grad_norm=grad_norm.item(),
        )
    return update_stats, nan_skips


def memory_workload(args: Args) -> memory.Workload:
    """What a step holds in memory besides the model and its optimizer, for the --dry-run plan."""
    vllm_share = args.vllm_gpu_memory if args.vllm else None
    return memory.Workload(
        args.micro_batch_size,
        args.max_new_tokens,
        args.max_item_tokens,
        args.beta > 0,
        args.prompts_per_step,
        args.group_size,
        args.gen_batch_size,
        vllm_share,
    )


def gather_groups(groups: list[dict]) -> list[dict]:
    """Every process gets every group, in prompt order, so all later decisions are identical on all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return groups
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, groups)
    return sorted((g for part in everything for g in part), key=lambda g: g["position"])


def main(args: Args) -> dict:
    script = Path(__file__).stem  # a copy of this file names its own runs
    args.run_name = args.run_name or f"{script}-{Path(args.model).name}-{args.dataset}-s{args.seed}"
    launch.launch(args, script, memory_workload(args))
    accelerator = launch.make_accelerator(args.device, args.strategy, args.precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    run = runs.Run(args, script)
    checkpoints.seed_everything(args.seed)

    # --- data, policy, reference (only when beta > 0), optimizer ----------------------------------
    dataset = D.load_for(args)
    rulebook, examples = dataset.rulebook, dataset.examples
    resume_from, state = checkpoints.resume_point(run) if args.resume else (None, None)
    model, tokenizer = checkpoints.load_policy(  # whole on every rank: the --beta reference is its copy
        args.model, resume_from, accelerator, args.gradient_checkpointing, whole_on_every_rank=args.beta > 0
    )
    reference = None
    if args.beta > 0:  # the frozen initial policy, also after a resume
        reference = models.load_model(args.model, str(accelerator.device))[0] if resume_from else copy.deepcopy(model)
        # bf16 on GPUs: it is never updated
        reference.eval().requires_grad_(False).to(launch.compute_dtype(accelerator))
    prompt_ids, prompt_truncated = zip(
        *(D.encode_prompt(tokenizer, e, rulebook, args.order, args.max_item_tokens) for e in examples)
    )
    if run.main:
        runs.write_json(run.dir / "data_stats.json", dict(dataset.stats, prompts_truncated=sum(prompt_truncated)))
        runs.write_prompt(run.dir, args.split, tokenizer.decode(prompt_ids[0]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step, data_position, generated = 0, 0, 0  # prompts taken from the shuffled stream; completions sampled
    if resume_from is not None:
        checkpoints.set_rng_state(state["rng"])
        step, data_position, generated = state["step"], state["data_position"], state["generated"]
        print(f"[resume] from {resume_from} at step {step}, data position {data_position}")
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from is not None:  # after prepare: under FSDP each rank loads its own shard
        checkpoints.load_training_state(model, optimizer, resume_from, state)
    engine = None
    if args.vllm:  # context: the longest prompt, room for AGR's guidance, the completion
        engine = rollouts.make_vllm_engine(
            checkpoints.whole_weights(args.model, resume_from),
            max(map(len, prompt_ids)) + 128 + args.max_new_tokens,
            args.vllm_gpu_memory,
            args.seed + rank,
            args.vllm_sleep,
            load_weights=False,  # the policy's weights are pushed before the first rollout
        )
    stop = checkpoints.StopFlag()

    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch: int) -> list[int]:
        if args.prompt_sampling == "balanced":
            return D.balanced_order(examples, rulebook.labels, args.seed * 1000 + epoch)
        order = list(range(len(examples)))
        random.Random(args.seed * 1000 + epoch).shuffle(order)
        return order

    def stream(position: int) -> int:
        return epoch_order(position // len(examples))[position % len(examples)]

    def rollout(positions: list[int], timer: dict) -> list[dict]:
        """Generate and score the groups of the prompts at these stream positions (this rank's share)."""
        mine = positions[rank::world]
        if not mine:
            return []
        # A group's sampling seed depends only on (seed, stream position): any rank, any resume, same tokens.
        seeds = [args.seed * 1_000_003 + p for p in mine]
        kwargs = dict(
            n=args.group_size,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            min_new_tokens=args.min_new_tokens,
        )
        out = rollouts.rollout_generate(
            model,
            accelerator,
            engine,
            tokenizer,
            [prompt_ids[stream(p)] for p in mine],
            seeds=seeds,
            batch_size=args.gen_batch_size,
            **kwargs,
        )
        t0 = time.perf_counter()
        groups = [
            scored_group(out, i, p, stream(p), prompt_ids[stream(p)], examples[stream(p)], rulebook, args)
            for i, p in enumerate(mine)
        ]
        timer["scoring"] += time.perf_counter() - t0
        return groups

    # --- training loop -------------------------------------------------------------------------
    nan_skips, empty_steps, stopped = 0, 0, ""
    progress = tqdm(
        range(step, args.total_steps), desc="grpo", disable=not run.main, initial=step, total=args.total_steps
    )
    start_step = step
    for step in progress:
        timer = dict(generation=0.0, scoring=0.0, training=0.0)
        started = time.perf_counter()
        # every rank, once, before any rollout: generation itself has no collective
        rollouts.refresh_rollout_weights(model, accelerator, engine)

        # 1-3. sample prompts, generate G completions each, score; dynamic sampling refills dropped groups
        kept, scored, dropped = [], [], dict(all_correct=0, all_wrong=0, other=0)
        for attempt in range(1 + (args.ds_max_tries if args.dynamic_sampling else 0)):
            need = args.prompts_per_step - len(kept)
            positions = list(range(data_position, data_position + need))
            data_position += need
            generated += need * args.group_size
            t0, scoring_before = time.perf_counter(), timer["scoring"]
            groups = gather_groups(rollout(positions, timer))
            timer["generation"] += time.perf_counter() - t0 - timer["scoring"] + scoring_before
            scored += groups
            for group in groups:
                accuracy = sum(group["correct"]) / len(group["correct"])
                if not args.dynamic_sampling or keeps(group, args):
                    kept.append(group)
                else:
                    dropped["all_correct" if accuracy == 1 else "all_wrong" if accuracy == 0 else "other"] += 1
            if len(kept) >= args.prompts_per_step:
                break
        empty_steps = 0 if kept else empty_steps + 1  # every group dropped: this step trains on nothing
        rollouts.release_rollout_memory(engine, args.vllm_sleep)

        # 4. advantages: group-normalised rewards, broadcast to every completion token
        t0 = time.perf_counter()
        rows = []
        if kept:
            advantages = group_advantages([g["rewards"] for g in kept], args.adv_scale, args.adv_clamp)
            rows = training_rows(kept, advantages)
        timer["scoring"] += time.perf_counter() - t0

        # 5. optimizer updates over micro-batches (update_policy). An underfilled step (dynamic sampling kept too few
        #    groups) moves the policy by its share of a full one: the learning rate, not the loss, is scaled (Adam
        #    would undo a scaled loss)
        t0 = time.perf_counter()
        update_stats, n_tokens = dict(NO_UPDATE), sum(len(r["completion"]) for r in rows)
        update_scale = min(1.0, len(kept) / args.prompts_per_step) if args.underfill_scale else 1.0
        if rows:
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps)) * update_scale
            update_stats, nan_skips = update_policy(
                model, reference, optimizer, accelerator, tokenizer, rows, args, step, nan_skips
            )
        timer["training"] += time.perf_counter() - t0

        # 6. log
        done = step + 1
        all_rewards = [r for g in scored for r in g["rewards"]]
        lengths = [len(c) for g in scored for c in g["completions"]]
        n_all = len(all_rewards)
        mean_reward = sum(all_rewards) / n_all
        seconds = time.perf_counter() - started
        metrics = dict(
            reward_mean=mean_reward,
            reward_std=(sum((r - mean_reward) ** 2 for r in all_rewards) / n_all) ** 0.5,
            accuracy=sum(c for g in scored for c in g["correct"]) / n_all,
            format_rate=sum(c for g in scored for c in g["format_ok"]) / n_all,
            adherence_rate=sum(c for g in scored for c in g["adherent"]) / n_all,
            zero_variance_groups=sum(len(set(g["rewards"])) == 1 for g in scored) / len(scored),
            low_accuracy_groups=sum(sum(g["correct"]) <= 0.25 * len(g["correct"]) for g in scored) / len(scored),
            all_fail_groups=sum(not any(g["correct"]) for g in scored) / len(scored),
            groups_kept=len(kept),
            groups_dropped=sum(dropped.values()),
            groups_dropped_all_correct=dropped["all_correct"],
            groups_dropped_all_wrong=dropped["all_wrong"],
            groups_dropped_other=dropped["other"],
            completion_len_mean=sum(lengths) / n_all,
            completion_len_max=max(lengths),
            truncation_rate=sum(t for g in scored for t in g["truncated"]) / n_all,
            generated_tokens_per_second=sum(lengths) / max(timer["generation"], 1e-9),
            trained_tokens_per_second=n_tokens * args.num_updates_per_batch / max(timer["training"], 1e-9),
            tokens_per_second=(sum(lengths) + n_tokens * args.num_updates_per_batch) / seconds,
            time_generation=timer["generation"],
            time_scoring=timer["scoring"],
            time_training=timer["training"],
            step_seconds=seconds,
            lr=args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps)),
            data_position=data_position,
            completions_generated=generated,
            update_scale=update_scale if rows else 0.0,
            empty_steps=empty_steps,
            **E.label_shares(scored, rulebook.labels),
            **update_stats,
        )
        run.log(metrics, step=done)
        if done == start_step + 1 and run.main and args.total_steps > done:  # what the whole run will take
            tqdm.write(
                runs.time_estimate(
                    seconds,
                    args.total_steps - done,
                    "--total-steps, --prompts-per-step, --group-size, --max-new-tokens",
                ),
                file=sys.stderr,
            )
        progress.set_postfix(
            reward=f"{metrics['reward_mean']:.3f}",
            acc=f"{metrics['accuracy']:.3f}",
            **({"EMPTY": f"{empty_steps} in a row"} if empty_steps else {}),
            **({"COLLAPSED": f"{c[0]} {c[1]:.0%}"} if (c := E.collapsed_onto(metrics, rulebook.labels)) else {}),
        )
        if empty_steps:
            tqdm.write(
                f"warning: step {done} trained on nothing: dynamic sampling dropped all {len(scored)} groups "
                f"({dropped['all_wrong']} all wrong, {dropped['all_correct']} all right)"
                + (
                    f"; likely cause: {E.empty_step_cause(metrics, dropped, rulebook.labels, Path(args.model).is_dir())}"
                    if empty_steps == 1
                    else ""
                ),
                file=sys.stderr,
            )
            if empty_steps >= args.max_empty_steps > 0:  # saved and evaluated below, then reported
                stopped = (
                    f"{empty_steps} steps in a row trained on nothing (--max-empty-steps {args.max_empty_steps}); "
                    f"likely cause: {E.empty_step_cause(metrics, dropped, rulebook.labels, Path(args.model).is_dir())}"
                )
        if done % args.log_samples_every == 0 or done == 1:
            run.log_samples(
                [
                    dict(
                        query=examples[g["example_index"]].query,
                        gold=examples[g["example_index"]].label,
                        completion=g["texts"][0],
                        reward=g["rewards"][0],
                    )
                    for g in scored[:4]
                ],
                step=done,
            )

        # 7. checkpoint
        out_of_budget, stop_now = 0 < args.generation_budget <= generated, stop.agreed()
        if done % args.save_every == 0 or done == args.total_steps or out_of_budget or stopped or stop_now:
            checkpoints.save_checkpoint(
                run.dir,
                done,
                model,
                tokenizer,
                dict(rng=checkpoints.rng_state(), data_position=data_position, generated=generated),
                keep_last=args.keep_last,
                final=done == args.total_steps or out_of_budget or bool(stopped),
                accelerator=accelerator,
                optimizer=optimizer,
            )
        if out_of_budget or stopped:
            break
        if stop_now:
            print(f"stopped at step {done}; continue with --resume")
            return {}
    accelerator.wait_for_everyone()

    # --- evaluation on the dev split ------------------------------------------------------------
    metrics = E.final_eval(args, model, tokenizer, run, str(accelerator.device))
    run.finish(dict(eval=metrics))
    if stopped:
        raise errors.RunStopped(stopped)
    return metrics


if __name__ == "__main__":
    cli.run(main, Args)
