"""Tests for dpo.py: the DPO loss, pair building, reference log-probs and a tiny end-to-end run.

Written from METHOD.md section 7 and the formulas of the DPO / IPO papers, not copied from the code:
- the loss is checked pair by pair against plain-python math;
- pairs: chosen = correct AND adherent AND well-formed (and finished), rejected = not correct
  (a wrong label or no readable label), identical completions count once, and prompts without a
  pair are counted under all_correct / all_wrong / no_adherent_correct;
- the reference log-prob of a completion is the sum of its token log-probs given the prompt, and
  nothing else (no prompt tokens, no padding), whatever else shares its batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import data as D
import dpo
from rewards import TAOBAO4


# --- the loss ---------------------------------------------------------------------------------------
def slow_dpo(pc, pr, rc, rr, beta, loss_type):
    margin = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        loss = -math.log(1.0 / (1.0 + math.exp(-beta * margin)))
    else:
        loss = (margin - 1.0 / (2.0 * beta)) ** 2
    return loss, beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_dpo_loss_matches_slow_reference(loss_type, beta):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-40 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4))
    loss, chosen_reward, rejected_reward = dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type)
    assert loss.shape == chosen_reward.shape == rejected_reward.shape == (64,)
    for i in range(64):
        want = slow_dpo(pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(), beta, loss_type)
        assert loss[i].item() == pytest.approx(want[0], rel=1e-9, abs=1e-12)
        assert chosen_reward[i].item() == pytest.approx(want[1], rel=1e-9, abs=1e-12)
        assert rejected_reward[i].item() == pytest.approx(want[2], rel=1e-9, abs=1e-12)


def test_dpo_loss_at_the_reference_and_unknown_type():
    logp = torch.tensor([-12.0, -3.5])
    loss, chosen_reward, rejected_reward = dpo.dpo_loss(logp, logp - 1, logp, logp - 1, 0.1, "sigmoid")
    assert torch.allclose(loss, torch.full((2,), math.log(2.0)))  # policy == reference: log 2 per pair
    assert torch.all(chosen_reward == 0) and torch.all(rejected_reward == 0)
    ipo, _, _ = dpo.dpo_loss(logp, logp - 1, logp, logp - 1, 0.1, "ipo")
    assert torch.allclose(ipo, torch.full((2,), 25.0))  # (0 - 1/(2*0.1))^2
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo.dpo_loss(logp, logp, logp, logp, 0.1, "hinge")


def test_dpo_loss_gradient_sign():
    g = torch.Generator().manual_seed(1)
    pc, pr = (-20 * torch.rand(16, generator=g)).requires_grad_(), (-20 * torch.rand(16, generator=g)).requires_grad_()
    rc, rr = -20 * torch.rand(16, generator=g), -20 * torch.rand(16, generator=g)
    loss, chosen_reward, rejected_reward = dpo.dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid")
    loss.sum().backward()
    assert torch.all(pc.grad < 0)  # raising the chosen log-prob lowers the loss
    assert torch.all(pr.grad > 0)  # raising the rejected log-prob raises it
    assert not chosen_reward.requires_grad and not rejected_reward.requires_grad  # rewards are for logging
    # and the loss does move in that direction
    with torch.no_grad():
        higher, _, _ = dpo.dpo_loss(pc + 1, pr, rc, rr, 0.1, "sigmoid")
        worse, _, _ = dpo.dpo_loss(pc, pr + 1, rc, rr, 0.1, "sigmoid")
    assert torch.all(higher < loss.detach()) and torch.all(worse > loss.detach())


# --- pair building ----------------------------------------------------------------------------------
def group(outcomes, prompt=(1, 2, 3), ids=None, truncated=None, source_id="s"):
    """outcomes: one letter per completion: A = correct+adherent+well-formed, C = correct but not adherent,
    F = correct and adherent but malformed, W = wrong label (well-formed), U = unparseable."""
    flags = dict(
        A=(True, True, True),
        C=(True, False, True),
        F=(True, True, False),
        W=(False, True, True),
        U=(False, False, False),
    )
    return dict(
        prompt_ids=list(prompt),
        source_id=source_id,
        completions=ids or [[100 + j, 7] for j in range(len(outcomes))],
        texts=[f"{o}{j}" for j, o in enumerate(outcomes)],
        correct=[flags[o][0] for o in outcomes],
        adherent=[flags[o][1] for o in outcomes],
        format_ok=[flags[o][2] for o in outcomes],
        truncated=truncated or [False] * len(outcomes),
    )


def test_build_pairs_basic_and_stats():
    pairs, stats = dpo.build_pairs([group("AW"), group("AAAA"), group("WWUU"), group("CCWU"), group("FW")], 1, 0)
    assert [(p["chosen_text"], p["rejected_text"]) for p in pairs] == [("A0", "W1")]
    assert stats["pairs"] == 1 and stats["prompts"] == 5 and stats["prompts_with_pairs"] == 1
    assert stats["all_correct"] == 1 and stats["all_wrong"] == 1 and stats["no_adherent_correct"] == 2
    p = pairs[0]
    assert p["prompt_ids"] == [1, 2, 3] and p["chosen_ids"] == [100, 7] and p["rejected_ids"] == [101, 7]
    assert p["source_id"] == "s"


def test_build_pairs_all_correct_even_if_not_adherent():
    pairs, stats = dpo.build_pairs([group("AC"), group("CC")], 4, 0)
    assert pairs == [] and stats["all_correct"] == 2 and stats["pairs"] == 0


def test_build_pairs_all_wrong_and_empty_group():
    pairs, stats = dpo.build_pairs([group("WUWU"), group("")], 4, 0)
    assert pairs == [] and stats["all_wrong"] == 2


def test_build_pairs_unparseable_is_rejected():
    pairs, stats = dpo.build_pairs([group("UA")], 1, 0)
    assert [(p["chosen_text"], p["rejected_text"]) for p in pairs] == [("A1", "U0")]


def test_build_pairs_correct_but_not_adherent_is_never_chosen():
    for seed in range(20):
        pairs, _ = dpo.build_pairs([group("CCACFWWW")], 10, seed)
        assert {p["chosen_text"] for p in pairs} == {"A2"}
        assert {p["rejected_text"] for p in pairs} == {"W5", "W6", "W7"}  # correct ones are never rejected
        assert len(pairs) == 3


def test_build_pairs_truncated_never_chosen():
    pairs, stats = dpo.build_pairs([group("AAW", truncated=[True, False, True])], 4, 0)
    assert [(p["chosen_text"], p["rejected_text"]) for p in pairs] == [("A1", "W2")]
    pairs, stats = dpo.build_pairs([group("AW", truncated=[True, False])], 4, 0)
    assert pairs == [] and stats["no_adherent_correct"] == 1


def test_build_pairs_duplicates_not_paired_twice():
    same = [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9], [8, 9]]  # two copies of one correct, three of one wrong
    pairs, stats = dpo.build_pairs([group("AAWWW", ids=same)], 10, 0)
    assert len(pairs) == 1 and stats["duplicates"] == 3
    pairs, stats = dpo.build_pairs([group("AAW", ids=[[1], [1], [2]]), group("AWW", ids=[[3], [4], [4]])], 10, 0)
    assert len(pairs) == 2
    keys = [(tuple(p["chosen_ids"]), tuple(p["rejected_ids"])) for p in pairs]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("k", [1, 2, 3, 6, 9, 20])
def test_build_pairs_max_pairs_per_prompt(k):
    pairs, stats = dpo.build_pairs([group("AAAWWW"), group("AW")], k, 3)
    first = [p for p in pairs if p["example_index"] == 0]
    assert len(first) == min(k, 9)  # 3 chosen x 3 rejected distinct pairs at most
    assert len({(p["chosen_text"], p["rejected_text"]) for p in first}) == len(first)
    assert stats["pairs"] == len(pairs) == len(first) + 1
    if k <= 3:  # the first pairs use distinct completions on both sides
        assert len({p["chosen_text"] for p in first}) == len({p["rejected_text"] for p in first}) == k


def test_build_pairs_seeded():
    groups = [group("AAAWWW"), group("AAWW")]
    assert dpo.build_pairs(groups, 2, 7) == dpo.build_pairs(groups, 2, 7)
    differ = {json.dumps(dpo.build_pairs(groups, 1, seed)[0]) for seed in range(10)}
    assert len(differ) > 1
    with pytest.raises(ValueError):
        dpo.build_pairs(groups, 0, 7)


# --- reference log-probs ----------------------------------------------------------------------------
def independent_logp(model, prompt, completion):
    """Sum of log pi(completion token | everything before it), one unpadded sequence, full forward pass."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt), len(prompt) + len(completion)))


