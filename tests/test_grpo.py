"""Acceptance tests of grpo.py (METHOD.md section 5): the loss against a slow reference, micro-batch
exactness, advantages, dynamic sampling, metrics, resume, and a 2-process CPU run.

Everything runs on the 2-layer `tiny-random` model on CPU. A random model answers nothing correctly, so
its rewards are all 0 and no update happens; tests that need a moving policy replace `grpo.score_group`
with a deterministic non-trivial reward (a function of the completion text only).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import data as D  # noqa: E402
import eval as E  # noqa: E402
import grpo  # noqa: E402
import rewards as R  # noqa: E402
from helpers import launch, models  # noqa: E402

TIMING = ("time", "seconds", "per_second")


def tiny_args(tmp_path, **overrides) -> grpo.Args:
    base = dict(
        model="tiny-random",
        dataset="synthetic",
        limit=8,
        total_steps=3,
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=8,
        micro_batch_size=4,
        device="cpu",
        eval_limit=2,
        output_dir=str(tmp_path),
        temperature=1.0,
        warmup_steps=1,
        lr=1e-3,
        seed=1,
    )
    base.update(overrides)
    return grpo.Args(**base)


def text_reward(text: str) -> float:
    """A deterministic, process-independent reward of the text alone: 0, 0.5 or 1."""
    return float(sum(map(ord, text)) % 3) / 2


def fake_score_group(texts, example, rulebook, args):
    scores = [R.score_output(t, example.label, example.criteria, rulebook, args.order) for t in texts]
    rewards_ = [text_reward(t) for t in texts]
    return [dataclasses.replace(s, correct=r == 1.0) for s, r in zip(scores, rewards_)], rewards_


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def state_dict(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def assert_metrics_close(a: dict, b: dict, rel: float = 1e-6) -> None:
    a, b = untimed(a), untimed(b)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float) or isinstance(b[k], float):
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-9), k
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = models.load_model("tiny-random", "cpu")
    return model, tokenizer


# ==================================================================================================
# 1. grpo_loss + token_weights against a slow reference
# ==================================================================================================
def reference_loss(logp, old, adv, mask, agg, max_new, eps_low, eps_high, beta, ref):
    """Python loops over sequences and tokens; returns a torch scalar (differentiable) and the stats."""
    B, T = logp.shape
    lengths = [int(mask[i].sum()) for i in range(B)]
    n_tokens = sum(lengths)
    total = logp.new_zeros(())
    clip_low = clip_high = 0
    approx_kl = 0.0
    for i in range(B):
        for t in range(T):
            if mask[i, t] == 0:
                continue
            ratio = torch.exp(logp[i, t] - old[i, t])
            a = float(adv[i, t])
            clipped = min(max(ratio.item(), 1 - eps_low), 1 + eps_high)
            # -min(ratio*A, clip(ratio)*A): the clipped branch has no gradient
            term = -(ratio * a) if ratio.item() * a <= clipped * a else -torch.tensor(clipped * a)
            if beta > 0:
                q = ref[i, t] - logp[i, t]
                term = term + beta * (torch.exp(q) - q - 1)
            if agg == "token":
                w = 1.0 / n_tokens
            elif agg == "sequence":
                w = 1.0 / lengths[i] / B
            else:
                w = 1.0 / (B * max_new)
            total = total + term * w
            clip_low += ratio.item() < 1 - eps_low and a < 0
            clip_high += ratio.item() > 1 + eps_high and a > 0
            d = (old[i, t] - logp[i, t]).item()
            approx_kl += math.exp(d) - d - 1
    return total, dict(clip_low=clip_low, clip_high=clip_high, approx_kl=approx_kl)


def random_batch(seed=0, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 5, 1, 6]
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    logp = -torch.rand(B, T, generator=g) * 3 - 0.05
    # log-ratios on both sides of both clip bounds (exp: 1.65, 0.61, 1.11, 0.70, 1.35, 0.90, 1.0)
    pattern = torch.tensor([0.5, -0.5, 0.1, -0.35, 0.3, -0.1, 0.0])
    delta = pattern[(torch.arange(B)[:, None] + torch.arange(T)[None]) % 7]
    old = logp - delta + (torch.rand(B, T, generator=g) - 0.5) * 0.02
    seq_adv = torch.tensor([1.3, -0.7, -0.4, -1.5, 0.9])
    adv = seq_adv[:, None].expand(B, T).clone()
    ref = logp + (torch.rand(B, T, generator=g) - 0.5)
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("agg", ["token", "sequence", "constant"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_grpo_loss_matches_slow_reference(agg, beta):
    eps_low, eps_high, max_new = 0.2, 0.28, 9
    logp0, old, adv, mask, ref = random_batch()
    ratio = torch.exp(logp0 - old)
    on = mask > 0
    # the batch really exercises both clip sides
    assert ((ratio > 1 + eps_high) & (adv > 0) & on).any() and ((ratio < 1 - eps_low) & (adv < 0) & on).any()
    assert ((ratio < 1 - eps_low) & (adv > 0) & on).any() and ((ratio > 1 + eps_high) & (adv < 0) & on).any()

    logp = logp0.clone().requires_grad_(True)
    weights = grpo.token_weights(mask, agg, int(mask.sum()), mask.shape[0], max_new)
    loss, stats = grpo.grpo_loss(logp, old, adv, weights, eps_low, eps_high, beta, ref)
    loss.backward()

    logp_ref = logp0.clone().requires_grad_(True)
    expected, expected_stats = reference_loss(logp_ref, old, adv, mask, agg, max_new, eps_low, eps_high, beta, ref)
    expected.backward()

    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(logp.grad, logp_ref.grad, atol=1e-6, rtol=1e-5)
    assert int(stats["clip_low"]) == expected_stats["clip_low"] > 0
    assert int(stats["clip_high"]) == expected_stats["clip_high"] > 0
    assert stats["approx_kl"].item() == pytest.approx(expected_stats["approx_kl"], rel=1e-5)
    assert torch.all(logp.grad[mask == 0] == 0)  # padding never contributes


def test_token_weights_aggregations():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(grpo.token_weights(mask, "token", 4, 2, 4), mask / 4)
    torch.testing.assert_close(
        grpo.token_weights(mask, "sequence", 4, 2, 4), torch.tensor([[1 / 6, 1 / 6, 1 / 6, 0], [1 / 2, 0, 0, 0]])
    )
    torch.testing.assert_close(grpo.token_weights(mask, "constant", 4, 2, 4), mask / 8)
    # per sequence, the "sequence" weights sum to 1 / n_sequences; "token" weights of the batch sum to 1
    assert grpo.token_weights(mask, "sequence", 4, 2, 4).sum().item() == pytest.approx(1.0)
    assert grpo.token_weights(mask, "token", 4, 2, 4).sum().item() == pytest.approx(1.0)


# ==================================================================================================
# 2. Micro-batch exactness
# ==================================================================================================
def splits(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


@pytest.mark.parametrize("agg", ["token", "sequence", "constant"])
def test_micro_batch_gradient_exact_on_tensors(agg):
    g = torch.Generator().manual_seed(3)
    B, T, max_new = 8, 6, 6
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    logp0 = -torch.rand(B, T, generator=g) * 2
    old = logp0 + (torch.rand(B, T, generator=g) - 0.5)
    adv = torch.randn(B, 1, generator=g).expand(B, T)
    n_tokens = int(mask.sum())

    def grad_for(size):
        logp = logp0.clone().requires_grad_(True)
        for rows in splits(B, size):
            rows = list(rows)
            w = grpo.token_weights(mask[rows], agg, n_tokens, B, max_new)
            loss, _ = grpo.grpo_loss(logp[rows], old[rows], adv[rows], w, 0.2, 0.28)
            loss.backward()
        return logp.grad

    full = grad_for(B)
    assert full.abs().sum() > 0
    for size in (1, 2, 5):
        torch.testing.assert_close(grad_for(size), full, atol=1e-7, rtol=1e-6)


def _model_batches(tokenizer, n=8, shared=0):
    rng = random.Random(5)
    prefix = [rng.randrange(100, 5000) for _ in range(shared)]
    prompts = [prefix + [rng.randrange(100, 5000) for _ in range(rng.randint(3, 9))] for _ in range(n)]
    completions = [[rng.randrange(100, 5000) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    return prompts, completions


@pytest.mark.parametrize("agg", ["token", "sequence", "constant"])
def test_micro_batch_gradient_exact_through_model(tiny, agg):
    model, tokenizer = tiny
    model.train()
    # a shared prompt prefix run once (pad_batch(share_prefix=True)) must give the same gradients too
    can_share = "share_prefix" in inspect.signature(models.pad_batch).parameters
    share_options = [False] + (["share"] if can_share and agg == "sequence" else [])
    for share in share_options:
        prompts, completions = _model_batches(tokenizer, shared=6 if share else 0)
        B, max_new = len(prompts), 6
        with torch.no_grad():
            base = models.token_logprobs(model, models.pad_batch(prompts, completions, tokenizer.pad_token_id, "cpu"))[
                0
            ]
        g = torch.Generator().manual_seed(1)
        old_rows = [
            (base[i, : len(c)] + (torch.rand(len(c), generator=g) - 0.5) * 0.8).tolist()
            for i, c in enumerate(completions)
        ]
        advs = torch.randn(B, generator=g).tolist()
        n_tokens = sum(len(c) for c in completions)

        def grads(size):
            model.zero_grad(set_to_none=True)
            for rows in splits(B, size):
                rows = list(rows)
                kw = dict(share_prefix=True) if share else {}
                batch = models.pad_batch(
                    [prompts[i] for i in rows], [completions[i] for i in rows], tokenizer.pad_token_id, "cpu", **kw
                )
                mask = batch["completion_mask"]
                old, adv = torch.zeros_like(mask), torch.zeros_like(mask)
                for k, i in enumerate(rows):
                    old[k, : len(completions[i])] = torch.tensor(old_rows[i])
                    adv[k, : len(completions[i])] = advs[i]
                logp = models.token_logprobs(model, batch)[0]
                w = grpo.token_weights(mask, agg, n_tokens, B, max_new)
                loss, _ = grpo.grpo_loss(logp, old, adv, w, 0.2, 0.28)
                loss.backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        full = grads(B)
        assert sum(v.abs().sum() for v in full.values()) > 0
        for size in (1, 2, 5):
            parts = grads(size)
            assert parts.keys() == full.keys()
            for name in full:
                torch.testing.assert_close(
                    parts[name],
                    full[name],
                    atol=1e-6,
                    rtol=1e-4,
                    msg=lambda m: f"{agg} share={share} size={size} {name}: {m}",
                )
    model.zero_grad(set_to_none=True)


# ==================================================================================================
# 3. group_advantages
# ==================================================================================================
def test_group_advantages_by_hand():
    rewards_ = [[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.5, 1.0]]
    eps = 1e-4
    adv = grpo.group_advantages(rewards_, "group", clamp=0)
    assert torch.equal(adv[0], torch.zeros(4))  # zero variance: exactly 0
    for g in (1, 2):
        r = rewards_[g]
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)  # unbiased, as torch.std
        torch.testing.assert_close(adv[g], torch.tensor([(x - mean) / (std + eps) for x in r]))

    batch = grpo.group_advantages(rewards_, "batch", clamp=0)
    flat = [x for r in rewards_ for x in r]
    mean_all = sum(flat) / len(flat)
    batch_std = math.sqrt(sum((x - mean_all) ** 2 for x in flat) / (len(flat) - 1))
    centred = [torch.tensor(r) - sum(r) / len(r) for r in rewards_]
    for g in range(3):
        torch.testing.assert_close(batch[g], centred[g] / (batch_std + eps))
        torch.testing.assert_close(grpo.group_advantages(rewards_, "none", clamp=0)[g], centred[g])
    assert torch.equal(batch[0], torch.zeros(4))

    # groups of different sizes (AGR's append mode) are normalised each on its own
    ragged = grpo.group_advantages([[0.0, 1.0], [0.0, 0.0, 1.0, 1.0, 2.0]], "group", clamp=0)
    assert [len(a) for a in ragged] == [2, 5] and all(abs(a.sum().item()) < 1e-5 for a in ragged)

    # clamp scales the group instead of clipping it: the largest advantage becomes c, the shape is kept
    one = [[0.0] * 7 + [1.0]]
    clamped, unclamped = (
        grpo.group_advantages(one, "group", clamp=2.0)[0],
        grpo.group_advantages(one, "group", clamp=0)[0],
    )
    assert unclamped.max().item() > 2.0 and clamped.max().item() == pytest.approx(2.0)
    torch.testing.assert_close(clamped, unclamped * 2.0 / unclamped.max())
    small = grpo.group_advantages([[0.0, 10.0]], "none", clamp=1.5)[0]
    assert small.tolist() == [-1.5, 1.5]


@pytest.mark.parametrize("G", [2, 4, 8, 16, 64])
@pytest.mark.parametrize("clamp", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_one_success_group_never_sums_negative(G, clamp, scale):
    """A hard prompt with one correct rollout: the old +-2 clip made the group's advantages sum to
    -0.47 at G = 8 (a net push away). Any default or clamp now keeps the sum at zero and the success positive."""
    adv = grpo.group_advantages([[0.0] * (G - 1) + [1.0], [0.0, 1.0, 1.0, 0.5]], scale, clamp)[0]
    assert abs(adv.sum().item()) < 1e-5 and adv[-1] > 0 and (adv[:-1] < 0).all()
    default = grpo.group_advantages([[0.0] * (G - 1) + [1.0]], grpo.Args.adv_scale, grpo.Args.adv_clamp)[0]
    assert default.sum().item() >= -1e-5


@pytest.mark.parametrize("scale", ["group", "none"])
def test_zero_variance_group_exactly_zero_for_any_value(scale):
    rewards_ = [[0.1] * 8, [1.8] * 8, [1 / 3] * 8, [0.7] * 7 + [0.7]]
    for adv in grpo.group_advantages(rewards_, scale, clamp=2.0):
        assert torch.equal(adv, torch.zeros(8))


def test_keep_rule_variance_and_accuracy():
    """The default keeps a group whose rewards differ even when every label is wrong (RRS's criteria
    and format differ); TaoSR1's accuracy band drops it."""
    all_wrong_but_varied = dict(rewards=[0.25, 0.5, -0.5, 0.25], correct=[False] * 4)
    all_same = dict(rewards=[1.0] * 4, correct=[True] * 4)
    mixed = dict(rewards=[1.0, 0.0, 0.0, 0.0], correct=[True, False, False, False])
    variance, accuracy = grpo.Args(), grpo.Args(ds_rule="accuracy")
    assert variance.ds_rule == "variance"
    assert [grpo.keeps(g, variance) for g in (all_wrong_but_varied, all_same, mixed)] == [True, False, True]
    assert [grpo.keeps(g, accuracy) for g in (all_wrong_but_varied, all_same, mixed)] == [False, False, True]


