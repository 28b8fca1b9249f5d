"""TaoSR-AGRL: GRPO plus Rule-aware Reward Shaping (RRS) and Adaptive Guided Replay (AGR).

    python agrl.py --model runs/sft/checkpoint --dataset esci --data-path data/esci --num-gpus 8
    python agrl.py --model tiny-random --dataset synthetic --total-steps 3 --prompts-per-step 2 --group-size 4 --max-new-tokens 16

This file is grpo.py with two ideas added (`diff grpo.py agrl.py` shows exactly them):
- RRS (--rrs; off by default: results/agr-screening): reward = w_out * outcome + w_crit * criteria stated
  correctly + w_rule * rule adherence of a correct label, gated (an unparseable answer gets the format penalty
  only), so a wrong label never earns by rationalising itself; "segment" credit puts each criterion's own
  group-normalised advantage on the tokens of its line.
- AGR: a group whose accuracy is <= tau (default 0: all answers wrong) is stagnant, and we make guided answers:
  by default the gold answer's first segment forced as the start of the response and the rest sampled by the
  policy (or the SFT target, or a hint in the prompt). The correct, well-formed and rule-adherent ones are
  appended to the group and learned under the *unguided* prompt by a likelihood term, while the group's own
  answers keep GRPO's advantages (all wrong: none) and the step keeps GRPO's size. The paper-reading variant
  (union advantages, replacement, re-queue and replay, shaping correction) is a set of flags: docs/METHOD.md.
With --no-rrs --no-agr this script makes the same updates as grpo.py.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
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
    rrs: bool = False
    """Rule-aware Reward Shaping (off: the sparse outcome reward of grpo.py)"""
    rrs_credit: Literal["sequence", "segment"] = "sequence"
    """sequence: one shaped scalar per completion; segment: each criterion's advantage on the tokens of its line"""
    w_out: float = 1.0
    """RRS weight of the outcome (label == gold)"""
    w_crit: float = 0.5
    """RRS weight of the share of known gold criteria stated correctly"""
    w_rule: float = 0.5
    """RRS weight of rule adherence (the label follows from the stated criteria)"""
    format_penalty: float = -0.5
    """RRS reward of an answer that does not parse (and nothing else)"""
    agr: bool = True
    """Adaptive Guided Replay for stagnant groups"""
    agr_tau: float = 0.0
    """a group whose accuracy is <= tau is stagnant"""
    agr_guide: Literal["prefix", "hint", "target"] = "prefix"
    """prefix: force the gold answer's first segment as the response, sample the rest; hint: gold facts in the prompt; target: the SFT target itself"""
    agr_mix: Literal["replace", "append"] = "append"
    """kept guided answers replace the group's lowest-reward rollouts (stays G long) or are appended to it"""
    agr_k: int = 0
    """guided completions sampled per stagnant group (0: group_size // 4; target mode adds one)"""
    agr_max_level: int = 2
    """guidance levels: 1 names the gold values of the criteria the group got wrong, 2 adds the gold label"""
    agr_recover: float = 0.5
    """a prompt's guidance level drops by one when its running accuracy reaches this"""
    agr_ema: float = 0.5
    """weight of the newest group accuracy in a prompt's running accuracy"""
    agr_correction: Literal["shaping", "is", "none"] = "is"
    """off-policy correction for guided completions: p/(p+gamma) shaping, truncated IS, or the plain on-policy ratio"""
    agr_gamma: float = 0.1
    """gamma of the shaping correction"""
    agr_is_cap: float = 2.0
    """truncation of the importance ratio pi_theta(o|x) / pi_old(o|x+guide)"""
    agr_advantage: Literal["union", "own"] = "own"
    """union: z-score over the group with its guided answers in it; own: over the policy's own samples only (zero when all fail, as in GRPO), guided answers get none"""
    agr_nll_weight: float = 1.0
    """weight of a likelihood term -log pi_theta on the guided answers' tokens, aggregated like the policy loss (HPT, UFT; 0: off)"""
    agr_forced_weight: float = 1.0
    """weight of the forced tokens in the policy-gradient term (0: only the sampled continuation is trained by it)"""
    agr_prefix_frac: float = 1.0
    """share of the gold segment's tokens forced by prefix guidance (at least one token; BREAD's short prefixes)"""
    agr_prefix_anneal: bool = False
    """shrink the forced share linearly from agr_prefix_frac towards one token over the run (UFT's annealed hint)"""
    agr_replay_fresh: bool = True
    """replayed answers get behaviour log-probs from the current policy (first training forward), not the stored, stale ones"""
    agr_buffer_size: int = 0
    """successful guided completions kept per prompt for replay"""
    agr_replay_delay: int = 0
    """a stagnant prompt comes back this many steps later, in at most half a batch (0: only when the stream brings it)"""
    agr_replay_queue: int = 64
    """most stagnant prompts waiting to come back"""
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
    """stop after this many consecutive steps that train on nothing (every group dropped, or guided answers only while none of the policy's own parse; 0: never stop)"""
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


