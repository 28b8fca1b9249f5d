"""Acceptance tests of agrl.py (METHOD.md sections 4 and 6): Rule-aware Reward Shaping with its hard gate
and segment credit, Adaptive Guided Replay (guidance, selection, replay buffer, escalation and decay,
training under the unguided prompt, off-policy corrections), and equivalence with grpo.py when both
ideas are off.

Runs use the 2-layer `tiny-random` model on CPU. Its answers never parse, so the runs that need
successes patch `agrl.score_group` (and mark guided generations through a wrapper of `rollouts.generate`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from test_grpo import fake_score_group  # noqa: E402  (the same deterministic text reward)

import agrl  # noqa: E402
import data as D  # noqa: E402
import grpo  # noqa: E402
import rewards as R  # noqa: E402
from helpers import models, rollouts  # noqa: E402
from rewards import TAOBAO4, UNKNOWN  # noqa: E402

TIMING = ("time", "seconds", "per_second")


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_model("tiny-random", "cpu")[1]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def state_dict(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# --- a hand-made example (taobao4) and answers to it --------------------------------------------------
EXAMPLE = D.Example(
    query="red nike running shoes",
    title="Nike Air Zoom running shoe, red",
    label="Excellent",
    criteria={"category": "match", "brand": "match", "color": "match", "specs": "n/a", "negation": UNKNOWN},
)
GOLD_STATED = {"category": "match", "brand": "match", "color": "match", "specs": "n/a", "negation": "n/a"}


def answer(label: str, **changes) -> str:
    return R.format_output(label, dict(GOLD_STATED, **changes), "a short reason", TAOBAO4)


OUTPUTS = dict(
    good=answer("Excellent"),  # correct, adherent, every known criterion right
    non_adherent=answer("Excellent", category="mismatch"),  # correct label, but its criteria decide Irrelevant
    wrong_adherent=answer("Related", color="unstated"),  # wrong label, follows its criteria, 3 of 4 known right
    garbage="I think the item is fine.",  # does not parse
)


# ==================================================================================================
# 1. RRS values and the hard gate
# ==================================================================================================
def test_rrs_values_and_hard_gate():
    texts = list(OUTPUTS.values())
    weights = dict(w_out=1.0, w_crit=0.5, w_rule=0.25, format_penalty=-0.7)
    scores, seq = agrl.score_group(texts, EXAMPLE, TAOBAO4, agrl.Args(rrs=True, rrs_credit="sequence", **weights))
    assert [s.correct for s in scores] == [True, True, False, False]
    assert [s.adherent for s in scores] == [True, False, True, False]
    assert [s.format_ok for s in scores] == [True, True, True, False]
    # good: 1 + 0.5 * 4/4 + 0.25; non-adherent: outcome and its 3/4 right criteria, no rule credit;
    # wrong but adherent: 0.5 * 3/4 (negation is unknown: not counted), no rule credit for a wrong label;
    # unparseable: the penalty only
    assert seq == pytest.approx([1.75, 1.375, 0.375, -0.7])
    _, segment = agrl.score_group(texts, EXAMPLE, TAOBAO4, agrl.Args(rrs=True, rrs_credit="segment", **weights))
    assert segment == pytest.approx([1.25, 1.0, 0.0, -0.7])  # w_crit leaves the scalar in segment credit
    _, off = agrl.score_group(texts, EXAMPLE, TAOBAO4, agrl.Args(rrs=False, **weights))
    assert off == [1.0, 1.0, 0.0, 0.0]
    _, grpo_rewards = grpo.score_group(texts, EXAMPLE, TAOBAO4, grpo.Args())
    assert off == grpo_rewards

    credit = [agrl.criterion_credit(s) for s in scores]
    assert credit[0] == dict(category=1.0, brand=1.0, color=1.0, specs=1.0, negation=None)
    assert credit[1] == dict(category=0.0, brand=1.0, color=1.0, specs=1.0, negation=None)  # format is the only gate
    assert credit[2] == dict(category=1.0, brand=1.0, color=0.0, specs=1.0, negation=None)
    assert credit[3] == dict(category=0.0, brand=0.0, color=0.0, specs=0.0, negation=None)  # gated: unparseable


def test_identical_rrs_rewards_give_zero_advantage():
    example = dataclasses.replace(EXAMPLE, criteria=dict(EXAMPLE.criteria, negation="n/a"))
    text = answer("Excellent", brand="n/a", color="n/a")  # correct, adherent, 3 of 5 criteria right
    _, group_rewards = agrl.score_group([text] * 8, example, TAOBAO4, agrl.Args(rrs=True))
    assert group_rewards == pytest.approx([1.8] * 8)
    advantages = agrl.group_advantages([group_rewards], "group", 2.0)[0]
    assert torch.equal(advantages, torch.zeros(8))


# ==================================================================================================
# 2. Segment credit
# ==================================================================================================
def expected_token_sets(tokenizer, text: str, spans: dict) -> tuple[list[int], dict[str, set[int]]]:
    """Independently of agrl: the tokenizer's own character offsets, tokens overlapping each line."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    sets = {
        name: {k for k, (s, e) in enumerate(offsets) if s < b and e > a and e > s} for name, (a, b) in spans.items()
    }
    return ids, sets