@pytest.mark.parametrize("share_prefix", [False, True])
def test_reference_logps_are_completion_only(tiny, share_prefix):
    model, tokenizer = tiny
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(10, 1000, (n,), generator=g).tolist()  # noqa: E731
    system = ids(6)  # a common "system prompt" prefix, then prompts of different lengths
    pairs = [
        dict(prompt_ids=system + ids(5), chosen_ids=ids(3), rejected_ids=ids(9)),
        dict(prompt_ids=system + ids(17), chosen_ids=ids(1), rejected_ids=ids(4)),
        dict(prompt_ids=system + ids(11), chosen_ids=ids(8), rejected_ids=ids(2)),
    ]
    chosen, rejected = dpo.reference_logps(
        model, pairs, tokenizer.pad_token_id, batch_size=3, share_prefix=share_prefix
    )
    with torch.no_grad():
        for p, c, r in zip(pairs, chosen, rejected):
            assert c == pytest.approx(independent_logp(model, p["prompt_ids"], p["chosen_ids"]), abs=1e-3)
            assert r == pytest.approx(independent_logp(model, p["prompt_ids"], p["rejected_ids"]), abs=1e-3)
        # batch composition does not matter either
        alone = [dpo.reference_logps(model, [p], tokenizer.pad_token_id)[0][0] for p in pairs]
        assert alone == pytest.approx(chosen, abs=1e-3)
        # at step 0 the policy is the reference: the training forward gives the same sums, loss log 2
        logps = dpo.sequence_logps(model, dpo.pair_batch(pairs, tokenizer.pad_token_id, "cpu", share_prefix))
        loss, _, _ = dpo.dpo_loss(logps[:3], logps[3:], torch.tensor(chosen), torch.tensor(rejected), 0.1)
        assert torch.allclose(loss, torch.full((3,), math.log(2.0)), atol=1e-4)