def own_advantages(groups: list[dict], scale: str = "group", clamp: float = 0.0) -> list[torch.Tensor]:
    """--agr-advantage own: each group's own samples are normalised among themselves, exactly as GRPO would
    without the guided answers (all wrong: all zero); the guided answers get zero (they learn by likelihood)."""
    own = [[j for j, guided in enumerate(g["guided"]) if not guided] for g in groups]
    own_adv = group_advantages([[g["rewards"][j] for j in js] or [0.0] for g, js in zip(groups, own)], scale, clamp)
    advantages = []
    for g, js, adv in zip(groups, own, own_adv):
        full = torch.zeros(len(g["rewards"]))
        full[js] = adv[: len(js)]
        advantages.append(full)
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


def grpo_loss(
    logp,
    old_logp,
    advantages,
    weights,
    eps_low: float,
    eps_high: float,
    beta: float = 0.0,
    ref_logp=None,
    forced=None,
    correction: str = "shaping",
    gamma: float = 0.1,
    is_cap: float = 2.0,
    forced_weight: float = 1.0,
    nll_mask=None,
    nll_weight: float = 0.0,
):
    """Clipped token-level policy-gradient loss with an optional k3 KL penalty; all tensors [B, T].

    advantages are per token (a sequence's advantage broadcast over its tokens); weights carry the
    completion mask and the aggregation (token_weights). Forced tokens ([B, T] bool: AGR's gold
    prefix, a target, a hinted answer) are off-policy: "shaping" drops ratio and clip for
    p / (p + gamma) with p = pi_theta(o_t | x, o_<t) (its gradient lifts rare tokens); "is" uses the
    ratio to the stored behaviour log-prob truncated at is_cap; "none" the clipped ratio against
    pi_old(o | x), which old_logp then holds. The policy's own tokens keep the clipped ratio. forced_weight
    scales the forced tokens' term; nll_weight adds a likelihood term -log pi_theta on the tokens of nll_mask (the
    guided answers), aggregated by the same weights.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if forced is not None and (correction != "none" or forced_weight != 1.0):
        if correction == "shaping":
            p = logp.exp()
            off_policy = -(p / (p + gamma)) * advantages
        elif correction == "is":
            off_policy = -torch.clamp(ratio, max=is_cap) * advantages
        else:
            off_policy = per_token
        per_token = torch.where(forced, forced_weight * off_policy, per_token)
    nll = (-logp * nll_mask * weights).sum() if nll_mask is not None else logp.new_zeros(())
    if nll_weight > 0:
        per_token = per_token - nll_weight * logp * nll_mask
    if beta > 0:
        q = ref_logp - logp
        per_token = per_token + beta * (torch.exp(q) - q - 1)
    loss = (per_token * weights).sum()
    on = (
        (weights > 0) & ~forced if forced is not None and correction != "none" else weights > 0
    )  # tokens the clip applies to
    stats = dict(
        clip_low=((ratio < 1 - eps_low) & (advantages < 0) & on).sum(),
        clip_high=((ratio > 1 + eps_high) & (advantages > 0) & on).sum(),
        approx_kl=(((old_logp - logp).exp() - (old_logp - logp) - 1) * on).sum(),  # k3(pi_old || pi_theta)
        guided_nll=nll.detach(),  # the likelihood term before its weight, as the loss aggregates it
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
    if not args.rrs:
        return scores, [R.grpo_reward(s) for s in scores]
    # In segment credit the criteria earn their own per-line advantages instead of a share of the scalar.
    w_crit = args.w_crit if args.rrs_credit == "sequence" else 0.0
    return scores, [R.rrs_reward(s, args.w_out, w_crit, args.w_rule, args.format_penalty) for s in scores]


# ==================================================================================================
# Rule-aware Reward Shaping, segment credit: each criterion's advantage on the tokens of its line
# ==================================================================================================
def criterion_credit(score: R.Score) -> dict[str, float | None]:
    """Per criterion: 1 if stated correctly (gated like RRS: the answer parses), 0 if not, None if gold unknown."""
    return {name: None if ok is None else float(ok and score.format_ok) for name, ok in score.criteria.items()}


def criterion_token_indices(
    tokenizer, completion: list[int], spans: dict[str, tuple[int, int]]
) -> dict[str, list[int]]:
    """Which completion tokens make up each criterion's line (char spans of the decoded text -> tokens)."""
    ends = [len(tokenizer.decode(completion[: k + 1], skip_special_tokens=True)) for k in range(len(completion))]
    starts = [0] + ends[:-1]
    return {
        name: [k for k in range(len(completion)) if starts[k] < b and ends[k] > a and ends[k] > starts[k]]
        for name, (a, b) in spans.items()
    }