@pytest.mark.parametrize("order", ["label_first", "think_first"])
def test_criterion_token_indices_cover_exactly_their_line(tokenizer, order):
    for label, changes in (
        ("Excellent", {}),
        ("Related", dict(color="unstated")),
        ("Mismatch", dict(brand="conflict")),
    ):
        text = R.format_output(label, dict(GOLD_STATED, **changes), "because of the brand", TAOBAO4, order)
        completion = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(completion, skip_special_tokens=True) == text
        parsed = R.parse_output(text, TAOBAO4, order)
        assert parsed.format_ok and set(parsed.spans) == set(TAOBAO4.criterion_names)
        indices = agrl.criterion_token_indices(tokenizer, completion, parsed.spans)
        ids, expected = expected_token_sets(tokenizer, text, parsed.spans)
        assert ids == completion
        claimed = set()
        for name, (a, b) in parsed.spans.items():
            got = indices[name]
            assert set(got) == expected[name], name
            assert got == list(range(got[0], got[-1] + 1))  # one contiguous run of tokens
            line = text[a:b]
            assert line == f"{name}: {dict(GOLD_STATED, **changes)[name]}"
            assert tokenizer.decode([completion[k] for k in got]).strip("\n") == line
            assert not claimed & set(got)  # no token belongs to two lines
            claimed |= set(got)
        rest = tokenizer.decode([t for k, t in enumerate(completion) if k not in claimed])
        assert not any(f"{name}:" in rest for name in TAOBAO4.criterion_names)


def test_segment_advantages_put_each_criterion_on_its_own_tokens(tokenizer):
    args = agrl.Args(rrs=True, rrs_credit="segment", w_crit=0.5, adv_scale="group", adv_clamp=2.0)
    texts = list(OUTPUTS.values())
    scores, _ = agrl.score_group(texts, EXAMPLE, TAOBAO4, args)
    completions = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    group = dict(
        completions=completions,
        credit=[agrl.criterion_credit(s) for s in scores],
        spans=[s.parsed.spans for s in scores],
    )
    seq_adv = torch.tensor([0.3, -0.2, 0.1, -0.4])
    got = agrl.segment_advantages(group, seq_adv, tokenizer, args)

    expected = [[seq_adv[j].item()] * len(c) for j, c in enumerate(completions)]
    for name in TAOBAO4.criterion_names:
        values = [group["credit"][j][name] for j in range(4)]
        if any(v is None for v in values):
            assert name == "negation"  # unknown gold: no criterion advantage at all
            continue
        mean = sum(values) / 4
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
        adv = [max(-2.0, min(2.0, (v - mean) / (std + 1e-4))) * args.w_crit for v in values]
        for j, text in enumerate(texts):
            _, sets = expected_token_sets(tokenizer, text, group["spans"][j])
            for k in sets.get(name, ()):
                expected[j][k] += adv[j]
    assert [len(row) for row in got] == [len(c) for c in completions]
    for j in range(4):
        assert got[j] == pytest.approx(expected[j], abs=1e-5), texts[j]
    # the unparseable answer has no lines: the sequence advantage alone, on every token
    assert got[3] == pytest.approx([-0.4] * len(completions[3]))
    # a token outside every criterion line carries the sequence advantage only
    assert got[0][0] == pytest.approx(0.3)


# ==================================================================================================
# 3. Guidance text and escalation / decay through a run
# ==================================================================================================
def test_guidance_text_and_wrong_criteria():
    group = dict(
        correct=[True, False, False, True],
        criteria=[
            dict(category=True, brand=False, color=True, specs=None, negation=True),
            dict(category=True, brand=True, color=False, specs=None, negation=True),
            dict(category=False, brand=True, color=True, specs=None, negation=True),
            dict(category=True, brand=True, color=True, specs=False, negation=False),
        ],
    )
    # only the failing rollouts count (rollout 0's brand and 3's specs/negation do not); unknown never does
    assert agrl.wrong_criteria(group) == ["category", "color"]
    level1 = agrl.guidance_text(EXAMPLE, ["category", "color"], 1)
    assert "category is match" in level1 and "color is match" in level1
    assert "brand" not in level1 and "Excellent" not in level1
    level2 = agrl.guidance_text(EXAMPLE, ["category", "color"], 2)
    assert level2.startswith(level1) and "The correct label is Excellent." in level2
    nothing_wrong = agrl.guidance_text(EXAMPLE, [], 1)
    assert "The correct label is Excellent." in nothing_wrong and "Check" not in nothing_wrong
    assert agrl.wrong_criteria(dict(correct=[True, True], criteria=[dict(category=False), dict(category=False)])) == []


MARK = "[[guided-with-label]]", "[[guided-without-label]]"