# --- end to end -------------------------------------------------------------------------------------
COMMON = dict(
    model="tiny-random",
    dataset="synthetic",
    eval_limit=1,
    max_new_tokens=6,
    batch_size=2,
    grad_accum=2,
    log_every=1,
    lr=1e-3,
    warmup_steps=1,
    max_item_tokens=16,
)


def make_pairs_file(path: Path, tokenizer, n: int = 4) -> Path:
    """Hand-made pairs: the gold label as chosen, a wrong label as rejected (short, to keep the test fast)."""
    ds = D.load_dataset("synthetic", "train", seed=0, limit=n)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with open(path, "w") as f:
        for i, e in enumerate(ds.examples):
            wrong = next(label for label in TAOBAO4.labels if label != e.label)
            good, bad = f"<label>{e.label}</label>", f"<label>{wrong}</label>"
            prompt = tokenizer.apply_chat_template(
                [dict(role="user", content=f"{e.query} / {e.title}")], add_generation_prompt=True, tokenize=True
            )
            prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])  # short: a fast test
            f.write(
                json.dumps(
                    dict(
                        source_id=e.source_id,
                        example_index=i,
                        gold=e.label,
                        prompt_ids=prompt,
                        chosen_ids=tokenizer.encode(good, add_special_tokens=False) + [end],
                        rejected_ids=tokenizer.encode(bad, add_special_tokens=False) + [end],
                        chosen_text=good,
                        rejected_text=bad,
                    )
                )
                + "\n"
            )
    return path


def test_end_to_end_sampling(tmp_path):
    """pass@N sampling -> pairs -> (possibly no) training -> eval; a random model rarely makes pairs."""
    dpo.main(dpo.Args(**COMMON, limit=4, n_samples=4, total_steps=2, output_dir=str(tmp_path), run_name="s"))
    run = tmp_path / "s"
    stats = json.loads((run / "pair_stats.json").read_text())
    assert stats["prompts"] == 4
    assert stats["prompts_with_pairs"] + sum(stats[r] for r in dpo.SKIP_REASONS) == 4
    pairs = dpo.read_pairs(run / "pairs.jsonl") if (run / "pairs.jsonl").stat().st_size else []
    assert len(pairs) == stats["pairs"]
    assert (run / "eval.json").exists() and (run / "checkpoint" / "config.json").exists()
    ref = json.loads((run / "reference_logps.json").read_text())
    assert ref["n_pairs"] == len(pairs) == len(ref["chosen"])
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and lines[0]["pairs/prompts"] == 4