def segment_advantages(group: dict, sequence_advantages: torch.Tensor, tokenizer, args: Args) -> list[list[float]]:
    """Per-token advantages of one group: the outcome advantage on every token, plus each criterion's
    group-normalised correctness (over the rollouts where its gold value is known) on its line's tokens."""
    G = len(group["completions"])
    per_token = [[sequence_advantages[j].item()] * len(group["completions"][j]) for j in range(G)]
    line_tokens = [criterion_token_indices(tokenizer, group["completions"][j], group["spans"][j]) for j in range(G)]
    for name in group["credit"][0]:
        known = [j for j in range(G) if group["credit"][j][name] is not None]
        if len(known) < 2:
            continue
        values = torch.tensor([group["credit"][j][name] for j in known])
        criterion_adv = (
            group_advantages(
                [values.tolist()], args.adv_scale if args.adv_scale != "batch" else "group", args.adv_clamp
            )[0]
            * args.w_crit
        )
        for j, adv in zip(known, criterion_adv.tolist()):
            for k in line_tokens[j].get(name, []):
                per_token[j][k] += adv
    return per_token


# ==================================================================================================
# Adaptive Guided Replay
# ==================================================================================================
GROUP_FIELDS = (
    "completions",
    "old_logprobs",
    "truncated",
    "texts",
    "rewards",
    "correct",
    "format_ok",
    "adherent",
    "labels",
    "criteria",
    "credit",
    "spans",
    "guided",
    "forced",
)
REPLAY_KEY = 1 << 32  # stream keys of re-queued prompts start here (seeds and order stay unique)


def guidance_text(example: D.Example, wrong_criteria: list[str], level: int) -> str:
    """Level 1 names the gold values of the criteria the group got wrong; level 2 adds the gold label
    (so does level 1 when no known criterion was wrong: there is nothing else to point at)."""
    parts = []
    if wrong_criteria:
        parts.append(
            "Check these criteria: " + "; ".join(f"{c} is {example.criteria[c]}" for c in wrong_criteria) + "."
        )
    if level >= 2 or not wrong_criteria:
        parts.append(f"The correct label is {example.label}.")
    return " ".join(parts)


def wrong_criteria(group: dict) -> list[str]:
    """Criteria with a known gold value that some incorrect rollout of the group stated wrongly."""
    failing = [j for j, ok in enumerate(group["correct"]) if not ok]
    names = list(group["criteria"][0])
    return [name for name in names if any(group["criteria"][j][name] is False for j in failing)]


def gold_segment_ids(tokenizer, example: D.Example, rulebook: R.Rulebook, order: str, segments: int = 1) -> list[int]:
    """The SFT target's first tokens that spell its first `segments` segments (label_first: the label line,
    then the criteria block; think_first: the criteria block, then the reason), as the policy would say them."""
    target = D.sft_target(example, rulebook, order)
    ends = [
        target.index(tag) + len(tag) + 1
        for tag in (("</label>", "</criteria>") if order == "label_first" else ("</criteria>", "</reason>"))
    ]
    segment = target[: ends[min(segments, 2) - 1]]
    ids = tokenizer.encode(target, add_special_tokens=False)
    k = 1
    while k < len(ids) and len(tokenizer.decode(ids[:k])) < len(segment):
        k += 1
    return ids[:k]


def mix_into(group: dict, candidates: list[dict], mode: str = "replace") -> dict:
    """A copy of the group with the candidates in it: in place of the lowest-reward rollouts (the group
    stays G long) or appended (the group grows)."""
    group = {k: list(v) if k in GROUP_FIELDS else v for k, v in group.items()}
    if mode == "append":
        for candidate in candidates:
            for key in GROUP_FIELDS:
                group[key].append(candidate[key])
        return group
    lowest_first = sorted(range(len(group["rewards"])), key=lambda j: group["rewards"][j])
    for j, candidate in zip(lowest_first, candidates):
        for key in GROUP_FIELDS:
            group[key][j] = candidate[key]
    return group