@pytest.fixture(scope="module")
def escalation_run(tmp_path_factory):
    """One prompt (limit=1), one group a step. Steps 1-3: the policy fails. Guided answers succeed only
    when the guidance gives the label (level 2). Steps 4-5: the policy succeeds.
    Expected: 1 level 1 (guided fail), 2 level 2 (guided success, buffer filled), 3 replay from the buffer,
    4 and 5 recovery: the level decays 2 -> 1 -> 0."""
    out = tmp_path_factory.mktemp("agr")
    real_generate, real_score, real_rows = rollouts.generate, agrl.score_group, agrl.training_rows
    seen = dict(guidance=[], rows=[], policy_calls=0)

    def generate(model, tokenizer, prompts, *a, **kw):
        result = real_generate(model, tokenizer, prompts, *a, **kw)
        n = kw.get("n", 1)
        for i, prompt in enumerate(prompts):
            text = tokenizer.decode(prompt)
            if "Guidance:" in text:
                guidance = text.split("Guidance:", 1)[1]
                seen["guidance"].append(guidance)
                mark = MARK[0] if "The correct label is" in guidance else MARK[1]
                for j in range(i * n, (i + 1) * n):
                    result.texts[j] = mark + result.texts[j]
        return result

    def score(texts, example, rulebook, args):
        good = R.format_output(example.label, D.fill_criteria(example, rulebook), "guided", rulebook, args.order)
        guided = any(t.startswith(MARK) for t in texts)
        if not guided:
            seen["policy_calls"] += 1
        recovered = not guided and seen["policy_calls"] >= 4
        return real_score([good if t.startswith(MARK[0]) or recovered else t for t in texts], example, rulebook, args)

    def rows(groups, advantages, *a, **kw):
        result = real_rows(groups, advantages, *a, **kw)
        seen["rows"].append(result)
        return result

    args = agrl.Args(
        model="tiny-random",
        dataset="synthetic",
        limit=1,
        total_steps=5,
        prompts_per_step=1,
        group_size=4,
        max_new_tokens=8,
        micro_batch_size=4,
        device="cpu",
        eval_limit=2,
        output_dir=str(out),
        run_name="agr",
        dynamic_sampling=False,
        agr_k=3,
        agr_buffer_size=2,
        agr_tau=0.25,
        agr_max_level=2,
        agr_recover=0.5,
        agr_ema=0.5,
        save_every=1,
        keep_last=10,
        lr=1e-3,
        warmup_steps=1,
        seed=1,
        agr_guide="hint",
        agr_replay_delay=0,
        # the paper-reading mechanics this run checks (union advantages, replacement, replay, RRS), not the defaults
        rrs=True,
        agr_advantage="union",
        agr_mix="replace",
        agr_nll_weight=0.0,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollouts, "generate", generate)
        mp.setattr(agrl, "score_group", score)
        mp.setattr(agrl, "training_rows", rows)
        agrl.main(args)
    states = [
        torch.load(out / "agr" / "checkpoints" / f"step-{s:07d}" / "train_state.pt", weights_only=True)["agr_state"]
        for s in range(1, 6)
    ]
    return dict(dir=out / "agr", args=args, seen=seen, metrics=read_metrics(out / "agr"), states=states)


def test_guidance_escalates_replays_and_decays(escalation_run):
    m = escalation_run["metrics"]
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5]
    assert [x["agr_stagnant_share"] for x in m] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert [x["agr_level_1"] for x in m] == [1, 0, 0, 0, 0]
    assert [x["agr_level_2"] for x in m] == [0, 1, 0, 0, 0]
    assert [x["agr_buffer_hits"] for x in m] == [0, 0, 1, 0, 0]
    assert [x["agr_guided_share"] for x in m] == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert m[0]["agr_guided_success_rate"] == 0.0 and m[1]["agr_guided_success_rate"] == 1.0
    assert [x["agr_prompts_ever_stagnant"] for x in m] == [1] * 5
    assert m[3]["agr_once_stagnant_accuracy"] == 1.0 and m[4]["agr_once_stagnant_accuracy"] == 1.0
    # the policy's own samples are what is logged: all wrong in steps 1-3, whatever the guided answers did
    assert [x["accuracy"] for x in m] == [0.0, 0.0, 0.0, 1.0, 1.0]

    # level 1 names the wrong criteria with their gold values, level 2 adds the label
    first, second = escalation_run["seen"]["guidance"]
    assert "Check these criteria:" in first and "The correct label is" not in first
    example = D.load_dataset("synthetic", "train", seed=1, limit=1).examples[0]
    assert f"The correct label is {example.label}." in second and "Check these criteria:" in second
    for name, value in example.criteria.items():
        if value != UNKNOWN:
            assert f"{name} is {value}" in first  # a random policy gets every known criterion wrong

    states = escalation_run["states"]
    assert all(list(s) == list(states[0]) and len(s) == 1 for s in states)
    per_step = [next(iter(s.values())) for s in states]
    assert [s["level"] for s in per_step] == [1, 2, 2, 1, 0]
    assert all(s["stagnant_ever"] for s in per_step)
    assert per_step[2]["accuracy"] == 0.0 and per_step[3]["accuracy"] == 0.5 and per_step[4]["accuracy"] == 0.75


def test_replay_buffer_bounded_and_holds_successful_guided_answers(escalation_run):
    args = escalation_run["args"]
    buffers = [next(iter(s.values()))["buffer"] for s in escalation_run["states"]]
    assert [len(b) for b in buffers] == [0, 2, 2, 2, 2]  # K = 3 successes, buffer of 2
    assert all(len(b) <= args.agr_buffer_size for b in buffers)
    for entry in buffers[-1]:
        assert entry["guided"] is True and entry["correct"] and entry["adherent"] and entry["format_ok"]
        assert entry["texts"].startswith(MARK[0])
        assert entry["rewards"] == pytest.approx(args.w_out + args.w_crit + args.w_rule)


def test_guided_rows_trained_under_unguided_prompt_in_run(escalation_run, tokenizer):
    example = D.load_dataset("synthetic", "train", seed=1, limit=1).examples[0]
    unguided = D.encode_prompt(tokenizer, example, TAOBAO4, "label_first", 256)[0]
    steps = escalation_run["seen"]["rows"]
    assert len(steps) == 5
    guided_per_step = [sum(r["guided"] for r in rows) for rows in steps]
    assert guided_per_step == [0, 3, 2, 0, 0]  # K = 3 guided answers, then 2 replayed from the buffer
    for rows in steps:
        assert len(rows) == 4
        for r in rows:
            assert r["prompt"] == unguided
    # the steps with guided answers have non-zero advantages, so they were trained
    assert escalation_run["metrics"][1]["grad_norm"] > 0 and escalation_run["metrics"][2]["grad_norm"] > 0