def test_label_shares_and_entropy():
    groups = [
        dict(labels=["Excellent", "Excellent", None, "Related"], gold="Excellent"),
        dict(labels=["Excellent"] * 4, gold="Related"),
    ]
    m = E.label_shares(groups, R.TAOBAO4.labels)
    assert (
        m["label_share_Excellent"] == 6 / 8 and m["label_share_Related"] == 1 / 8 and m["label_share_invalid"] == 1 / 8
    )
    assert m["label_share_Mismatch"] == 0 and m["label_share_Irrelevant"] == 0
    want = -(0.75 * math.log(0.75) + 2 * 0.125 * math.log(0.125))
    assert m["label_entropy"] == pytest.approx(want)
    # macro-F1 of the samples: Excellent P 2/6 R 2/4 -> F1 0.4; Related never hit -> 0
    assert m["macro_f1"] == pytest.approx(0.2)
    assert E.label_shares([dict(labels=["Related"] * 8, gold="Related")], R.TAOBAO4.labels)["label_entropy"] == 0.0


def test_a_collapse_is_named_as_the_cause_of_empty_steps():
    """Samples that all give one label make every group score alike; the message names the label and the levers,
    not a weak start. Below the collapse share the old causes stand."""
    labels = R.TAOBAO4.labels
    shares = lambda top: {f"label_share_{label}": (top if label == "Excellent" else (1 - top) / 3) for label in labels}  # noqa: E731
    collapsed = dict(format_rate=1.0, truncation_rate=0.0, accuracy=0.6, **shares(1.0))
    dropped = dict(all_correct=3, all_wrong=1, other=0)
    assert E.collapsed_onto(collapsed, labels) == ("Excellent", 1.0)
    cause = E.empty_step_cause(collapsed, dropped, labels)
    assert cause.startswith("the policy collapsed onto 'Excellent' (100% of its samples)")
    assert all(lever in cause for lever in ("--lr", "--temperature", "--prompt-sampling balanced", "--beta"))
    spread = dict(collapsed, **shares(0.85))
    assert E.collapsed_onto(spread, labels) is None
    assert E.empty_step_cause(spread, dropped, labels).startswith("every group was answered right")
    # all-right and all-wrong groups alike, no collapse: the samples agree within each prompt (measured in
    # results/agr-study-tiny: a seed at T 0.3 stopped this way), so the levers are temperature and lr
    agreeing = E.empty_step_cause(spread, dict(all_correct=2, all_wrong=2, other=0), labels)
    assert "each prompt's samples agree" in agreeing and "--temperature" in agreeing and "--lr" in agreeing
    # a policy that never parses: from a base model, start from SFT; from a checkpoint, say what else to do
    unparsed = dict(collapsed, format_rate=0.0, truncation_rate=1.0)
    assert E.empty_step_cause(unparsed, dropped, labels).endswith("start from an SFT checkpoint (sft.py)")
    from_sft = E.empty_step_cause(unparsed, dropped, labels, from_checkpoint=True)
    assert "start from an SFT checkpoint" not in from_sft and "--max-new-tokens" in from_sft