def guided_answers(
    policy,
    tokenizer,
    to_guide: list[dict],
    examples: list[D.Example],
    rulebook: R.Rulebook,
    args: Args,
    K: int,
    device,
    sample=None,
) -> list[dict]:
    """Guided answers for stagnant groups: token ids, behaviour log-probs, texts, and how many leading
    tokens were forced rather than sampled (the off-policy part).

    prefix: the gold answer's first segment (level 2: two segments) forced under the *unguided*
    prompt, the rest sampled, so only the forced tokens are off-policy; hint: K answers sampled from
    the prompt plus the guidance paragraph, all off-policy for pi(. | x); target: the SFT target itself
    (one, no generation). Behaviour log-probs of forced tokens are a teacher-forced forward under x.
    `sample` generates like `rollouts.generate` without the model argument (default: rollouts.generate on `policy`).
    Without a local `policy` (FSDP with vLLM) the forced tokens' log-probs are NaN: update_policy computes them
    with its first training forward, the same pi_old(o | x) on every rank.
    """
    temperature = args.temperature if args.temperature > 0 else 1.0

    def forced_logprobs(prompt: list[int], tokens: list[int]) -> list[float]:
        if policy is None:
            return [math.nan] * len(tokens)
        batch = models.pad_batch([prompt], [tokens], tokenizer.pad_token_id, device)
        with torch.no_grad():
            return models.token_logprobs(policy, batch, temperature)[0][0, : len(tokens)].tolist()

    results = []
    if args.agr_guide == "target":
        for t in to_guide:
            _, labels, _ = D.encode_sft(
                tokenizer, examples[t["group"]["example_index"]], rulebook, args.order, args.max_item_tokens
            )
            target = [tok for tok in labels if tok != -100]
            results.append(
                dict(
                    position=t["position"],
                    completions=[target],
                    truncated=[False],
                    forced=[len(target)],
                    logprobs=[forced_logprobs(t["group"]["prompt"], target)],
                    texts=[tokenizer.decode(target, skip_special_tokens=True)],
                )
            )
        return results
    if args.agr_guide == "hint":
        prompts = [
            D.encode_prompt(
                tokenizer,
                examples[t["group"]["example_index"]],
                rulebook,
                args.order,
                args.max_item_tokens,
                guidance=t["guidance"],
            )[0]
            for t in to_guide
        ]
        prefixes = [[] for _ in to_guide]
    else:
        prefixes = [
            gold_segment_ids(tokenizer, examples[t["group"]["example_index"]], rulebook, args.order, t["level"])
            for t in to_guide
        ]
        prefixes = [p[: max(1, math.ceil(t.get("prefix_frac", 1.0) * len(p)))] for t, p in zip(to_guide, prefixes)]
        prompts = [t["group"]["prompt"] + prefix for t, prefix in zip(to_guide, prefixes)]
    budget = max(1, args.max_new_tokens - max(len(prefix) for prefix in prefixes))
    gen = (sample or functools.partial(rollouts.generate, policy))(
        tokenizer,
        prompts,
        n=K,
        max_new_tokens=budget,
        temperature=args.temperature,
        top_p=args.top_p,
        min_new_tokens=min(args.min_new_tokens, budget),
        batch_size=args.gen_batch_size,
        seeds=[args.seed * 1_000_003 + t["group"]["position"] + 987_654_321 for t in to_guide],
    )
    for i, (t, prefix) in enumerate(zip(to_guide, prefixes)):
        own = slice(i * K, (i + 1) * K)
        forced_logp = forced_logprobs(t["group"]["prompt"], prefix) if prefix else []
        results.append(
            dict(
                position=t["position"],
                completions=[prefix + c for c in gen.completion_ids[own]],
                logprobs=[forced_logp + lp for lp in gen.logprobs[own]],
                truncated=gen.truncated[own],
                texts=[tokenizer.decode(prefix, skip_special_tokens=True) + text for text in gen.texts[own]],
                forced=[len(prefix) if prefix else len(c) for c in gen.completion_ids[own]],
            )
        )
    return results