# ==================================================================================================
# 4. Mixing guided answers into the group
# ==================================================================================================
def make_group(rewards_: list[float]) -> dict:
    G = len(rewards_)
    group = dict(position=7, example_index=3, prompt=[1, 2, 3])
    for key in agrl.GROUP_FIELDS:
        group[key] = [f"{key}-{j}" for j in range(G)]
    group.update(rewards=list(rewards_), guided=[False] * G, correct=[False] * G)
    return group


def candidate(i: int) -> dict:
    c = {key: f"{key}-cand{i}" for key in agrl.GROUP_FIELDS}
    c.update(rewards=2.0 + i, guided=True, correct=True)
    return c


@pytest.mark.parametrize("n, replaced", [(1, [1]), (2, [1, 3]), (3, [1, 3, 0]), (4, [1, 3, 0, 2])])
def test_replace_lowest(n, replaced):
    group = make_group([0.5, -0.5, 1.0, -0.5])  # a tie at -0.5: index 1 before index 3
    before = copy.deepcopy(group)
    out = agrl.mix_into(group, [candidate(i) for i in range(n)])
    assert group == before  # the input group is not touched
    assert out["prompt"] == [1, 2, 3] and out["position"] == 7 and out["example_index"] == 3
    for key in agrl.GROUP_FIELDS:
        assert len(out[key]) == 4
    for j in range(4):
        if j in replaced:
            i = replaced.index(j)
            assert out["guided"][j] is True and out["rewards"][j] == 2.0 + i
            assert all(out[key][j] == candidate(i)[key] for key in agrl.GROUP_FIELDS)
        else:
            assert out["guided"][j] is False
            assert all(out[key][j] == before[key][j] for key in agrl.GROUP_FIELDS)


def test_mix_append_grows_the_group():
    group = make_group([0.5, -0.5, 1.0, -0.5])
    out = agrl.mix_into(group, [candidate(0), candidate(1)], "append")
    assert len(group["rewards"]) == 4
    for key in agrl.GROUP_FIELDS:
        assert out[key][:4] == group[key] and out[key][4:] == [candidate(0)[key], candidate(1)[key]]


# ==================================================================================================
# 5. Guided completions are trained under the unguided prompt
# ==================================================================================================
def test_training_rows_use_unguided_prompt(tokenizer):
    unguided = D.encode_prompt(tokenizer, EXAMPLE, TAOBAO4)[0]
    guided_prompt = D.encode_prompt(tokenizer, EXAMPLE, TAOBAO4, guidance=agrl.guidance_text(EXAMPLE, ["color"], 2))[0]
    assert guided_prompt != unguided
    group = make_group([0.0, 1.0, 0.0, 1.0])
    group.update(
        prompt=unguided,
        completions=[[5, 6], [7], [8, 9, 10], [11]],
        old_logprobs=[[-1.0, -2.0], [-0.5], [-1.0, -1.0, -1.0], [-0.1]],
        guided=[False, True, False, True],
        forced=[0, 1, 0, 1],
    )
    advantages = [torch.tensor([-1.0, 1.0, -1.0, 1.0])]
    rows = agrl.training_rows([group], advantages)
    assert [r["guided"] for r in rows] == [False, True, False, True]
    assert [r["forced"] for r in rows] == [0, 1, 0, 1]
    for j, r in enumerate(rows):
        assert r["prompt"] == unguided and r["prompt"] != guided_prompt
        assert r["completion"] == group["completions"][j] and r["old_logprobs"] == group["old_logprobs"][j]
        assert r["advantages"] == [advantages[0][j].item()] * len(group["completions"][j])
    per_token = [[[0.1, 0.2], [0.3], [0.4, 0.5, 0.6], [0.7]]]
    rows = agrl.training_rows([group], advantages, per_token)
    assert [r["advantages"] for r in rows] == per_token[0]
    assert all(r["prompt"] == unguided for r in rows)


# ==================================================================================================
# 6. The off-policy corrections
# ==================================================================================================
def correction_batch():
    g = torch.Generator().manual_seed(11)
    B, T = 4, 5
    logp0 = -torch.rand(B, T, generator=g) * 3 - 0.05
    delta = torch.tensor([1.0, 0.9, -0.5, 0.3, 0.05])[(torch.arange(B)[:, None] + torch.arange(T)[None]) % 5]
    old = logp0 - delta  # ratios exp(delta): 2.7 and 2.5 exceed the cap 2, 0.6 and 1.35 are clipped in PPO
    adv = torch.tensor([0.8, -1.1, -0.6, 1.4])[:, None].expand(B, T).clone()
    mask = (torch.arange(T)[None] < torch.tensor([5, 3, 4, 2])[:, None]).float()
    guided = torch.tensor([[False], [True], [False], [True]]).expand(B, T)  # whole rows forced (hint, target)
    return logp0, old, adv, mask, guided