def test_end_to_end_training_from_pairs_and_exact_resume(tmp_path, tiny):
    pairs_path = make_pairs_file(tmp_path / "hand.jsonl", tiny[1])
    keys = {
        "loss",
        "reward_chosen",
        "reward_rejected",
        "reward_margin",
        "reward_accuracy",
        "lr",
        "grad_norm",
        "step_seconds",
    }
    straight = dict(COMMON, pairs_path=str(pairs_path), output_dir=str(tmp_path))
    dpo.main(dpo.Args(**straight, total_steps=2, run_name="a"))
    run = tmp_path / "a"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2] and all(keys <= set(line) for line in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-3)  # policy == reference at step 0
    # each step is one epoch of the 4 pairs in two micro-batches; lr 1e-3: the first step helps
    assert steps[-1]["reward_margin"] > 0 and steps[-1]["loss"] < steps[0]["loss"]
    assert len(dpo.read_pairs(run / "pairs.jsonl")) == 4
    assert (run / "eval.json").exists() and (run / "checkpoint" / "model.safetensors").exists()

    # 1 step, then --resume to 2: the same metrics and weights as 2 straight steps
    dpo.main(dpo.Args(**straight, total_steps=1, run_name="b"))
    dpo.main(dpo.Args(**straight, total_steps=2, run_name="b", resume=True))
    resumed = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [line["loss"] for line in resumed if "loss" in line] == pytest.approx([s["loss"] for s in steps], abs=1e-6)
    from safetensors.torch import load_file

    a, b = (
        load_file(run / "checkpoint" / "model.safetensors"),
        load_file(tmp_path / "b" / "checkpoint" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_nan_steps_are_skipped_then_stop(tmp_path, tiny, monkeypatch):
    pairs_path = make_pairs_file(tmp_path / "hand.jsonl", tiny[1])
    real, calls = dpo.dpo_loss, []

    def poisoned_first_step(*a, **k):  # step 1 (two micro-batches) gets a NaN loss, later steps are real
        calls.append(1)
        loss, rc, rr = real(*a, **k)
        return (loss * float("nan") if len(calls) <= 2 else loss), rc, rr

    monkeypatch.setattr(dpo, "dpo_loss", poisoned_first_step)
    dpo.main(dpo.Args(**COMMON, pairs_path=str(pairs_path), output_dir=str(tmp_path), total_steps=2, run_name="n"))
    lines = [json.loads(line) for line in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line.get("nan_skipped")] == [1]
    [trained] = [line for line in lines if "loss" in line]
    assert trained["step"] == 2 and trained["loss"] == pytest.approx(math.log(2.0), abs=1e-3)  # no update at step 1
    assert (tmp_path / "n" / "checkpoint" / "model.safetensors").exists()

    monkeypatch.setattr(dpo, "dpo_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), *real(*a, **k)[1:]))
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        dpo.main(
            dpo.Args(
                **COMMON,
                pairs_path=str(pairs_path),
                output_dir=str(tmp_path),
                total_steps=5,
                max_nan_skips=2,
                run_name="m",
            )
        )


def test_pass_at_n_samples_only_the_prompts_the_steps_need(tmp_path, monkeypatch):
    """A fake policy makes a pair on every third prompt: sampling stops at the first round that has the
    pairs the steps consume (3 steps x 1 pair), far short of the 2000-prompt pool; a policy that makes no
    pair stops after one round of sample_margin x the prompts needed; --sample-all takes every prompt."""
    import eval as E
    from helpers import rollouts

    examples = D.load_dataset("synthetic", "train", seed=1).examples
    calls = []

    def fake_generate(model, tokenizer, prompts, n=1, seeds=None, pair_every=3, **_):
        indices = [s - 1 * 1_000_003 for s in seeds] if seeds is not None else [None] * len(prompts)
        calls.append(indices)
        out = rollouts.Rollouts([], [], [], [], [])
        for prompt, i in zip(prompts, indices):
            e = examples[i] if i is not None else examples[0]
            wrong = next(label for label in TAOBAO4.labels if label != e.label)
            right = D.sft_target(e, TAOBAO4) if i is not None and i % pair_every == 0 else f"<label>{wrong}</label>"
            for text in [right] + [f"<label>{wrong}</label> {j}" for j in range(n - 1)]:
                ids = tokenizer.encode(text, add_special_tokens=False)
                out.prompt_ids.append(prompt)
                out.completion_ids.append(ids)
                out.logprobs.append([-1.0] * len(ids))
                out.texts.append(text)
                out.truncated.append(False)
        return out

    monkeypatch.setattr(rollouts, "generate", fake_generate)
    monkeypatch.setattr(E, "run_eval", lambda *a, **k: E.classification_metrics([], [], TAOBAO4.labels))
    args = dict(COMMON, batch_size=1, grad_accum=1, total_steps=3, n_samples=2, output_dir=str(tmp_path))
    dpo.main(dpo.Args(**args, run_name="sized"))
    stats = json.loads((tmp_path / "sized" / "pair_stats.json").read_text())
    rounds = [c for c in calls if c[0] is not None]
    assert len(rounds[0]) == 6  # 3 pairs needed x sample_margin 2
    sampled = [i for r in rounds for i in r]
    assert stats["prompts_sampled"] == len(sampled) < 100 and stats["prompts_in_pool"] == 2000
    assert stats["pairs"] == sum(i % 3 == 0 for i in sampled) >= 3 == stats["pairs_needed"]
    assert sum(i % 3 == 0 for i in sampled[: -len(rounds[-1])]) < 3  # the last round was needed
    assert len(set(sampled)) == len(sampled)  # a prompt is sampled once

    calls.clear()
    monkeypatch.setattr(rollouts, "generate", lambda *a, **k: fake_generate(*a, pair_every=10**9, **k))
    dpo.main(dpo.Args(**args, run_name="none"))
    assert [len(c) for c in calls] == [6]  # no pair in the first round: no second one
    calls.clear()
    dpo.main(dpo.Args(**dict(args, limit=40), sample_all=True, run_name="all"))
    assert [len(c) for c in calls] == [40]