class AGR:
    """Adaptive Guided Replay's state and decisions over a run.

    Per prompt (example index): its guidance level, running accuracy, whether it was ever stagnant, and a
    buffer of its successful guided answers. Stagnant prompts are re-queued to come back
    agr_replay_delay steps later, so escalation, replay and decay act within an epoch. `state()` is what a
    checkpoint keeps; `stats` counts this step's decisions for the metric line.
    """

    def __init__(self, args: Args, examples: list[D.Example], rulebook: R.Rulebook, saved: dict | None = None):
        self.args, self.examples, self.rulebook = args, examples, rulebook
        saved = saved or {}
        self.prompts: dict[int, dict] = saved.get("agr_state", {})
        self.queue: list[tuple[int, int]] = saved.get("replay_queue", [])  # (due step, example index)
        self.replay_count = saved.get("replay_count", 0)
        self.returning: dict[int, int] = {}  # this step's returning prompts: stream key -> example index
        self.stats: dict[str, int] = {}

    def state(self) -> dict:
        return dict(agr_state=self.prompts, replay_queue=self.queue, replay_count=self.replay_count)

    def new_step(self) -> None:
        self.stats = dict(
            stagnant=0,
            guided=0,
            replayed=0,
            guided_sampled=0,
            guided_tried=0,
            guided_kept=0,
            level_1=0,
            level_2=0,
            once_stagnant_correct=0,
            once_stagnant_total=0,
            requeued=0,
            returned=0,
            recovered=0,
        )

    def take_returning(self, step: int, limit: int) -> list[int]:
        """Keys of the re-queued prompts due by this step (at most `limit`), oldest first."""
        self.returning.clear()
        due = [q for q in self.queue if q[0] <= step][:limit]
        self.queue = [q for q in self.queue if q not in due]
        keys = []
        for _, example_index in due:
            keys.append(REPLAY_KEY + self.replay_count)
            self.returning[keys[-1]] = example_index
            self.replay_count += 1
        return keys

    def replay_or_guide(self, groups: list[dict], step: int, guide) -> list[dict]:
        """Detect stagnant groups, re-queue their prompts, replay or guide them, keep the correct, well-formed
        and adherent guided answers and mix them into the group. Returns new groups; the inputs stay the
        policy's own. `guide(to_guide, K)` makes this rank's share of the guided answers."""
        args, stats = self.args, self.stats
        K = 1 if args.agr_guide == "target" else args.agr_k or max(1, args.group_size // 4)
        out, to_guide = list(groups), []
        for i, group in enumerate(groups):
            st = self.prompts.setdefault(
                group["example_index"], dict(level=0, accuracy=None, buffer=[], stagnant_ever=False)
            )
            accuracy = sum(group["correct"]) / len(group["correct"])
            returned = group["position"] >= REPLAY_KEY
            stats["returned"] += returned
            if st["stagnant_ever"]:
                stats["once_stagnant_correct"] += sum(group["correct"])
                stats["once_stagnant_total"] += len(group["correct"])
            st["accuracy"] = (
                accuracy if st["accuracy"] is None else (1 - args.agr_ema) * st["accuracy"] + args.agr_ema * accuracy
            )
            if accuracy > args.agr_tau:
                stats["recovered"] += returned
                if st["level"] > 0 and st["accuracy"] >= args.agr_recover:
                    st["level"] -= 1  # guidance decays as the prompt recovers
                continue
            stats["stagnant"] += 1
            st["stagnant_ever"] = True
            waiting = any(q[1] == group["example_index"] for q in self.queue)
            if args.agr_replay_delay > 0 and not waiting and len(self.queue) < args.agr_replay_queue:
                self.queue.append((step + args.agr_replay_delay, group["example_index"]))
                stats["requeued"] += 1
            if st["buffer"]:  # replay successful guided answers before generating new guidance; all off-policy now
                replayed = [dict(c, forced=len(c["completions"])) for c in st["buffer"][-K:]]
                if args.agr_replay_fresh:  # NaN: pi_old(o | x) from the first training forward (update_policy)
                    replayed = [dict(c, old_logprobs=[math.nan] * len(c["completions"])) for c in replayed]
                out[i] = mix_into(group, replayed, args.agr_mix)
                stats["replayed"] += 1
                continue
            st["level"] = min(st["level"] + 1, args.agr_max_level)
            stats[f"level_{st['level']}"] += 1
            guidance = guidance_text(self.examples[group["example_index"]], wrong_criteria(group), st["level"])
            frac = args.agr_prefix_frac * (1 - step / args.total_steps if args.agr_prefix_anneal else 1.0)
            to_guide.append(dict(position=i, group=group, guidance=guidance, level=st["level"], prefix_frac=frac))

        for result in gather_groups(guide(to_guide, K)):  # shared out like the rollouts, then gathered
            group = groups[result["position"]]
            scores, guided_rewards = score_group(
                result["texts"], self.examples[group["example_index"]], self.rulebook, args
            )
            selected = [
                dict(
                    completions=c,
                    old_logprobs=lp,
                    truncated=tr,
                    texts=tx,
                    rewards=r,
                    correct=s.correct,
                    format_ok=s.format_ok,
                    adherent=s.adherent,
                    labels=s.parsed.label,
                    criteria=s.criteria,
                    credit=criterion_credit(s),
                    spans=s.parsed.spans,
                    guided=True,
                    forced=f,
                )
                for c, lp, tr, tx, r, s, f in zip(
                    result["completions"],
                    result["logprobs"],
                    result["truncated"],
                    result["texts"],
                    guided_rewards,
                    scores,
                    result["forced"],
                )
                if s.correct and s.adherent and s.format_ok
            ]
            stats["guided_sampled"] += len(result["completions"]) if args.agr_guide != "target" else 0
            stats["guided_tried"] += len(result["completions"])
            stats["guided_kept"] += len(selected)
            st = self.prompts[group["example_index"]]
            st["buffer"] = (st["buffer"] + selected)[-args.agr_buffer_size :] if args.agr_buffer_size > 0 else []
            if selected:
                out[result["position"]] = mix_into(group, selected, args.agr_mix)
                stats["guided"] += 1
        return out

    def metrics(self, n_groups: int) -> dict:
        """This step's AGR line: shares of the step's groups, counts, and the run's totals so far."""
        stats = self.stats
        return dict(
            agr_stagnant_share=stats["stagnant"] / n_groups,
            agr_guided_share=(stats["guided"] + stats["replayed"]) / n_groups,
            agr_buffer_hits=stats["replayed"],
            agr_level_1=stats["level_1"],
            agr_level_2=stats["level_2"],
            # None, not 0, on a step that tried nothing: a mean over steps must weight by the counts below
            agr_guided_success_rate=stats["guided_kept"] / stats["guided_tried"] if stats["guided_tried"] else None,
            agr_rescued_share=(
                stats["guided"] / (stats["stagnant"] - stats["replayed"])
                if stats["stagnant"] > stats["replayed"]
                else None
            ),
            agr_guided_tried=stats["guided_tried"],
            agr_guided_kept=stats["guided_kept"],
            agr_groups_guided=stats["guided"],
            agr_groups_guidable=stats["stagnant"] - stats["replayed"],
            agr_requeued=stats["requeued"],
            agr_returned=stats["returned"],
            agr_recovered=stats["recovered"],
            agr_queue_length=len(self.queue),
            agr_once_stagnant_accuracy=(
                stats["once_stagnant_correct"] / stats["once_stagnant_total"] if stats["once_stagnant_total"] else None
            ),
            agr_prompts_ever_stagnant=sum(st["stagnant_ever"] for st in self.prompts.values()),
        )


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
        criteria=[s.criteria for s in scores],
        credit=[criterion_credit(s) for s in scores],
        spans=[s.parsed.spans for s in scores],
        guided=[False] * G,
        forced=[0] * G,
    )