@pytest.mark.parametrize("correction", ["shaping", "is", "none"])
def test_off_policy_corrections(correction):
    gamma, cap, eps_low, eps_high = 0.1, 2.0, 0.2, 0.28
    logp0, old, adv, mask, guided = correction_batch()
    weights = mask * torch.tensor([1.0, 0.5, 2.0, 0.25])[:, None]  # arbitrary aggregation weights

    logp = logp0.clone().requires_grad_(True)
    loss, _ = agrl.grpo_loss(
        logp, old, adv, weights, eps_low, eps_high, forced=guided, correction=correction, gamma=gamma, is_cap=cap
    )
    loss.backward()
    plain_logp = logp0.clone().requires_grad_(True)
    plain, _ = grpo.grpo_loss(plain_logp, old, adv, weights, eps_low, eps_high)
    plain.backward()

    g_rows, u_rows = guided[:, 0], ~guided[:, 0]
    torch.testing.assert_close(logp.grad[u_rows], plain_logp.grad[u_rows])  # unguided rows: the PPO term
    p, ratio = logp0.exp(), (logp0 - old).exp()
    if correction == "shaping":
        per_token = -(p / (p + gamma)) * adv
        grad = -adv * gamma * p / (p + gamma) ** 2
    elif correction == "is":
        assert ((ratio > cap) & guided & (mask > 0)).any()
        per_token = -torch.clamp(ratio, max=cap) * adv
        grad = torch.where(ratio > cap, torch.zeros_like(ratio), -adv * ratio)
    else:
        per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
        grad = plain_logp.grad / torch.where(weights > 0, weights, torch.ones_like(weights))
    torch.testing.assert_close(logp.grad[g_rows], (grad * weights)[g_rows], atol=1e-6, rtol=1e-5)
    plain_terms = plain_per_token(logp0, old, adv, eps_low, eps_high)
    expected_loss = (per_token * weights)[g_rows].sum() + (plain_terms * weights)[u_rows].sum()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    if correction == "is":  # truncated where the ratio passes the cap: no gradient there
        over = (ratio > cap) & guided & (mask > 0)
        assert torch.all(logp.grad[over] == 0)


def plain_per_token(logp, old, adv, eps_low, eps_high):
    ratio = (logp - old).exp()
    return -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)


def test_no_guided_rows_is_grpo_loss():
    logp0, old, adv, mask, _ = correction_batch()
    for correction in ("shaping", "is", "none"):
        a, sa = agrl.grpo_loss(
            logp0,
            old,
            adv,
            mask,
            0.2,
            0.28,
            0.1,
            logp0 - 0.1,
            forced=torch.zeros(4, 5, dtype=torch.bool),
            correction=correction,
        )
        b, sb = grpo.grpo_loss(logp0, old, adv, mask, 0.2, 0.28, 0.1, logp0 - 0.1)
        assert a.item() == b.item() and all(sa[k].item() == sb[k].item() for k in sb)


# ==================================================================================================
# 8. RRS and AGR off: the same run as grpo.py
# ==================================================================================================


def test_off_off_equals_grpo(tmp_path, monkeypatch):
    monkeypatch.setattr(agrl, "score_group", fake_score_group)
    monkeypatch.setattr(grpo, "score_group", fake_score_group)
    common = dict(
        model="tiny-random",
        dataset="synthetic",
        limit=8,
        total_steps=2,
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=8,
        micro_batch_size=4,
        device="cpu",
        eval_limit=2,
        output_dir=str(tmp_path),
        temperature=1.0,
        lr=1e-3,
        warmup_steps=1,
        seed=1,
        dynamic_sampling=True,
        ds_max_tries=1,
    )
    agrl.main(agrl.Args(rrs=False, agr=False, run_name="agrl", **common))
    grpo.main(grpo.Args(run_name="grpo", **common))
    a, g = read_metrics(tmp_path / "agrl"), read_metrics(tmp_path / "grpo")
    assert len(a) == len(g) == 2
    assert any(m["grad_norm"] > 0 for m in g)  # the weights really move
    for ma, mg in zip(a, g):
        ma = {k: v for k, v in ma.items() if not any(t in k for t in TIMING) and not k.startswith("agr_")}
        mg = {k: v for k, v in mg.items() if not any(t in k for t in TIMING)}
        assert ma == mg
    wa, wg = state_dict(tmp_path / "agrl" / "checkpoint"), state_dict(tmp_path / "grpo" / "checkpoint")
    assert wa.keys() == wg.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wg[k], atol=1e-6, rtol=0)


