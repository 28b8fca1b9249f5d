"""TaoSR1 stage 2: pass@N sampling from the SFT policy, preference pairs, DPO against the frozen SFT model.

    python dpo.py --model runs/sft/checkpoint --dataset synthetic --total-steps 100
    python dpo.py --model runs/sft/checkpoint --dataset esci --data-path data/esci --num-gpus 8
    python dpo.py --model runs/sft/checkpoint --pairs-path runs/dpo-old/pairs.jsonl   # reuse a sampling

In the order it runs:
1. pass@N: N completions per training prompt from the SFT policy (seeded per example), each scored
   with rewards.score_output.
2. pairs (`build_pairs`): chosen = correct, rule-adherent, well-formed and finished; rejected = wrong
   label or unparseable; same prompt. Prompts without a pair are counted by reason and skipped.
   Saved to <run>/pairs.jsonl, statistics to <run>/pair_stats.json.
3. reference log-probs: the policy before its first update IS the frozen SFT reference, so the
   summed completion log-probs of every pair are computed once with it (no_grad, eval mode) and kept
   in <run>/reference_logps.json; no reference model stays in memory.
4. DPO (`dpo_loss`, sigmoid or IPO) over a seeded shuffled stream of pairs; the loss is the mean over
   the pairs of the whole optimizer batch, exact across micro-batches and processes.
5. evaluation on the eval split -> <run>/eval.json.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

import data as D
import eval as E
import rewards as R
from helpers import checkpoints, cli, errors, flags, launch, memory, models, rollouts, runs


@dataclass
class Args(flags.TrainFlags):
    # and the flags every training script shares: helpers/flags.py (model, data, seeds, run folder, processes)
    total_steps: int = flags.may_change_on_resume(100)
    """optimizer steps"""
    n_samples: int = 8
    """N of pass@N: completions sampled per prompt"""
    sample_temperature: float = 1.0
    """temperature of the pass@N sampling"""
    max_new_tokens: int = 128
    """generation budget per completion (pass@N sampling and the final evaluation)"""
    gen_batch_size: int = flags.may_change_on_resume(16)
    """prompts per generation forward pass during pass@N sampling"""
    pairs_per_prompt: int = 1
    """most (chosen, rejected) pairs built from one prompt"""
    pairs_path: str | None = None
    """reuse a saved pairs.jsonl instead of sampling (reference log-probs are recomputed with --model)"""
    sample_margin: float = 2.0
    """pass@N first samples this many times the prompts that total_steps needs, then more while pairs are short"""
    sample_all: bool = False
    """pass@N over the whole training pool instead of as many prompts as the steps need"""
    beta: float = 0.1
    """DPO temperature: strength of the implicit KL to the reference"""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: -log sigmoid(beta * margin) (DPO); ipo: (margin - 1/(2 beta))^2 on summed log-probs"""
    lr: float = 1e-6
    """peak learning rate (AdamW), constant after warm-up"""
    batch_size: int = 4
    """pairs per micro-batch per process (each pair is two sequences)"""
    grad_accum: int = 2
    """micro-batches per optimizer step"""
    warmup_steps: int = 10
    """linear warm-up of the learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    shared_prefix: bool = True
    """run a micro-batch's common prompt prefix (the system prompt) once for all its rows (exact)"""
    log_every: int = flags.may_change_on_resume(5)
    """steps between metric lines (each line averages the steps since the last one)"""
    save_every: int = flags.may_change_on_resume(100)
    """steps between checkpoints"""


# ==================================================================================================
# Pairs from pass@N groups (METHOD.md section 7)
# ==================================================================================================
SKIP_REASONS = ("all_correct", "all_wrong", "no_adherent_correct")