def test_balanced_prompt_order():
    examples = D.load_dataset("synthetic", "train", seed=1, limit=400).examples
    counts = collections.Counter(e.label for e in examples)
    assert max(counts.values()) > 1.5 * min(counts.values())  # the natural mix is skewed
    order = D.balanced_order(examples, R.TAOBAO4.labels, seed=3)
    assert len(order) == len(examples) and order == D.balanced_order(examples, R.TAOBAO4.labels, seed=3)
    balanced = collections.Counter(examples[i].label for i in order)
    assert max(balanced.values()) - min(balanced.values()) <= 1
    for start in range(0, 400, 4):  # every round of four holds each label once
        assert len({examples[i].label for i in order[start : start + 4]}) == 4


def test_underfilled_step_scales_the_learning_rate(tmp_path, monkeypatch):
    """Dynamic sampling keeps one group of two: with underfill scaling the first Adam step (whose size
    is lr per weight, whatever the gradient's scale) moves the weights half as far."""

    def score(texts, example, rulebook, args):  # the first prompt of the stream varies, every other is all-wrong
        first = example.source_id == examples[stream0].source_id
        scores = [R.score_output(t, example.label, example.criteria, rulebook, args.order) for t in texts]
        return scores, [float(first and j == 0) for j in range(len(texts))]

    examples = D.load_dataset("synthetic", "train", seed=1, limit=8).examples
    order = list(range(8))
    random.Random(1 * 1000).shuffle(order)
    stream0 = order[0]
    monkeypatch.setattr(grpo, "score_group", score)
    moved = {}
    for scale in (True, False):
        args = tiny_args(
            tmp_path,
            total_steps=1,
            prompts_per_step=2,
            dynamic_sampling=True,
            ds_max_tries=1,
            limit=8,
            lr=1e-3,
            warmup_steps=1,
            underfill_scale=scale,
            run_name=f"u{scale}",
            eval_limit=1,
        )
        grpo.main(args)
        assert read_metrics(tmp_path / f"u{scale}")[0]["groups_kept"] == 1
        assert read_metrics(tmp_path / f"u{scale}")[0]["update_scale"] == (0.5 if scale else 1.0)
        start, end = (
            models.load_model("tiny-random", "cpu")[0].state_dict(),
            state_dict(tmp_path / f"u{scale}" / "checkpoint"),
        )
        moved[scale] = torch.cat([(end[k] - start[k]).abs().flatten() for k in end if k in start and "embed" not in k])
    assert moved[False].max() > 0
    torch.testing.assert_close(moved[True], moved[False] * 0.5, atol=1e-6, rtol=1e-3)