def keeps(group: dict, args: Args) -> bool:
    """Dynamic sampling: a group teaches only if its rewards differ (a zero-variance group has zero
    advantage everywhere); TaoSR1's rule keeps groups whose accuracy lies in [ds_low, ds_high]."""
    if args.ds_rule == "variance":
        return len(set(group["rewards"])) > 1
    return args.ds_low <= sum(group["correct"]) / len(group["correct"]) <= args.ds_high


def training_rows(
    groups: list[dict], advantages: list[torch.Tensor], token_advantages: list | None = None
) -> list[dict]:
    """One row per completion: the prompt it is trained under, its tokens, old log-probs, per-token advantages.

    Guided completions are trained under the group's *unguided* prompt: pi_theta(o | x), not x + guide.
    """
    rows = []
    for g, group in enumerate(groups):
        for j, completion in enumerate(group["completions"]):
            per_token = token_advantages[g][j] if token_advantages else [advantages[g][j].item()] * len(completion)
            rows.append(
                dict(
                    prompt=group["prompt"],
                    completion=completion,
                    old_logprobs=group["old_logprobs"][j],
                    advantages=per_token,
                    guided=group["guided"][j],
                    forced=group["forced"][j],
                )
            )
    return rows


NO_UPDATE = dict(
    loss=0.0,
    clip_low=0.0,
    clip_high=0.0,
    approx_kl=0.0,
    ref_kl=0.0,
    entropy=0.0,
    agr_guided_nll=0.0,
    grad_norm=0.0,
    nan_skipped=0,
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

    def needs_old_logprobs(r: dict) -> bool:
        """pi_old(o | x) from the first training forward: --recompute-old-logprobs and --vllm (engine numerics);
        correction "none" for guided rows, whose stored ones may be under x + guide (hint) or from an older policy
        (replay); and unknown (NaN) ones, AGR's forced tokens under FSDP with vLLM."""
        return (
            args.recompute_old_logprobs
            or args.vllm
            or (r["guided"] and args.agr_correction == "none")
            or any(map(math.isnan, r["old_logprobs"]))
        )

    # the forward is a collective under FSDP: decided from every rank's rows, the same answer on all ranks
    recompute_anywhere = any(map(needs_old_logprobs, rows))
    for update in range(args.num_updates_per_batch):
        totals = torch.zeros(7)  # loss, clip_low, clip_high, approx_kl, ref_kl, entropy (token sums), guided NLL
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
            if update == 0 and recompute_anywhere:
                recompute = [needs_old_logprobs(r) for r in micro]
                with torch.no_grad():
                    fresh = models.token_logprobs(model, batch, temperature)[0]
                for i, r in enumerate(micro):
                    if recompute[i]:
                        r["old_logprobs"] = fresh[i, : len(r["completion"])].tolist()
                        old_logp[i, : len(r["completion"])] = fresh[i, : len(r["completion"])]
            ref_logp = None
            if reference is not None:
                with torch.no_grad():
                    ref_logp = models.token_logprobs(reference, batch, temperature)[0]
            # gradients accumulate over micro-batches; DDP all-reduces after the last, FSDP reduce-scatters each
            with launch.micro_batch_sync(accelerator, model, last=k == len(micro_batches) - 1):
                logp, entropy = models.token_logprobs(model, batch, temperature, with_entropy=True)
                weights = token_weights(mask, args.loss_agg, n_tokens, len(rows), args.max_new_tokens)
                forced = torch.zeros_like(mask, dtype=torch.bool)  # AGR's off-policy tokens
                for i, r in enumerate(micro):
                    forced[i, : r["forced"]] = True
                guided = mask * torch.tensor([float(r["guided"]) for r in micro], device=mask.device)[:, None]
                loss, stats = grpo_loss(
                    logp,
                    old_logp,
                    adv,
                    weights,
                    args.clip_eps_low,
                    args.clip_eps_high,
                    args.beta,
                    ref_logp,
                    forced,
                    args.agr_correction,
                    args.agr_gamma,
                    args.agr_is_cap,
                    args.agr_forced_weight,
                    guided,
                    args.agr_nll_weight,
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
                    stats["guided_nll"].item(),
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
            agr_guided_nll=totals[6].item(),
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
    agr = AGR(args, examples, rulebook, state if resume_from is not None else None)

    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch: int) -> list[int]:
        if args.prompt_sampling == "balanced":
            return D.balanced_order(examples, rulebook.labels, args.seed * 1000 + epoch)
        order = list(range(len(examples)))
        random.Random(args.seed * 1000 + epoch).shuffle(order)
        return order

    def stream(position: int) -> int:
        if position in agr.returning:  # a stagnant prompt that AGR re-queued
            return agr.returning[position]
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

    def guided_candidates(to_guide: list[dict], K: int) -> list[dict]:
        """This rank's share of the stagnant groups -> their guided answers (gathered by AGR)."""
        mine = to_guide[rank::world]
        if not mine:
            return []
        sample = functools.partial(rollouts.rollout_generate, model, accelerator, engine)  # the rollouts' backend
        policy = rollouts.rollout_policy(model, engine)
        with accelerator.autocast():
            return guided_answers(policy, tokenizer, mine, examples, rulebook, args, K, accelerator.device, sample)

    # --- training loop -------------------------------------------------------------------------
    nan_skips, empty_steps, stopped = 0, 0, ""
    progress = tqdm(
        range(step, args.total_steps), desc="agrl", disable=not run.main, initial=step, total=args.total_steps
    )
    start_step = step
    for step in progress:
        timer = dict(generation=0.0, scoring=0.0, training=0.0)
        started = time.perf_counter()
        # every rank, once, before any rollout: generation itself has no collective
        rollouts.refresh_rollout_weights(model, accelerator, engine)

        # 1-3. sample prompts, generate G completions each, score; dynamic sampling refills dropped groups
        kept, scored, dropped = [], [], dict(all_correct=0, all_wrong=0, other=0)
        kept_on_own = 0  # kept groups that dynamic sampling keeps for their own samples: they set the step size
        agr.new_step()
        for attempt in range(1 + (args.ds_max_tries if args.dynamic_sampling else 0)):
            need = args.prompts_per_step - len(kept)
            # re-queued stagnant prompts first, at most half the batch so that the stream keeps moving
            back = agr.take_returning(step, need // 2) if args.agr and attempt == 0 else []
            positions = back + list(range(data_position, data_position + need - len(back)))
            data_position += need - len(back)
            generated += need * args.group_size
            t0, scoring_before = time.perf_counter(), timer["scoring"]
            groups = own_groups = gather_groups(rollout(positions, timer))
            scored += groups
            if args.agr:  # stagnant groups get guided answers; `scored` keeps the policy's own samples
                groups = agr.replay_or_guide(groups, step, guided_candidates)
            timer["generation"] += time.perf_counter() - t0 - timer["scoring"] + scoring_before
            for own, group in zip(own_groups, groups):
                accuracy = sum(group["correct"]) / len(group["correct"])
                if not args.dynamic_sampling or keeps(group, args):
                    kept.append(group)
                    kept_on_own += not args.dynamic_sampling or keeps(own, args)
                else:
                    dropped["all_correct" if accuracy == 1 else "all_wrong" if accuracy == 0 else "other"] += 1
            if len(kept) >= args.prompts_per_step:
                break
        # every group dropped, or kept only for AGR's guided answers: no group of the policy's own samples taught, or
        # none of them parsed (a base policy learns nothing of its own this way, measured: results/README.md)
        own_parsed = any(ok for g in scored for ok in g["format_ok"])
        guided_only = args.agr and bool(kept) and not (kept_on_own and own_parsed)
        if args.underfill_scale and not kept_on_own:
            kept = []  # guided answers alone make no step: its size is GRPO's for the same own samples, zero
        empty_steps = 0 if kept and not guided_only else empty_steps + 1
        rollouts.release_rollout_memory(engine, args.vllm_sleep)

        generated += agr.stats["guided_sampled"]  # guided samples count against the generation budget

        # 4. advantages: group-normalised rewards, broadcast to every completion token
        t0 = time.perf_counter()
        rows = []
        if kept:
            advantages = (own_advantages if args.agr and args.agr_advantage == "own" else group_advantages)(
                kept if args.agr and args.agr_advantage == "own" else [g["rewards"] for g in kept],
                args.adv_scale,
                args.adv_clamp,
            )
            token_advantages = None
            if args.rrs and args.rrs_credit == "segment":
                token_advantages = [
                    segment_advantages(group, advantages[g], tokenizer, args) for g, group in enumerate(kept)
                ]
            rows = training_rows(kept, advantages, token_advantages)
        timer["scoring"] += time.perf_counter() - t0

        # 5. optimizer updates over micro-batches (update_policy). An underfilled step (dynamic sampling kept too few
        #    groups) moves the policy by its share of a full one: the learning rate, not the loss, is scaled (Adam
        #    would undo a scaled loss)
        t0 = time.perf_counter()
        update_stats, n_tokens = dict(NO_UPDATE), sum(len(r["completion"]) for r in rows)
        # the step size is GRPO's for the same own samples: a group kept only for its guided answers does not grow it
        update_scale = min(1.0, kept_on_own / args.prompts_per_step) if args.underfill_scale else 1.0
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
        if args.agr:
            metrics.update(agr.metrics(len(scored)))
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
            what = (
                ("trained on guided answers only" if kept else "had guided answers only")
                if guided_only
                else "trained on nothing"
            )
            detail = (
                (f"none of the policy's own {n_all} answers parsed" if not own_parsed else "no own group taught")
                + ("" if kept else " (a step's size counts the own groups: nothing trained)")
                if guided_only
                else f"dynamic sampling dropped "
                f"all {len(scored)} groups ({dropped['all_wrong']} all wrong, {dropped['all_correct']} all right)"
            )
            tqdm.write(
                f"warning: step {done} {what}: {detail}"
                + (
                    f"; likely cause: {E.empty_step_cause(metrics, dropped, rulebook.labels, Path(args.model).is_dir())}"
                    if empty_steps == 1
                    else ""
                ),
                file=sys.stderr,
            )
            if empty_steps >= args.max_empty_steps > 0:  # saved and evaluated below, then reported
                stopped = (
                    f"{empty_steps} steps in a row {what} (--max-empty-steps {args.max_empty_steps}); "
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
                dict(rng=checkpoints.rng_state(), data_position=data_position, generated=generated, **agr.state()),
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