def build_pairs(groups: list[dict], max_pairs_per_prompt: int = 1, seed: int = 0) -> tuple[list[dict], dict]:
    """Preference pairs from scored groups of completions; pure (no model, no I/O).

    A group is one prompt: `prompt_ids`, and per completion `completions` (token ids), `texts`,
    `correct`, `adherent`, `format_ok`, optionally `truncated`; optionally `source_id`,
    `example_index`, `gold`.
    - chosen: correct AND rule-adherent AND format-valid AND finished (not cut by max_new_tokens,
      so DPO never raises the likelihood of an answer without its stop token);
    - rejected: not correct (a wrong label, or no readable label at all);
    - identical completions (same token ids) count once;
    - a prompt with no pair is counted under the first reason that applies: `all_correct` (nothing
      to reject), `all_wrong` (nothing correct), `no_adherent_correct` (correct ones exist, none
      adherent, well-formed and finished);
    - up to `max_pairs_per_prompt` distinct pairs per prompt, chosen with a seeded generator
      (seed, group index), preferring pairs whose completions are not used yet.
    """
    if max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt must be >= 1, got {max_pairs_per_prompt}")
    pairs: list[dict] = []
    stats = dict(
        prompts=len(groups),
        prompts_with_pairs=0,
        pairs=0,
        duplicates=0,
        chosen_candidates=0,
        rejected_candidates=0,
        **{reason: 0 for reason in SKIP_REASONS},
    )
    for g, group in enumerate(groups):
        completions = group["completions"]
        truncated = group.get("truncated") or [False] * len(completions)
        seen, chosen, rejected = set(), [], []
        for j, ids in enumerate(completions):
            key = tuple(ids)
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
            if not group["correct"][j]:
                rejected.append(j)
            elif group["adherent"][j] and group["format_ok"][j] and not truncated[j]:
                chosen.append(j)
        stats["chosen_candidates"] += len(chosen)
        stats["rejected_candidates"] += len(rejected)
        if completions and not rejected:
            stats["all_correct"] += 1
            continue
        if not any(group["correct"]):
            stats["all_wrong"] += 1
            continue
        if not chosen:
            stats["no_adherent_correct"] += 1
            continue
        rng = random.Random(seed * 1_000_003 + g)
        candidates = [(c, r) for c in chosen for r in rejected]
        rng.shuffle(candidates)
        picked, used_c, used_r = [], set(), set()
        for fresh_needed in (2, 1, 0):  # both completions new, then one, then any remaining pair
            for c, r in candidates:
                if len(picked) >= max_pairs_per_prompt:
                    break
                if (c, r) not in picked and (c not in used_c) + (r not in used_r) >= fresh_needed:
                    picked.append((c, r))
                    used_c.add(c)
                    used_r.add(r)
        for c, r in picked:
            pairs.append(
                dict(
                    source_id=group.get("source_id", ""),
                    example_index=group.get("example_index", g),
                    gold=group.get("gold"),
                    prompt_ids=list(group["prompt_ids"]),
                    chosen_ids=list(completions[c]),
                    rejected_ids=list(completions[r]),
                    chosen_text=group["texts"][c],
                    rejected_text=group["texts"][r],
                )
            )
        stats["prompts_with_pairs"] += bool(picked)
        stats["pairs"] += len(picked)
    return pairs, stats


def write_pairs(path: Path, pairs: list[dict]) -> None:
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    os.replace(tmp, path)


def read_pairs(path: str | Path, vocab_size: int | None = None) -> list[dict]:
    """A pairs.jsonl written by this script; checks every row has non-empty token-id lists."""
    if not Path(path).is_file():
        raise errors.UserError(f"--pairs-path {path} does not exist")
    pairs = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
                ids = row.get(key)
                if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
                    raise ValueError(f"{path}:{line_no}: {key} must be a non-empty list of token ids")
                if vocab_size is not None and max(ids) >= vocab_size:
                    raise ValueError(
                        f"{path}:{line_no}: {key} has token id {max(ids)} >= vocabulary size "
                        f"{vocab_size}: pairs made with another tokenizer?"
                    )
            pairs.append(row)
    return pairs