# ==================================================================================================
# 9. Guidance a small policy can use: prefix and target modes, and replay that recurs
# ==================================================================================================
def guided_run(tmp_path, guide: str, order: str = "label_first", **overrides):
    """A tiny-random run in which the policy's own answers never parse (every group stagnant) and a
    guided answer counts as correct when it starts with the gold answer's first segment (the scoring
    stands in for a continuation that completes it). Returns the training rows and groups of each step."""
    real_score, real_rows = agrl.score_group, agrl.training_rows
    seen = dict(rows=[], groups=[])

    def score(texts, example, rulebook, args):
        good = D.sft_target(example, rulebook, args.order)
        head = good[: good.index("</label>" if args.order == "label_first" else "</criteria>")]
        return real_score([good if t.startswith(head) else "no" for t in texts], example, rulebook, args)

    def rows(groups, advantages, *a, **kw):
        seen["groups"].append(groups)
        seen["rows"].append(real_rows(groups, advantages, *a, **kw))
        return seen["rows"][-1]

    args = agrl.Args(
        **dict(
            dict(
                model="tiny-random",
                dataset="synthetic",
                limit=16,
                total_steps=1,
                prompts_per_step=2,
                group_size=4,
                max_new_tokens=48,
                micro_batch_size=4,
                device="cpu",
                eval_limit=1,
                output_dir=str(tmp_path),
                run_name=f"{guide}-{order}",
                agr_k=2,
                lr=1e-3,
                warmup_steps=1,
                seed=1,
                agr_guide=guide,
                order=order,
                ds_max_tries=0,
                underfill_scale=False,  # the own groups never vary: under the step rule they alone would set it to 0
            ),
            **overrides,
        )
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(agrl, "score_group", score)
        mp.setattr(agrl, "training_rows", rows)
        agrl.main(args)
    return args, seen


@pytest.mark.parametrize("order", ["label_first", "think_first"])
def test_prefix_guidance_forces_exactly_the_gold_segment(tmp_path, tokenizer, order):
    args, seen = guided_run(tmp_path, "prefix", order)
    examples = D.load_dataset("synthetic", "train", seed=1, limit=16).examples
    policy = models.load_model("tiny-random", "cpu")[0]  # the policy that sampled step 1 (seeded init)
    guided = [(g, j) for g in seen["groups"][0] for j in range(len(g["guided"])) if g["guided"][j]]
    assert len(guided) == 2 * args.agr_k  # both groups stagnant, every guided answer kept
    for group, j in guided:
        example = examples[group["example_index"]]
        completion, forced = group["completions"][j], group["forced"][j]
        segment = agrl.gold_segment_ids(tokenizer, example, R.TAOBAO4, order)
        target = tokenizer.encode(D.sft_target(example, R.TAOBAO4, order), add_special_tokens=False)
        # the forced tokens are exactly the SFT target's tokens that spell the first segment, and no more
        assert completion[:forced] == segment == target[: len(segment)] and forced == len(segment) < len(completion)
        text = tokenizer.decode(segment)
        tag = "</label>\n" if order == "label_first" else "</criteria>\n"
        assert text.endswith(tag) and text.count(tag) == 1
        # the stored behaviour log-probs of every token equal a teacher-forced forward of the policy on
        # the *unguided* prompt + completion: the sampled continuation's are exact, on-policy
        batch = models.pad_batch([group["prompt"]], [completion], tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            logp = models.token_logprobs(policy, batch, args.temperature)[0][0, : len(completion)]
        torch.testing.assert_close(torch.tensor(group["old_logprobs"][j]), logp, atol=1e-4, rtol=1e-4)
    for row in seen["rows"][0]:
        assert row["prompt"] in [g["prompt"] for g in seen["groups"][0]]  # trained under the unguided prompt
    assert all(r["forced"] == 0 for r in seen["rows"][0] if not r["guided"])


def test_prefix_correction_applies_to_forced_tokens_only():
    logp0, old, adv, mask, _ = correction_batch()
    forced = torch.zeros_like(mask, dtype=torch.bool)
    forced[1, :2] = True  # row 1: two forced tokens, then its own continuation
    logp = logp0.clone().requires_grad_(True)
    loss, _ = agrl.grpo_loss(logp, old, adv, mask, 0.2, 0.28, forced=forced, correction="shaping", gamma=0.1)
    loss.backward()
    plain_logp = logp0.clone().requires_grad_(True)
    grpo.grpo_loss(plain_logp, old, adv, mask, 0.2, 0.28)[0].backward()
    torch.testing.assert_close(logp.grad[~forced], plain_logp.grad[~forced])  # sampled tokens: clipped ratio
    p = logp0.exp()
    shaping_grad = (-adv * 0.1 * p / (p + 0.1) ** 2) * mask
    torch.testing.assert_close(logp.grad[forced], shaping_grad[forced])


def test_target_guidance_is_the_sft_target(tmp_path, tokenizer):
    args, seen = guided_run(tmp_path, "target")
    examples = D.load_dataset("synthetic", "train", seed=1, limit=16).examples
    guided = [(g, j) for g in seen["groups"][0] for j in range(len(g["guided"])) if g["guided"][j]]
    assert len(guided) == 2  # one target per stagnant group, no generation
    metrics = read_metrics(tmp_path / "target-label_first")[0]
    assert metrics["completions_generated"] == args.prompts_per_step * args.group_size  # targets cost no generation
    for group, j in guided:
        _, labels, _ = D.encode_sft(tokenizer, examples[group["example_index"]], R.TAOBAO4, "label_first")
        target = [t for t in labels if t != -100]
        assert group["completions"][j] == target and group["forced"][j] == len(target)


def test_stagnant_prompts_come_back_after_the_delay(tmp_path):
    """Every group stays stagnant: each prompt is re-queued and returns agr_replay_delay steps later,
    taking at most half of a step's prompts, while the stream keeps moving."""
    args, seen = guided_run(
        tmp_path,
        "hint",
        total_steps=5,
        prompts_per_step=2,
        agr_replay_delay=2,
        max_new_tokens=4,
        run_name="requeue",
        dynamic_sampling=False,
        max_empty_steps=0,
    )  # never stop on guided-only steps
    metrics = read_metrics(tmp_path / "requeue")
    per_step = [[g["example_index"] for g in groups] for groups in seen["groups"]]
    positions = [[g["position"] for g in groups] for groups in seen["groups"]]
    assert [m["agr_returned"] for m in metrics] == [0, 0, 1, 1, 1]
    assert [m["agr_requeued"] for m in metrics] == [2] * 5  # a returning prompt that is still stagnant goes back in
    assert [m["agr_queue_length"] for m in metrics] == [2, 4, 5, 6, 7]
    assert [m["agr_recovered"] for m in metrics] == [0] * 5
    assert [m["data_position"] for m in metrics] == [2, 4, 5, 6, 7]
    # the prompts come back oldest first, one a step (half the batch): step 1's two, then step 2's first
    assert per_step[2][0] == per_step[0][0] and per_step[3][0] == per_step[0][1] and per_step[4][0] == per_step[1][0]
    assert all(p[0] >= agrl.REPLAY_KEY > p[1] for p in positions[2:]) and all(
        p < agrl.REPLAY_KEY for p in positions[0] + positions[1]
    )
    # its seed key is new, so its samples are fresh
    assert len({p for ps in positions for p in ps}) == sum(len(ps) for ps in positions)


# ==================================================================================================
# 10. What the AGR study found (issue 30): own-sample baselines, a likelihood term, equal step size
# ==================================================================================================
def guided_group(own_rewards: list[float], guided_rewards: list[float]) -> dict:
    G, K = len(own_rewards), len(guided_rewards)
    return dict(rewards=own_rewards + guided_rewards, guided=[False] * G + [True] * K)


def test_own_advantages_by_hand():
    # all own answers wrong, one guided answer appended: GRPO would give the own answers nothing, and so does
    # "own"; the union z-score gives each wrong own answer -1/sqrt(5) / std... computed by hand below
    all_fail = guided_group([0.0, 0.0, 0.0, 0.0], [1.0])
    (own,) = agrl.own_advantages([all_fail])
    assert own.tolist() == [0.0] * 5
    (union,) = agrl.group_advantages([all_fail["rewards"]])
    std = (4 * 0.2**2 + 0.8**2) ** 0.5 / 2  # sample std of [0, 0, 0, 0, 1]: sqrt(0.8 / 4)
    assert union.tolist() == pytest.approx([-0.2 / (std + 1e-4)] * 4 + [0.8 / (std + 1e-4)], abs=1e-6)
    assert union[0].item() == pytest.approx(-0.447, abs=1e-3)  # the push the study found breaking the policy

    # one own answer right: the own answers get exactly GRPO's advantages, the guided one zero
    one_right = guided_group([1.0, 0.0, 0.0, 0.0], [1.0, 1.0])
    (own,) = agrl.own_advantages([one_right])
    std = (0.75**2 + 3 * 0.25**2) ** 0.5 / 3**0.5  # sample std of [1, 0, 0, 0]: 0.5
    assert std == pytest.approx(0.5)
    assert own.tolist() == pytest.approx(
        [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0], abs=1e-6
    )
    (plain,) = agrl.group_advantages([[1.0, 0.0, 0.0, 0.0]])
    assert own[:4].tolist() == plain.tolist()
    # guided answers in place of own ones (replace mode): the remaining own answers set the baseline alone
    replaced = dict(rewards=[1.0, 0.0, 1.0, 0.5], guided=[False, False, True, False])
    (own,) = agrl.own_advantages([replaced])
    assert own[2].item() == 0.0
    assert own[[0, 1, 3]].tolist() == agrl.group_advantages([[1.0, 0.0, 0.5]])[0].tolist()


def test_likelihood_term_and_forced_weight_gradients():
    logp0, old, adv, mask, _ = correction_batch()
    forced = torch.zeros_like(mask, dtype=torch.bool)
    forced[1, :2] = True  # row 1 is guided: two forced tokens, then its sampled continuation
    guided_rows = torch.zeros_like(mask)
    guided_rows[1] = mask[1]
    weights = mask / mask.sum()
    plain_logp = logp0.clone().requires_grad_(True)
    grpo.grpo_loss(plain_logp, old, adv, weights, 0.2, 0.28)[0].backward()
    for forced_weight, nll_weight in ((0.0, 0.0), (0.5, 0.0), (1.0, 2.0), (0.0, 1.0)):
        logp = logp0.clone().requires_grad_(True)
        loss, stats = agrl.grpo_loss(
            logp,
            old,
            adv,
            weights,
            0.2,
            0.28,
            forced=forced,
            correction="is",
            is_cap=2.0,
            forced_weight=forced_weight,
            nll_mask=guided_rows,
            nll_weight=nll_weight,
        )
        loss.backward()
        ratio = (logp0 - old).exp()
        is_grad = torch.where(ratio > 2.0, torch.zeros_like(ratio), -adv * ratio) * weights
        expected = torch.where(forced, forced_weight * is_grad, plain_logp.grad) - nll_weight * guided_rows * weights
        torch.testing.assert_close(logp.grad, expected)
        # the statistic is the unweighted likelihood term as the loss aggregates it
        assert stats["guided_nll"].item() == pytest.approx((-logp0 * guided_rows * weights).sum().item(), rel=1e-6)


def test_guided_answers_alone_make_no_step(tmp_path):
    """Every own group fails (the tiny policy never parses) and every guided answer is kept: under the step
    rule the step size is GRPO's for the same own samples, zero, so nothing is trained; without the
    underfill scale the guided answers are trained."""
    start = state_dict_of_fresh_model()
    guided_run(tmp_path, "prefix", run_name="rule", underfill_scale=True, max_empty_steps=0)
    metrics = read_metrics(tmp_path / "rule")[0]
    assert metrics["agr_groups_guided"] == 2 and metrics["update_scale"] == 0.0 and metrics["grad_norm"] == 0.0
    for name, tensor in state_dict(tmp_path / "rule" / "checkpoint").items():
        torch.testing.assert_close(tensor, start[name])
    guided_run(tmp_path, "prefix", run_name="no-scale", underfill_scale=False)
    metrics = read_metrics(tmp_path / "no-scale")[0]
    assert metrics["update_scale"] == 1.0 and metrics["grad_norm"] > 0


def state_dict_of_fresh_model() -> dict:
    model = models.load_model("tiny-random", "cpu")[0]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("frac", [0.3, 0.01, 1.0])
def test_prefix_fraction_forces_a_share_of_the_segment(tokenizer, frac):
    examples = D.load_dataset("synthetic", "train", seed=1, limit=2).examples
    policy = models.load_model("tiny-random", "cpu")[0]
    args = agrl.Args(model="tiny-random", order="think_first", max_new_tokens=48, temperature=1.0, agr_guide="prefix")
    to_guide = [
        dict(
            position=i,
            group=dict(prompt=D.encode_prompt(tokenizer, e, R.TAOBAO4, "think_first")[0], example_index=i, position=i),
            guidance="",
            level=1,
            prefix_frac=frac,
        )
        for i, e in enumerate(examples)
    ]
    results = agrl.guided_answers(policy, tokenizer, to_guide, examples, R.TAOBAO4, args, 2, "cpu")
    for t, result in zip(to_guide, results):
        segment = agrl.gold_segment_ids(tokenizer, examples[t["position"]], R.TAOBAO4, "think_first")
        n = max(1, math.ceil(frac * len(segment)))
        assert n <= len(segment) and (n < len(segment) or frac == 1.0)
        for completion, forced in zip(result["completions"], result["forced"]):
            assert forced == n and completion[:n] == segment[:n]


def test_replayed_answers_get_fresh_behaviour_logprobs(escalation_run, tokenizer):
    """Step 3 replays step 2's guided answers: their pi_old is the policy of step 3 (the step-2 checkpoint)
    under the unguided prompt, not the log-probs stored when they were sampled under the guidance."""
    rows = [r for r in escalation_run["seen"]["rows"][2] if r["guided"]]
    assert len(rows) == 2
    policy = models.load_model(str(escalation_run["dir"] / "checkpoints" / "step-0000002"), "cpu")[0]
    stored = [c["old_logprobs"] for c in escalation_run["states"][1][next(iter(escalation_run["states"][1]))]["buffer"]]
    for r in rows:
        batch = models.pad_batch([r["prompt"]], [r["completion"]], tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            fresh = models.token_logprobs(policy, batch, escalation_run["args"].temperature)[0][0]
        torch.testing.assert_close(torch.tensor(r["old_logprobs"]), fresh, atol=1e-4, rtol=1e-4)
        assert all(
            abs(a - b) > 1e-3
            for a, b in zip(r["old_logprobs"], next(s for s in stored if len(s) == len(r["old_logprobs"])))
        )


def test_attempt_rates_are_none_without_attempts(escalation_run):
    m = escalation_run["metrics"]
    # steps 3-5 tried no guidance (a replay, then recovery): no rate, not a zero that a mean over steps would count
    assert [x["agr_guided_success_rate"] for x in m] == [0.0, 1.0, None, None, None]
    assert [x["agr_guided_tried"] for x in m] == [3, 3, 0, 0, 0]
    assert [x["agr_guided_kept"] for x in m] == [0, 3, 0, 0, 0]
    assert [x["agr_rescued_share"] for x in m] == [0.0, 1.0, None, None, None]


def test_own_mode_in_a_run_trains_guided_answers_by_likelihood_only(tmp_path):
    """All own answers fail and the guided ones are kept: under `own` every row's advantage is zero (GRPO's for
    the own samples; none for the guided ones), so the step's gradient is the likelihood term alone."""
    args, seen = guided_run(
        tmp_path,
        "prefix",
        run_name="own",
        agr_advantage="own",
        agr_mix="append",
        agr_nll_weight=1.0,
        underfill_scale=False,
    )
    rows = seen["rows"][0]
    assert sum(r["guided"] for r in rows) == 2 * args.agr_k and len(rows) == 2 * (args.group_size + args.agr_k)
    assert all(a == 0.0 for r in rows for a in r["advantages"])
    m = read_metrics(tmp_path / "own")[0]
    assert m["agr_guided_nll"] > 0 and m["grad_norm"] > 0
    args, seen = guided_run(
        tmp_path, "prefix", run_name="own-no-nll", agr_advantage="own", agr_mix="append", agr_nll_weight=0.0
    )
    m = read_metrics(tmp_path / "own-no-nll")[0]
    assert m["agr_guided_nll"] > 0 and m["grad_norm"] == 0.0  # without the term nothing teaches


def test_buffer_size_zero_turns_replay_off(tmp_path):
    """--agr-buffer-size 0 keeps nothing (a slice [-0:] would keep everything): a prompt that stays all-fail is
    guided afresh every time, never replayed."""
    args, seen = guided_run(
        tmp_path,
        "prefix",
        run_name="no-buffer",
        limit=1,
        prompts_per_step=1,
        total_steps=3,
        agr_buffer_size=0,
        agr_replay_delay=0,
        dynamic_sampling=False,
        max_empty_steps=0,
    )
    metrics = read_metrics(tmp_path / "no-buffer")
    assert [m["agr_buffer_hits"] for m in metrics] == [0, 0, 0]
    assert [m["agr_groups_guided"] for m in metrics] == [1, 1, 1]  # guided (and kept) at every step