# ==================================================================================================
# 4. Dynamic sampling through real runs
# ==================================================================================================
def test_dynamic_sampling_all_wrong_random_model(tmp_path):
    args = tiny_args(tmp_path, total_steps=2, dynamic_sampling=True, ds_max_tries=2, run_name="ds")
    grpo.main(args)
    metrics = read_metrics(tmp_path / "ds")
    assert [m["step"] for m in metrics] == [1, 2]
    per_step = args.prompts_per_step * (1 + args.ds_max_tries)
    for m in metrics:
        assert m["accuracy"] == 0.0
        assert m["groups_kept"] == 0
        assert m["groups_dropped"] == m["groups_dropped_all_wrong"] == per_step
        assert m["groups_dropped_all_correct"] == m["groups_dropped_other"] == 0
        assert m["data_position"] == per_step * m["step"]
        assert m["grad_norm"] == 0.0


def test_dynamic_sampling_keeps_mixed_groups_and_refills(tmp_path, monkeypatch):
    G, pps, tries, lo, hi = 4, 2, 4, 0.3, 0.99

    def n_correct(example) -> int:  # 0..4 correct rollouts, a function of the example only
        return int(example.source_id.rsplit(":", 1)[1]) % 5

    def score(texts, example, rulebook, args):
        scores = [R.score_output(t, example.label, example.criteria, rulebook, args.order) for t in texts]
        k = n_correct(example)
        scores = [dataclasses.replace(s, correct=j < k) for j, s in enumerate(scores)]
        return scores, [float(j < k) for j in range(len(texts))]

    trained = []
    real_rows = grpo.training_rows

    def spy_rows(groups, advantages, *a, **kw):
        trained.append([g["example_index"] for g in groups])
        return real_rows(groups, advantages, *a, **kw)

    monkeypatch.setattr(grpo, "score_group", score)
    monkeypatch.setattr(grpo, "training_rows", spy_rows)
    args = tiny_args(
        tmp_path,
        total_steps=2,
        prompts_per_step=pps,
        group_size=G,
        dynamic_sampling=True,
        ds_max_tries=tries,
        ds_rule="accuracy",
        ds_low=lo,
        ds_high=hi,
        run_name="mixed",
        limit=12,
    )

    # the expected schedule, from the same shuffled stream the script walks
    examples = D.load_dataset("synthetic", "train", seed=args.seed, limit=args.limit).examples

    def stream(p):
        order = list(range(len(examples)))
        random.Random(args.seed * 1000 + p // len(examples)).shuffle(order)
        return order[p % len(examples)]

    position, expected = 0, []
    for _ in range(args.total_steps):
        kept, drops = [], dict(all_correct=0, all_wrong=0, other=0)
        for attempt in range(1 + tries):
            need = pps - len(kept)
            for p in range(position, position + need):
                acc = n_correct(examples[stream(p)]) / G
                if lo <= acc <= hi:
                    kept.append(stream(p))
                else:
                    drops["all_correct" if acc == 1 else "all_wrong" if acc == 0 else "other"] += 1
            position += need
            if len(kept) >= pps:
                break
        expected.append(dict(kept=kept, drops=drops, position=position, rounds=attempt + 1))
    # the schedule exercises a refill that succeeds before the limit and a drop of each kind
    assert all(1 < e["rounds"] < 1 + tries and len(e["kept"]) == pps for e in expected)
    for kind in ("other", "all_wrong", "all_correct"):
        assert sum(e["drops"][kind] for e in expected) > 0, kind

    grpo.main(args)
    metrics = read_metrics(tmp_path / "mixed")
    assert trained == [e["kept"] for e in expected if e["kept"]]
    for m, e in zip(metrics, expected):
        assert m["groups_kept"] == len(e["kept"]) <= pps
        assert m["data_position"] == e["position"]
        assert m["groups_dropped_all_correct"] == e["drops"]["all_correct"]
        assert m["groups_dropped_all_wrong"] == e["drops"]["all_wrong"]
        assert m["groups_dropped_other"] == e["drops"]["other"]
        assert m["groups_dropped"] == sum(e["drops"].values())


# ==================================================================================================
# 5-6. Metrics, files, checkpoint; resume
# ==================================================================================================
REQUIRED_KEYS = (
    "step",
    "reward_mean",
    "reward_std",
    "accuracy",
    "format_rate",
    "adherence_rate",
    "zero_variance_groups",
    "groups_dropped",
    "clip_low",
    "clip_high",
    "approx_kl",
    "entropy",
    "completion_len_mean",
    "completion_len_max",
    "truncation_rate",
    "tokens_per_second",
    "time_generation",
    "time_scoring",
    "time_training",
    "lr",
    "grad_norm",
)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """3 uninterrupted steps with a non-trivial reward, so that the weights move."""
    out = tmp_path_factory.mktemp("grpo_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grpo, "score_group", fake_score_group)
        grpo.main(tiny_args(out, dynamic_sampling=False, run_name="A"))
    return out


def test_metrics_files_and_checkpoint(run_a):
    from transformers import AutoModelForCausalLM

    run_dir = run_a / "A"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        missing = [k for k in REQUIRED_KEYS if k not in m]
        assert not missing, f"step {m.get('step')} lacks {missing}"
        assert m["groups_dropped"] == 0 and m["completion_len_max"] <= 8
        assert 0 <= m["truncation_rate"] <= 1 and m["lr"] == pytest.approx(1e-3)
    assert any(m["grad_norm"] > 0 for m in metrics)  # the fake reward gives real updates
    assert (run_dir / "samples.jsonl").exists() and (run_dir / "samples.jsonl").read_text().strip()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint")
    initial = models.tiny_random_model(models.embedded_tokenizer()).state_dict()
    final = model.state_dict()
    assert any(not torch.equal(final[k], initial[k]) for k in initial)


def test_resume_matches_uninterrupted(run_a, monkeypatch):
    monkeypatch.setattr(grpo, "score_group", fake_score_group)
    grpo.main(tiny_args(run_a, dynamic_sampling=False, run_name="B", total_steps=2))
    grpo.main(tiny_args(run_a, dynamic_sampling=False, run_name="B", total_steps=3, resume=True))
    a, b = read_metrics(run_a / "A"), read_metrics(run_a / "B")
    assert [m["step"] for m in b] == [1, 2, 3]
    for ma, mb in zip(a, b):
        assert_metrics_close(ma, mb)
    assert_same_weights(state_dict(run_a / "A" / "checkpoint"), state_dict(run_a / "B" / "checkpoint"), atol=1e-6)


# ==================================================================================================
# 7. Two processes (gloo, CPU) against one process with the same global batch
# ==================================================================================================
PROBE = """
import os, sys
rank = os.environ.get("RANK", "none")
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"rank-{rank}-{os.getpid()}.txt"), "w") as f:
    f.write(os.environ.get("WORLD_SIZE", ""))
"""


def test_relaunch_distributed_cpu_starts_two_ranked_processes(tmp_path, monkeypatch):
    """`--num-gpus 2 --device cpu` must start 2 processes with RANK 0 and 1 and WORLD_SIZE 2. The script
    relaunched here is a probe that records its environment (it never relaunches, so no recursion)."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    captured = []
    monkeypatch.setattr(sys, "argv", [str(probe), "--some-flag"])
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(launch.subprocess, "call", lambda command, *a, **kw: captured.append(command) or 0)
    with pytest.raises(SystemExit):
        launch.relaunch(2, "cpu")
    assert len(captured) == 1 and captured[0][-2:] == [str(probe), "--some-flag"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "AGRL_LAUNCHED")}
    proc = subprocess.run(
        captured[0], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, start_new_session=True
    )
    seen = sorted((p.name.split("-")[1], p.read_text()) for p in tmp_path.glob("rank-*.txt"))
    assert seen == [("0", "2"), ("1", "2")], (
        f"processes seen (RANK, WORLD_SIZE): {seen}; rc {proc.returncode}\n{(proc.stdout + proc.stderr)[-2000:]}"
    )


DRIVER = """
import sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import tyro
import eval as E
import grpo
import test_grpo

grpo.score_group = test_grpo.fake_score_group
E.run_eval = lambda *a, **k: {{}}  # the dev evaluation is not compared here
E.metrics_table = lambda *a, **k: ""
grpo.main(tyro.cli(grpo.Args))
"""

DIST_ARGS = dict(
    total_steps=1,
    prompts_per_step=2,
    group_size=4,
    max_new_tokens=8,
    dynamic_sampling=False,
    loss_agg="sequence",
    lr=1e-3,
    warmup_steps=1,
    limit=8,
    eval_limit=2,
    temperature=1.0,
)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, the whole global batch in one micro-batch."""
    out = tmp_path_factory.mktemp("one_process")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grpo, "score_group", fake_score_group)
        grpo.main(tiny_args(out, micro_batch_size=8, run_name="one", **DIST_ARGS))
    return out / "one"


def test_two_processes_match_one_process(tmp_path, one_process):
    """2 gloo ranks (4 rows each) after one update == 1 process with the same global batch, started the
    way a user does (`--num-gpus 2`): sharded rollouts, gather, loss * world under DDP's averaging."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO), tests=str(Path(__file__).parent)))
    cli = [
        sys.executable,
        str(driver),  # --num-gpus 2 relaunches it with 2 ranks (torchrun on CPU)
        "--model",
        "tiny-random",
        "--dataset",
        "synthetic",
        "--device",
        "cpu",
        "--num-gpus",
        "2",
        "--micro-batch-size",
        "4",
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "two",
        "--seed",
        "1",
    ]
    for key, value in DIST_ARGS.items():
        flag = "--" + key.replace("_", "-")
        cli += (
            ([flag] if value else ["--no-" + key.replace("_", "-")]) if isinstance(value, bool) else [flag, str(value)]
        )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "AGRL_LAUNCHED")}
    proc = subprocess.Popen(
        cli, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    assert proc.returncode == 0, f"2-process run failed (rc {proc.returncode}):\n{output[-3000:]}"

    one, two = read_metrics(one_process)[0], read_metrics(tmp_path / "two")[0]
    # grad_norm (before clipping, of the summed gradient) is what catches a wrong cross-rank scale
    for key in ("reward_mean", "accuracy", "completion_len_mean", "data_position", "loss", "grad_norm", "entropy"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), key
    assert one["grad_norm"] > 0
    # Adam's first step is ~ lr * sign(g): a gradient element near 0 may flip between float summation
    # orders, so weights are compared to 10% of the learning rate (a real mismatch moves them by ~2 lr)
    assert_same_weights(
        state_dict(one_process / "checkpoint"), state_dict(tmp_path / "two" / "checkpoint"), atol=0.1 * DIST_ARGS["lr"]
    )


def test_micro_batch_split_invariant_through_main(tmp_path, one_process, monkeypatch):
    """Same rollouts, 3 rows per micro-batch (8 rows: 2 full micro-batches and one with a filler row)
    instead of one micro-batch of 8: the same loss and gradient norm ("sequence" aggregation)."""
    monkeypatch.setattr(grpo, "score_group", fake_score_group)
    grpo.main(tiny_args(tmp_path, micro_batch_size=3, run_name="mb3", **DIST_ARGS))
    one, three = read_metrics(one_process)[0], read_metrics(tmp_path / "mb3")[0]
    for key in ("reward_mean", "loss", "grad_norm", "entropy", "clip_low", "clip_high", "approx_kl"):
        assert three[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), key
    assert_same_weights(
        state_dict(one_process / "checkpoint"), state_dict(tmp_path / "mb3" / "checkpoint"), atol=0.1 * DIST_ARGS["lr"]
    )