# ==================================================================================================
# Log-probs and the DPO loss
# ==================================================================================================
def pair_batch(pairs: list[dict], pad_id: int, device, share_prefix: bool = False) -> dict[str, torch.Tensor]:
    """One `pad_batch` of 2B sequences: the B chosen completions, then the B rejected ones.

    With `share_prefix` the rows' common prompt prefix (the system prompt) is run once for the batch.
    """
    prompts = [p["prompt_ids"] for p in pairs]
    completions = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    return models.pad_batch(prompts + prompts, completions, pad_id, device, share_prefix)


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log pi(completion | prompt) per row, completion tokens only (prompt and padding masked): [B]."""
    logp, _ = models.token_logprobs(model, batch)
    return torch.where(batch["completion_mask"] > 0, logp, torch.zeros_like(logp)).sum(-1)


@torch.no_grad()
def reference_logps(
    model, pairs: list[dict], pad_id: int, batch_size: int = 8, share_prefix: bool = False
) -> tuple[list[float], list[float]]:
    """Summed completion log-probs of every pair's chosen and rejected completion under `model` (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        logps = sequence_logps(model, pair_batch(chunk, pad_id, device, share_prefix)).double().cpu()
        chosen += logps[: len(chunk)].tolist()
        rejected += logps[len(chunk) :].tolist()
    model.train(was_training)
    return chosen, rejected


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
):
    """Per-pair DPO loss and implicit rewards; inputs are summed completion log-probs, all [B].

    margin = (pi_c - ref_c) - (pi_r - ref_r)
    sigmoid: -log sigmoid(beta * margin)           (Rafailov et al., 2023)
    ipo:     (margin - 1 / (2 beta))^2              (Azar et al., 2023; here on summed log-probs)
    rewards: beta * (pi - ref), detached (for logging).
    """
    chosen_logratio = policy_chosen_logp - ref_chosen_logp
    rejected_logratio = policy_rejected_logp - ref_rejected_logp
    margin = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * margin)
    elif loss_type == "ipo":
        loss = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}: expected sigmoid or ipo")
    return loss, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def gather_rows(rows: list, key) -> list:
    """Every process gets every row, sorted by `key` (a no-op with one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sorted(rows, key=key)
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, rows)
    return sorted((r for part in everything for r in part), key=key)


def main(args: Args) -> dict:
    script = Path(__file__).stem  # a copy of this file names its own runs
    args.run_name = args.run_name or f"{script}-{Path(args.model).name}-{args.dataset}-s{args.seed}"
    launch.launch(
        args,
        script,
        memory.Workload(args.batch_size, args.max_new_tokens, args.max_item_tokens, reference=args.beta > 0),
    )
    accelerator = launch.make_accelerator(args.device, args.strategy, args.precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    run = runs.Run(args, script)
    checkpoints.seed_everything(args.seed)
    resume_from, state = checkpoints.resume_point(run) if args.resume else (None, None)
    model, tokenizer = checkpoints.load_policy(  # whole on every rank: pass@N and the reference use it before prepare
        args.model, resume_from, accelerator, args.gradient_checkpointing, whole_on_every_rank=True
    )
    pad_id = tokenizer.pad_token_id

    def sft_policy():
        """The frozen SFT model: the policy itself before training, reloaded after a resume."""
        return model if resume_from is None else models.load_model(args.model, str(accelerator.device))[0]

    # --- 1-2. pairs: reused (resume / --pairs-path) or built from pass@N sampling ---------------------
    pairs_file, stats_file = run.dir / "pairs.jsonl", run.dir / "pair_stats.json"
    if args.resume and pairs_file.exists():
        pairs = read_pairs(pairs_file, len(tokenizer))
        pair_stats = json.loads(stats_file.read_text()) if stats_file.exists() else dict(pairs=len(pairs))
        print(f"[resume] {len(pairs)} pairs from {pairs_file}")
    elif args.pairs_path:
        pairs = read_pairs(args.pairs_path, len(tokenizer))
        pair_stats = dict(source=str(args.pairs_path), pairs=len(pairs))
        print(f"{len(pairs)} pairs from {args.pairs_path}")
    else:
        dataset = D.load_for(args)
        rulebook, examples = dataset.rulebook, dataset.examples
        # pass@N: each process samples its share of the prompts; completion j of example i depends only on
        # (seed, i, j), so the pairs are the same for any number of processes, batch size or rerun.
        encoded = {}
        started = time.perf_counter()
        policy = sft_policy()
        N = args.n_samples

        def sample(indices: list[int]) -> list[dict]:
            mine = indices[rank::world]
            for i in mine:
                encoded.setdefault(
                    i, D.encode_prompt(tokenizer, examples[i], rulebook, args.order, args.max_item_tokens)
                )
            out = rollouts.generate(
                policy,
                tokenizer,
                [encoded[i][0] for i in mine],
                n=N,
                max_new_tokens=args.max_new_tokens,
                temperature=args.sample_temperature,
                seeds=[args.seed * 1_000_003 + i for i in mine],
                batch_size=args.gen_batch_size,
                desc=f"pass@{N}" if run.main else None,
            )
            groups = []
            for k, i in enumerate(mine):
                e, texts = examples[i], out.texts[k * N : (k + 1) * N]
                scores = [R.score_output(t, e.label, e.criteria, rulebook, args.order) for t in texts]
                groups.append(
                    dict(
                        example_index=i,
                        source_id=e.source_id,
                        gold=e.label,
                        prompt_ids=encoded[i][0],
                        prompt_truncated=encoded[i][1],
                        completions=out.completion_ids[k * N : (k + 1) * N],
                        texts=texts,
                        truncated=out.truncated[k * N : (k + 1) * N],
                        correct=[s.correct for s in scores],
                        adherent=[s.adherent for s in scores],
                        format_ok=[s.format_ok for s in scores],
                    )
                )
            order = {i: position for position, i in enumerate(indices)}
            return gather_rows(groups, key=lambda g: order[g["example_index"]])

        # Sized to the job: the steps consume total_steps x per_step pairs, so sample prompts (in a seeded
        # order) until that many pairs exist: first `sample_margin` times the prompts needed, then, while
        # pairs are short, as many more as the measured pairs per prompt says (none after a round without
        # any pair: more of the same policy would not help). --sample-all samples the whole pool.
        pool = list(range(len(examples)))
        random.Random(args.seed).shuffle(pool)
        needed = args.total_steps * args.batch_size * args.grad_accum * world
        groups, pairs, taken = [], [], 0
        while taken < len(pool):
            if args.sample_all:
                size = len(pool)
            elif not groups:
                size = math.ceil(needed / args.pairs_per_prompt * args.sample_margin)
            elif len(pairs) >= needed or not pairs:
                break
            else:
                size = math.ceil((needed - len(pairs)) * len(groups) / len(pairs) * 1.25)
            groups += sample(pool[taken : taken + size])
            taken += size
            pairs = build_pairs(groups, args.pairs_per_prompt, args.seed)[0]
        if run.main:
            print(
                f"pass@{N}: sampled {len(groups)} of {len(pool)} training prompts for {needed} pairs "
                f"({args.total_steps} steps x {needed // max(1, args.total_steps)}); --sample-all samples them all"
            )
            runs.write_json(
                run.dir / "data_stats.json",
                dict(
                    dataset.stats,
                    prompts_sampled=len(groups),
                    prompts_truncated=sum(g["prompt_truncated"] for g in groups),
                ),
            )
        if policy is not model:
            del policy
        pairs, pair_stats = build_pairs(groups, args.pairs_per_prompt, args.seed)
        flat = lambda key: [x for g in groups for x in g[key]]  # noqa: E731
        n_all = max(1, len(flat("correct")))
        eligible = [
            any(
                c and a and f and not t
                for c, a, f, t in zip(g["correct"], g["adherent"], g["format_ok"], g["truncated"])
            )
            for g in groups
        ]
        pair_stats.update(
            sample_accuracy=sum(flat("correct")) / n_all,
            sample_format_rate=sum(flat("format_ok")) / n_all,
            sample_adherence_rate=sum(flat("adherent")) / n_all,
            sample_truncation_rate=sum(flat("truncated")) / n_all,
            pass_at_n=sum(eligible) / max(1, len(groups)),
            sampling_seconds=time.perf_counter() - started,
            prompts_sampled=len(groups),
            prompts_in_pool=len(pool),
            pairs_needed=needed,
            completion_len_mean=sum(len(c) for c in flat("completions")) / n_all,
        )
    if run.main and (resume_from is None or not pairs_file.exists()):
        write_pairs(pairs_file, pairs)
        runs.write_json(stats_file, pair_stats)
    if run.main and resume_from is None:  # a resumed run has logged them already
        run.log({f"pairs/{k}": v for k, v in pair_stats.items() if isinstance(v, (int, float))}, step=0)
        run.log_samples(
            [
                dict(source_id=p["source_id"], gold=p.get("gold"), chosen=p["chosen_text"], rejected=p["rejected_text"])
                for p in pairs[:4]
            ],
            step=0,
        )
    print("pairs: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in pair_stats.items()))
    if not pairs:
        print(
            "WARNING: no preference pair (see pair_stats.json): the policy is saved unchanged, no DPO step is taken",
            file=sys.stderr,
            flush=True,
        )

    # --- 3. reference log-probs, once, with the frozen SFT policy ------------------------------------
    ref_file = run.dir / "reference_logps.json"
    saved = json.loads(ref_file.read_text()) if args.resume and ref_file.exists() else None
    if saved is not None and saved["n_pairs"] == len(pairs):
        ref_chosen, ref_rejected = saved["chosen"], saved["rejected"]
    else:
        started = time.perf_counter()
        policy = sft_policy()
        mine = list(range(rank, len(pairs), world))
        # the unwrapped model (not yet prepared), so the shared prefix is exact with any number of processes
        chosen, rejected = reference_logps(
            policy, [pairs[i] for i in mine], pad_id, args.batch_size, args.shared_prefix
        )
        rows = gather_rows(list(zip(mine, chosen, rejected)), key=lambda r: r[0])
        ref_chosen, ref_rejected = [r[1] for r in rows], [r[2] for r in rows]
        if policy is not model:
            del policy
        if run.main:
            runs.write_json(
                ref_file,
                dict(
                    model=args.model,
                    n_pairs=len(pairs),
                    chosen=ref_chosen,
                    rejected=ref_rejected,
                    seconds=time.perf_counter() - started,
                ),
            )
    ref_chosen = torch.tensor(ref_chosen, dtype=torch.float32)
    ref_rejected = torch.tensor(ref_rejected, dtype=torch.float32)

    # --- optimizer, resume ---------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step, data_position = 0, 0  # data_position: pairs taken from the shuffled stream so far
    if resume_from is not None:
        if state.get("n_pairs") != len(pairs):
            raise RuntimeError(
                f"checkpoint {resume_from} was trained on {state.get('n_pairs')} pairs, the run folder "
                f"holds {len(pairs)}: refusing an inexact resume"
            )
        checkpoints.set_rng_state(state["rng"])
        step, data_position = state["step"], state["data_position"]
        print(f"[resume] from {resume_from} at step {step}, data position {data_position}")
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from is not None:  # after prepare: under FSDP each rank loads its own shard
        checkpoints.load_training_state(model, optimizer, resume_from, state)
    stop = checkpoints.StopFlag()
    per_step = args.batch_size * args.grad_accum * world

    @functools.lru_cache(maxsize=2)
    def pair_order(epoch: int) -> list[int]:
        order = list(range(len(pairs)))
        random.Random(args.seed * 1000 + epoch).shuffle(order)
        return order

    def lr_at(step: int) -> float:
        return args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))

    def checkpoint(done: int, final: bool) -> None:
        checkpoints.save_checkpoint(
            run.dir,
            done,
            model,
            tokenizer,
            dict(rng=checkpoints.rng_state(), data_position=data_position, n_pairs=len(pairs)),
            keep_last=args.keep_last,
            final=final,
            accelerator=accelerator,
            optimizer=optimizer,
        )

    # --- 4-5. training loop --------------------------------------------------------------------------
    keys = ("loss", "reward_chosen", "reward_rejected", "reward_accuracy", "logp_chosen", "logp_rejected")
    nan_skips, window = 0, dict(steps=0, seconds=0.0, **{k: 0.0 for k in keys})
    total_steps = args.total_steps if pairs else step
    if not pairs and resume_from is None:
        checkpoint(0, final=True)
    progress = tqdm(range(step, total_steps), desc="dpo", disable=not run.main, initial=step, total=total_steps)
    for step in progress:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        # This step's pairs: the next per_step positions of the endless shuffled stream; each rank takes
        # its own slice, so the global batch is the same for any number of processes.
        stream = [
            pair_order((data_position + i) // len(pairs))[(data_position + i) % len(pairs)] for i in range(per_step)
        ]
        data_position += per_step
        mine = stream[rank::world]
        micro_batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
        # Mean over the pairs of the global batch: each micro-batch contributes its sum / per_step
        # (DDP averages gradients over ranks, hence * world).
        totals = torch.zeros(len(keys), dtype=torch.float64)
        for k, index in enumerate(micro_batches):
            batch = pair_batch([pairs[i] for i in index], pad_id, accelerator.device, args.shared_prefix)
            # gradients accumulate over micro-batches; DDP all-reduces after the last, FSDP reduce-scatters each
            with launch.micro_batch_sync(accelerator, model, last=k == len(micro_batches) - 1):
                logps = sequence_logps(model, batch)
                policy_chosen, policy_rejected = logps[: len(index)], logps[len(index) :]
                loss_per_pair, reward_chosen, reward_rejected = dpo_loss(
                    policy_chosen,
                    policy_rejected,
                    ref_chosen[index].to(logps.device),
                    ref_rejected[index].to(logps.device),
                    args.beta,
                    args.loss,
                )
                accelerator.backward(loss_per_pair.sum() / per_step * world)
            totals += torch.tensor(
                [
                    loss_per_pair.detach().sum().item(),
                    reward_chosen.sum().item(),
                    reward_rejected.sum().item(),
                    (reward_chosen > reward_rejected).sum().item(),
                    policy_chosen.detach().sum().item(),
                    policy_rejected.detach().sum().item(),
                ],
                dtype=torch.float64,
            )
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        if world > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), "sum").cpu()
        done = step + 1
        if torch.isfinite(totals).all() and torch.isfinite(grad_norm):
            nan_skips = 0
            optimizer.step()
            window["steps"] += 1
            window["seconds"] += time.perf_counter() - started
            for i, key in enumerate(keys):
                window[key] += (totals[i] / per_step).item()
        else:  # skip the update, say so, and give up after too many in a row (checkpoints still happen)
            nan_skips += 1
            run.log(dict(nan_skipped=1, nan_skips_consecutive=nan_skips), step=done)
            if nan_skips >= args.max_nan_skips:
                raise errors.RunStopped(
                    f"{nan_skips} consecutive steps with a non-finite loss or gradient: stopping at step {done}"
                )
        optimizer.zero_grad(set_to_none=True)
        if window["steps"] and (done % args.log_every == 0 or done == total_steps):
            metrics = {key: window[key] / window["steps"] for key in keys}
            metrics.update(
                reward_margin=metrics["reward_chosen"] - metrics["reward_rejected"],
                lr=lr_at(step),
                grad_norm=grad_norm.item(),
                epoch=data_position / len(pairs),
                step_seconds=window["seconds"] / window["steps"],
                pairs_per_second=per_step * window["steps"] / window["seconds"],
            )
            run.log(metrics, step=done)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['reward_accuracy']:.2f}")
            window = dict(steps=0, seconds=0.0, **{k: 0.0 for k in keys})
        if done % args.save_every == 0 or done == total_steps or stop.requested:
            checkpoint(done, final=done == total_steps)
        if stop.requested:
            print(f"stopped at step {done}; continue with --resume")
            return {}
    accelerator.wait_for_everyone()

    # --- 6. evaluation on the eval split -------------------------------------------------------------
    metrics = E.final_eval(args, model, tokenizer, run, str(accelerator.device))
    run.finish(dict(eval=metrics, pairs=pair_stats))
    return metrics


if __name__ == "__main__":
    cli.run(main, Args)
