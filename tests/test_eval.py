"""Tests for eval.py: model names, metrics, tiering, label tokens, generation, log-probs, evaluation,
checkpoints, comparisons and run folders. CPU only, on `tiny-random` (2-layer random Llama, real
SmolLM2 tokenizer) and a handful of synthetic examples.

The stock tiny-random model is nearly uniform and greedy-decodes one token forever, which would let a
wrong generation loop pass. Generation tests therefore use `lively`: the same architecture with larger
random weights (peaked, varied next-token distributions), and `EosBias`, a wrapper that gives the stop
token a fixed probability so that completions end at different lengths.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import data as D
import eval as E
import rewards as R
from helpers import checkpoints, errors, models, rollouts, runs

LABELS = ("A", "B", "C", "D")


# ==================================================================================================
# Helpers
# ==================================================================================================
class EosBias(torch.nn.Module):
    """Wraps a causal LM: the stop token gets probability `p` (at temperature 1) at every position."""

    def __init__(self, inner, stop_id: int, p: float):
        super().__init__()
        self.inner, self.stop_id, self.log_odds = inner, stop_id, math.log(p / (1 - p))

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        logits = out.logits.clone()
        others = torch.cat([logits[..., : self.stop_id], logits[..., self.stop_id + 1 :]], -1)
        logits[..., self.stop_id] = torch.logsumexp(others, -1) + self.log_odds
        out.logits = logits
        return out


class Recorder(torch.nn.Module):
    """Wraps a causal LM and records the shape of every logits tensor it returns."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.shapes = inner, []

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        self.shapes.append(tuple(out.logits.shape))
        return out


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(100, 40000, (n,), generator=gen).tolist() for n in (5, 17, 9, 12)]


@pytest.fixture(scope="module")
def dev():
    return D.load_dataset("synthetic", "dev", limit=6)


def stops_of(tokenizer):
    return set(models.stop_token_ids(tokenizer))


# ==================================================================================================
# 1. Model names
# ==================================================================================================
@pytest.mark.parametrize(
    "name, expected",
    [
        ("Qwen2.5-7B", "Qwen/Qwen2.5-7B"),
        ("Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
        ("Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
        ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("Mistral-7B-Instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"),
        ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B"),  # hub ids as given
        ("someorg/llama-finetune", "someorg/llama-finetune"),
        ("smollm2-135m", "smollm2-135m"),  # aliases, although "smollm" is a known prefix
        ("tiny-random", "tiny-random"),
        ("gpt2", "gpt2"),  # no known organisation: left to the hub
    ],
)
def test_resolve_model_name(name, expected):
    assert models.resolve_model_name(name) == expected


def test_resolve_model_name_keeps_an_existing_local_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen2.5-mine").mkdir()  # would otherwise be read as a bare Qwen name
    assert models.resolve_model_name("Qwen2.5-mine") == "Qwen2.5-mine"
    assert models.resolve_model_name(str(tmp_path / "Qwen2.5-mine")) == str(tmp_path / "Qwen2.5-mine")


def _offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.chdir(tmp_path)


def test_load_model_unknown_name_says_what_was_tried(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(errors.UserError) as info:
        models.load_model("no-such-model-xyz", "cpu")
    message = str(info.value)
    assert "no-such-model-xyz" in message
    assert f"local directory {tmp_path / 'no-such-model-xyz'} (not found)" in message
    assert "tiny-random" in message  # the aliases are listed

    with pytest.raises(errors.UserError) as info:
        models.load_model("Qwen2.5-no-such-xyz", "cpu")
    assert "hub id Qwen/Qwen2.5-no-such-xyz" in str(info.value)  # the resolved name is named too


# ==================================================================================================
# 2. Metrics
# ==================================================================================================
def test_classification_metrics_by_hand():
    gold = ["A", "A", "A", "B", "B", "C", "C", "C"]
    pred = ["A", "B", None, "B", "A", "C", "D", "bogus"]  # None and unknown strings are invalid
    format_ok = [True, True, False, True, True, True, True, False]
    adherent = [True, False, False, True, False, True, False, False]
    m = E.classification_metrics(gold, pred, LABELS, format_ok, adherent)

    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(3 / 8)
    assert m["confusion_labels"] == ["A", "B", "C", "D", E.INVALID]
    assert m["confusion"] == [[1, 1, 0, 0, 1], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    expected = {
        "A": (1 / 2, 1 / 3, 0.4, 3),
        "B": (0.5, 0.5, 0.5, 2),
        "C": (1.0, 1 / 3, 0.5, 3),
        "D": (0.0, 0.0, 0.0, 0),
    }
    for label, (precision, recall, f1, support) in expected.items():
        pc = m["per_class"][label]
        assert pc["precision"] == pytest.approx(precision), label
        assert pc["recall"] == pytest.approx(recall), label
        assert pc["f1"] == pytest.approx(f1), label
        assert pc["support"] == support, label
    # macro-F1 over the classes present in gold (D is absent although predicted once): not 1.4 / 4
    assert m["macro_f1"] == pytest.approx((0.4 + 0.5 + 0.5) / 3)
    assert m["format_rate"] == pytest.approx(6 / 8)
    assert m["adherence_rate"] == pytest.approx(3 / 8)

    bare = E.classification_metrics(gold, pred, LABELS)
    assert bare["format_rate"] is None and bare["adherence_rate"] is None
    empty = E.classification_metrics([], [], LABELS)
    assert empty["n"] == 0 and empty["accuracy"] == 0.0 and empty["macro_f1"] == 0.0


def _example(label: str, i: int) -> D.Example:
    return D.Example(query=f"q{i}", title=f"t{i}", label=label, criteria={}, source_id=f"x:{i}")


def test_natural_and_balanced():
    labels = R.TAOBAO4.labels  # Excellent, Related, Mismatch, Irrelevant
    gold = ["Excellent"] * 5 + ["Related"] * 3 + ["Mismatch"] * 2
    examples = [_example(label, i) for i, label in enumerate(gold)]
    predicted = [None if g == "Related" else g for g in gold]  # every Related answer is broken
    format_ok = [p is not None for p in predicted]
    m = E.natural_and_balanced(examples, predicted, R.TAOBAO4, format_ok, format_ok, seed=3)

    assert m["n"] == 10 and m["accuracy"] == pytest.approx(0.7)
    b = m["balanced"]
    supports = {label: b["per_class"][label]["support"] for label in labels}
    assert supports == {"Excellent": 2, "Related": 2, "Mismatch": 2, "Irrelevant": 0}
    assert b["n"] == 6
    # predictions and flags were resampled together with their examples
    assert b["accuracy"] == pytest.approx(4 / 6)
    assert b["per_class"]["Excellent"]["recall"] == 1.0 and b["per_class"]["Related"]["recall"] == 0.0
    assert b["confusion"][1][-1] == 2  # both balanced Related examples in the invalid column
    assert b["format_rate"] == pytest.approx(4 / 6) and b["adherence_rate"] == pytest.approx(4 / 6)


# ==================================================================================================
# 3. Tiering
# ==================================================================================================
@pytest.mark.parametrize(
    "probs, threshold, expected",
    [
        ([0.3, 0.3, 0.2, 0.2], 0.5, "B"),
        ([0.3, 0.3, 0.2, 0.2], 0.25, "A"),
        ([0.3, 0.3, 0.2, 0.2], 0.3, "A"),  # reaching the threshold exactly counts
        ([0.3, 0.3, 0.2, 0.2], 0.6, "B"),
        ([0.3, 0.3, 0.2, 0.2], 0.7, "C"),
        ([0.3, 0.3, 0.2, 0.2], 1.0, "D"),
        ([0.05, 0.05, 0.1, 0.8], 0.5, "D"),
        ([0.9, 0.05, 0.03, 0.02], 0.5, "A"),
        ([0.9, 0.05, 0.03, 0.02], 0.95, "B"),
    ],
)
def test_tier(probs, threshold, expected):
    assert E.tier(torch.tensor([probs]), LABELS, threshold) == [expected]


def test_tier_batch():
    probs = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.05, 0.05, 0.1, 0.8], [0.6, 0.2, 0.1, 0.1]])
    assert E.tier(probs, LABELS, 0.5) == ["B", "D", "A"]


# ==================================================================================================
# 4. Label tokens
# ==================================================================================================
@pytest.mark.parametrize("rulebook", [R.TAOBAO4, R.ESCI], ids=["taobao4", "esci"])
def test_label_token_ids(tokenizer, rulebook):
    prefix, first = E.label_token_ids(tokenizer, rulebook)
    assert tokenizer.decode(prefix) == "<label>"
    assert len(first) == len(rulebook.labels) and len(set(first)) == len(first)
    for label, token in zip(rulebook.labels, first):
        full = tokenizer.encode(f"<label>{label}", add_special_tokens=False)
        assert full[: len(prefix) + 1] == prefix + [token], label
        assert tokenizer.encode(f"<label>{label}</label>", add_special_tokens=False)[: len(prefix) + 1] == prefix + [
            token
        ]


def test_sft_targets_put_the_label_token_where_label_only_reads_it(tokenizer, dev):
    """The label-only path appends `prefix` to the prompt and reads the next token: SFT must train that."""
    prefix, first = E.label_token_ids(tokenizer, dev.rulebook)
    for e in dev.examples:
        prompt, _ = D.encode_prompt(tokenizer, e, dev.rulebook)
        ids, labels, _ = D.encode_sft(tokenizer, e, dev.rulebook)
        assert ids[: len(prompt)] == prompt and labels.count(-100) == len(prompt)
        target = ids[len(prompt) :]
        assert target[: len(prefix) + 1] == prefix + [first[dev.rulebook.labels.index(e.label)]]


# ==================================================================================================
# 5. Generation
# ==================================================================================================
def test_shared_prefill_equals_plain_prefill(lively, tokenizer, prompts):
    a = rollouts.generate(lively, tokenizer, prompts, n=3, max_new_tokens=8, shared_prefill=True)
    b = rollouts.generate(lively, tokenizer, prompts, n=3, max_new_tokens=8, shared_prefill=False)
    assert len(a.completion_ids) == len(b.completion_ids) == 3 * len(prompts)
    assert a.completion_ids == b.completion_ids
    assert len({tuple(c) for c in a.completion_ids}) == len(prompts)  # greedy: one answer per prompt, not all alike
    for x, y in zip(a.logprobs, b.logprobs):
        assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5)
    # completion j of prompt i sits at i * n + j, with its own prompt
    assert a.prompt_ids == [p for p in prompts for _ in range(3)] == b.prompt_ids
    assert a.texts == [tokenizer.decode(c, skip_special_tokens=True) for c in a.completion_ids]


def test_greedy_equals_hf_generate(lively, tokenizer, prompts):
    k = 10
    for prompt in prompts[:2]:
        ours = rollouts.generate(lively, tokenizer, [prompt], n=1, max_new_tokens=k)
        ids = torch.tensor([prompt])
        hf = lively.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=k,
            min_new_tokens=k,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert ours.completion_ids[0] == hf[0, len(prompt) : len(prompt) + k].tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_equal_token_logprobs(lively, tokenizer, prompts, temperature):
    model = EosBias(lively, tokenizer.eos_token_id, 0.15)  # completions of different lengths
    out = rollouts.generate(
        model, tokenizer, prompts, n=2, max_new_tokens=8, temperature=temperature, seeds=[3, 4, 5, 6]
    )
    assert len({len(c) for c in out.completion_ids}) > 1
    batch = models.pad_batch(out.prompt_ids, out.completion_ids, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logp, _ = models.token_logprobs(model, batch, temperature)
    for row, behaviour in enumerate(out.logprobs):
        assert torch.allclose(logp[row, : len(behaviour)], torch.tensor(behaviour), atol=1e-4), row


def test_seeded_sampling_is_reproducible_and_batch_independent(lively, tokenizer, prompts):
    kw = dict(n=2, max_new_tokens=6, temperature=1.0)
    seeds = [11, 12, 13, 14]
    together = rollouts.generate(lively, tokenizer, prompts, seeds=seeds, batch_size=4, **kw)
    assert (
        rollouts.generate(lively, tokenizer, prompts, seeds=seeds, batch_size=4, **kw).completion_ids
        == together.completion_ids
    )
    for batch_size in (1, 3):
        again = rollouts.generate(lively, tokenizer, prompts, seeds=seeds, batch_size=batch_size, **kw)
        assert again.completion_ids == together.completion_ids, batch_size
    plain = rollouts.generate(lively, tokenizer, prompts, seeds=seeds, shared_prefill=False, **kw)
    assert plain.completion_ids == together.completion_ids
    alone = rollouts.generate(lively, tokenizer, [prompts[2]], seeds=[13], **kw)
    assert alone.completion_ids == together.completion_ids[4:6]
    assert alone.logprobs[0] == pytest.approx(together.logprobs[4], abs=1e-4)
    # and the randomness is real: the two samples of a prompt differ, and another seed changes them
    assert together.completion_ids[4] != together.completion_ids[5]
    other = rollouts.generate(lively, tokenizer, [prompts[2]], seeds=[99], **kw)
    assert other.completion_ids != alone.completion_ids


def test_min_new_tokens_and_truncated_flags(lively, tokenizer, prompts):
    stops = stops_of(tokenizer)
    model = EosBias(lively, tokenizer.eos_token_id, 0.4)
    # seeds under which both cases occur (a row runs 6 tokens without stopping with probability 0.6^6 = 5%)
    free = rollouts.generate(model, tokenizer, prompts, n=3, max_new_tokens=6, temperature=1.0, seeds=[9, 10, 11, 12])
    assert any(free.truncated) and not all(free.truncated)
    for ids, logps, truncated in zip(free.completion_ids, free.logprobs, free.truncated):
        assert len(ids) == len(logps) >= 1
        assert [t in stops for t in ids[:-1]] == [False] * (len(ids) - 1)  # nothing after the stop token
        if truncated:
            assert len(ids) == 6 and ids[-1] not in stops
        else:
            assert ids[-1] in stops and len(ids) <= 6

    forced = rollouts.generate(
        model, tokenizer, prompts, n=3, max_new_tokens=5, min_new_tokens=5, temperature=1.0, seeds=[1, 2, 3, 4]
    )
    assert all(len(ids) == 5 for ids in forced.completion_ids)
    assert not any(t in stops for ids in forced.completion_ids for t in ids)
    assert all(forced.truncated)
    assert all(len(lp) == 5 and all(math.isfinite(x) for x in lp) for lp in forced.logprobs)


def test_generate_restores_training_mode(tiny_model, tokenizer, prompts):
    tiny_model.train()
    try:
        rollouts.generate(tiny_model, tokenizer, prompts[:1], max_new_tokens=2)
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_prefill_keeps_only_last_position_logits(lively, tokenizer, prompts):
    model = Recorder(lively)
    rollouts.generate(model, tokenizer, prompts, n=2, max_new_tokens=3)
    E.label_distribution(model, tokenizer, prompts, R.TAOBAO4)
    assert all(shape[1] == 1 for shape in model.shapes), model.shapes


# ==================================================================================================
# 6. pad_batch
# ==================================================================================================
def test_pad_batch_layout():
    prompts = [[5, 6, 7], [8], [9, 10]]
    completions = [[1], [2, 3, 4], []]
    b = models.pad_batch(prompts, completions, 0, "cpu")
    assert b["input_ids"].tolist() == [[5, 6, 7, 1, 0, 0], [0, 0, 8, 2, 3, 4], [0, 9, 10, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]]
    assert b["completion_mask"].tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    positions = b["position_ids"].tolist()
    assert positions[0][:4] == [0, 1, 2, 3] and positions[1][2:] == [0, 1, 2, 3] and positions[2][1:3] == [0, 1]


def test_token_logprobs_ignore_padding(lively, tokenizer, prompts):
    """A row's log-probs do not depend on what it is batched with (left padding, explicit positions)."""
    completions = [[300, 301, 302], [400], [500, 501], [600, 601, 602, 603]]
    batch = models.pad_batch(prompts, completions, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        together, entropy = models.token_logprobs(lively, batch, 1.0, with_entropy=True)
        for row, (p, c) in enumerate(zip(prompts, completions)):
            alone, _ = models.token_logprobs(lively, models.pad_batch([p], [c], tokenizer.pad_token_id, "cpu"))
            assert torch.allclose(together[row, : len(c)], alone[0], atol=1e-5), row
    assert entropy.shape == together.shape and bool((entropy[batch["completion_mask"] > 0] > 0).all())


@pytest.mark.parametrize("group", [False, True], ids=["common-system-prompt", "identical-prompts"])
def test_shared_prefix_gives_the_same_logprobs_and_gradients(lively, tokenizer, prompts, group):
    system = prompts[1]
    rows = [system] * 3 if group else [system + p for p in prompts[:3]]
    completions = [[300, 301, 302], [400], [500, 501]]

    def run(share):
        batch = models.pad_batch(rows, completions, tokenizer.pad_token_id, "cpu", share_prefix=share)
        lively.zero_grad()
        logp, _ = models.token_logprobs(lively, batch, 0.7)
        (logp * batch["completion_mask"]).sum().backward()
        grads = {n: p.grad.clone() for n, p in lively.named_parameters() if p.grad is not None}
        lively.zero_grad(set_to_none=True)
        return batch, logp.detach(), grads

    plain_batch, plain, plain_grads = run(False)
    shared_batch, shared, shared_grads = run(True)
    assert plain_batch["prefix_ids"].shape[1] == 0
    expected_prefix = len(system) - 1 if group else len(system)
    assert shared_batch["prefix_ids"][0].tolist() == system[:expected_prefix]
    mask = plain_batch["completion_mask"] > 0
    assert torch.equal(mask, shared_batch["completion_mask"] > 0)
    assert torch.allclose(plain[mask], shared[mask], atol=1e-5)
    assert set(plain_grads) == set(shared_grads)
    for name, grad in plain_grads.items():  # float32 summation order differs: compare at the tensor's scale
        assert (grad - shared_grads[name]).abs().max() <= 1e-5 * grad.abs().max() + 1e-7, name


# ==================================================================================================
# 7. evaluate and run_eval
# ==================================================================================================
KEYS = ("accuracy", "macro_f1", "per_class", "confusion", "format_rate", "adherence_rate", "n", "balanced")


def test_evaluate_generate_path(tiny_model, tokenizer, dev):
    metrics, records = E.evaluate(
        tiny_model, tokenizer, dev.examples, dev.rulebook, max_new_tokens=4, batch_size=4
    )  # two chunks, 4 + 2
    assert set(KEYS) <= set(metrics) and metrics["mode"] == "generate"
    assert metrics["n"] == len(records) == 6
    assert sum(map(sum, metrics["confusion"])) == 6
    # a random model writes no valid answer: every prediction is in the invalid column
    assert [row[-1] for row in metrics["confusion"]] == [sum(row) for row in metrics["confusion"]]
    assert metrics["format_rate"] == 0.0 and metrics["accuracy"] == 0.0
    assert [r["gold"] for r in records] == [e.label for e in dev.examples]
    assert all(r["predicted"] is None and r["format_ok"] is False for r in records)


def test_evaluate_label_only_path(tiny_model, tokenizer, dev):
    metrics, records = E.evaluate(
        tiny_model, tokenizer, dev.examples, dev.rulebook, label_only=True, tier_threshold=0.5, batch_size=4
    )
    assert set(KEYS) <= set(metrics) and metrics["mode"] == "label_only"
    assert metrics["n"] == 6 and sum(map(sum, metrics["confusion"])) == 6
    assert all(row[-1] == 0 for row in metrics["confusion"])  # the label-only path always yields a label
    assert metrics["format_rate"] is None
    probs = torch.tensor([r["probs"] for r in records])
    assert torch.allclose(probs.sum(-1), torch.ones(6), atol=1e-3)
    assert [r["predicted"] for r in records] == E.tier(probs, dev.rulebook.labels, 0.5)
    accuracy = sum(r["predicted"] == r["gold"] for r in records) / 6
    assert metrics["accuracy"] == pytest.approx(accuracy)


def test_run_eval_writes_the_run_folder(tiny_model, tokenizer, tmp_path, monkeypatch):
    titles = []
    plot = E.plot_confusion
    monkeypatch.setattr(E, "plot_confusion", lambda *a: (titles.append(a[3]), plot(*a)))
    args = E.Args(
        model="runs/mine-sft/checkpoint",  # a training run's closing evaluation names its start here
        dataset="synthetic",
        split="dev",
        limit=3,
        max_new_tokens=3,
        batch_size=2,
        output_dir=str(tmp_path),
        run_name="ev",
        device="cpu",
    )
    metrics = E.run_eval(args, tiny_model, tokenizer)
    folder = tmp_path / "ev"
    saved = json.loads((folder / "eval.json").read_text())
    assert set(KEYS) <= set(saved) and saved["n"] == 3 == metrics["n"]
    assert saved["confusion"] == metrics["confusion"]
    assert saved["data"]["rows_after_sampling"] == 3
    lines = (folder / "eval_samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all({"gold", "predicted", "output"} <= set(json.loads(line)) for line in lines)
    assert (folder / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert titles[0].startswith("ev on synthetic/dev: acc")  # titled after the run, not the model it started from


# ==================================================================================================
# 8. Checkpoints
# ==================================================================================================
def _train_state(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return dict(optimizer=optimizer.state_dict(), rng=checkpoints.rng_state())


def _steps(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_checkpoints_rotate_and_final(tiny_model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    state = _train_state(tiny_model)
    for step in (1, 2):
        checkpoints.save_checkpoint(tmp_path, step, tiny_model, tokenizer, state, keep_last=2)
    assert _steps(tmp_path) == ["step-0000001", "step-0000002"]
    folder = checkpoints.save_checkpoint(tmp_path, 3, tiny_model, tokenizer, state, keep_last=2, final=True)
    assert folder == tmp_path / "checkpoints" / "step-0000003"
    assert _steps(tmp_path) == ["step-0000002", "step-0000003"]  # no .tmp folders left either

    found, loaded = checkpoints.latest_checkpoint(tmp_path)
    assert found == folder and loaded["step"] == 3
    # train_state.pt holds only plain types: loads with weights_only=True, RNG state round-trips
    raw = torch.load(folder / "train_state.pt", weights_only=True)
    assert raw["step"] == 3 and set(raw) == {"optimizer", "rng", "step"}
    checkpoints.set_rng_state(raw["rng"])

    final = tmp_path / "checkpoint"
    assert not (final / "train_state.pt").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    ours, theirs = tiny_model.state_dict(), reloaded.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("damage", ["truncate_weights", "delete_tokenizer", "garble_train_state", "drop_manifest"])
def test_latest_checkpoint_skips_a_broken_one(tiny_model, tokenizer, tmp_path, capsys, damage):
    state = _train_state(tiny_model)
    for step in (4, 5):
        checkpoints.save_checkpoint(tmp_path, step, tiny_model, tokenizer, state, keep_last=3)
    newest = tmp_path / "checkpoints" / "step-0000005"
    if damage == "truncate_weights":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "delete_tokenizer":
        (newest / "tokenizer.json").unlink()
    elif damage == "garble_train_state":  # same size, unreadable: only loading it can tell
        path = newest / "train_state.pt"
        path.write_bytes(b"\0" * path.stat().st_size)
    else:
        (newest / "manifest.json").unlink()
    capsys.readouterr()
    found, loaded = checkpoints.latest_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoints" / "step-0000004" and loaded["step"] == 4
    assert str(newest) in capsys.readouterr().err


def test_latest_checkpoint_none(tmp_path):
    assert checkpoints.latest_checkpoint(tmp_path) == (None, None)


# ==================================================================================================
# 9. compare_runs
# ==================================================================================================
def _fake_eval(accuracy, macro_f1, f1s, adherence, fmt, balanced_accuracy):
    per_class = {label: dict(precision=0.0, recall=0.0, f1=f1, support=1) for label, f1 in zip(R.TAOBAO4.labels, f1s)}
    return dict(
        accuracy=accuracy,
        macro_f1=macro_f1,
        per_class=per_class,
        confusion=[[0] * 5] * 4,
        n=10,
        format_rate=fmt,
        adherence_rate=adherence,
        balanced=dict(
            accuracy=balanced_accuracy,
            macro_f1=0.25,
            per_class=per_class,
            format_rate=fmt,
            adherence_rate=adherence,
            n=8,
        ),
    )


def test_compare_runs(tmp_path, capsys):
    runs = {
        "sft": _fake_eval(0.5, 0.4, (0.6, 0.5, 0.3, 0.2), 0.9, 1.0, 0.45),
        "grpo": _fake_eval(0.75, 0.625, (0.8, 0.7, 0.5, 0.5), None, 0.875, 0.7),
    }
    for name, metrics in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(metrics))
    out = tmp_path / "cmp"
    table = E.compare_runs((str(tmp_path / "sft"), str(tmp_path / "grpo")), out)
    lines = table.splitlines()
    assert lines[0] == (
        "| run | sample | n | F1 Excellent | F1 Related | F1 Mismatch | F1 Irrelevant | macro-F1 | accuracy "
        "| adherence | format |"
    )
    assert lines[1].count("---") == 11
    assert lines[2:] == [
        "| sft | natural | 10 | 0.600 | 0.500 | 0.300 | 0.200 | 0.400 | 0.500 | 0.900 | 1.000 |",
        "| sft | balanced | 8 | 0.600 | 0.500 | 0.300 | 0.200 | 0.250 | 0.450 | 0.900 | 1.000 |",
        "| grpo | natural | 10 | 0.800 | 0.700 | 0.500 | 0.500 | 0.625 | 0.750 | - | 0.875 |",
        "| grpo | balanced | 8 | 0.800 | 0.700 | 0.500 | 0.500 | 0.250 | 0.700 | - | 0.875 |",
    ]
    assert "warning" not in capsys.readouterr().err  # the same sample: nothing to warn about
    assert (out / "comparison.md").read_text().strip() == table
    saved = json.loads((out / "comparison.json").read_text())
    assert list(saved) == ["sft", "grpo"]
    assert saved["grpo"]["accuracy"] == 0.75 and saved["grpo"]["adherence_rate"] is None
    assert saved["sft"]["balanced"]["accuracy"] == 0.45
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"

    with pytest.raises(errors.UserError, match="missing"):
        E.compare_runs((str(tmp_path / "sft"), str(tmp_path / "nowhere")), tmp_path / "cmp2")

    # a run scored on 200 examples next to one scored on 10: the n column shows it and a warning says so
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "eval.json").write_text(
        json.dumps(
            dict(runs["sft"], n=200, sample=dict(dataset="synthetic", split="dev", limit=200, seed=0, label_only=False))
        )
    )
    table = E.compare_runs((str(tmp_path / "sft"), str(tmp_path / "big")), tmp_path / "cmp3")
    assert "| big | natural | 200 |" in table and "| sft | natural | 10 |" in table
    err = capsys.readouterr().err
    assert "warning: these runs were not scored on the same examples" in err
    assert "limit: sft None, big 200" in err and "n: sft 10, big 200" in err

    # the same examples answered with another budget: the warning names the setting, not the examples
    for name, tokens in (("short", 96), ("long", 128)):
        (tmp_path / name).mkdir()
        sample = dict(dataset="synthetic", split="dev", limit=10, seed=0, label_only=False, max_new_tokens=tokens)
        (tmp_path / name / "eval.json").write_text(json.dumps(dict(runs["sft"], sample=sample)))
    E.compare_runs((str(tmp_path / "short"), str(tmp_path / "long")), tmp_path / "cmp5")
    err = capsys.readouterr().err.strip()
    assert err == (
        "warning: these runs were scored on the same examples, answered under different settings, so their rows do "
        "not compare like for like: max_new_tokens: short 96, long 128"
    )

    # the same n, but one run predates the recorded sample: say the check cannot be made, not that they differ
    (tmp_path / "same").mkdir()
    (tmp_path / "same" / "eval.json").write_text(
        json.dumps(dict(runs["sft"], sample=dict(dataset="synthetic", split="dev", limit=10, seed=0, label_only=False)))
    )
    E.compare_runs((str(tmp_path / "sft"), str(tmp_path / "same")), tmp_path / "cmp4")
    err = capsys.readouterr().err
    assert "cannot check that these runs were scored on the same examples: sft do not record" in err
    assert "were not scored on the same examples" not in err


# ==================================================================================================
# 10. Run folders
# ==================================================================================================
def test_run_metrics_and_resume(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would now raise ImportError
    args = E.Args(output_dir=str(tmp_path), run_name="r", track=False)
    run = runs.Run(args, "eval")
    assert run.wandb is None
    assert json.loads((tmp_path / "r" / "args.json").read_text())["script"] == "eval"
    run.log(dict(loss=1.5), step=1)
    run.log(dict(loss=1.25, grad_norm=0.5), step=2)
    run.log_samples([dict(text="x", reward=1.0)], step=2)
    run.finish(dict(eval=dict(accuracy=0.5)))

    def lines():
        return [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]

    assert lines() == [dict(step=1, loss=1.5), dict(step=2, loss=1.25, grad_norm=0.5)]
    assert json.loads((tmp_path / "r" / "samples.jsonl").read_text()) == dict(step=2, text="x", reward=1.0)

    resumed = runs.Run(E.Args(output_dir=str(tmp_path), run_name="r", resume=True), "eval")
    resumed.log(dict(loss=1.0), step=3)
    assert [line["step"] for line in lines()] == [1, 2, 3]
    assert (tmp_path / "r" / "curves.png").read_bytes()[:4] == b"\x89PNG"  # drawn by finish()

    # --resume: a changed argument that changes the math is refused with the list of differences; a harmless
    # one is accepted and recorded; a missing folder or another script's run is an error naming the folder
    with pytest.raises(
        errors.UserError,
        match=r"differ from the run's .*model 'smollm2-135m' -> 'tiny-random', "
        r"limit 200 -> 8",
    ):
        runs.Run(E.Args(output_dir=str(tmp_path), run_name="r", resume=True, model="tiny-random", limit=8), "eval")
    runs.Run(E.Args(output_dir=str(tmp_path), run_name="r", resume=True, wandb_project="other"), "eval")
    recorded = json.loads((tmp_path / "r" / "args.json").read_text())
    assert recorded["wandb_project"] == "other" and recorded["resumes"] == [{"wandb_project": ["agrl", "other"]}]
    with pytest.raises(errors.UserError, match=f"--resume: {tmp_path / 'typo'} does not exist"):
        runs.Run(E.Args(output_dir=str(tmp_path), run_name="typo", resume=True), "eval")
    with pytest.raises(errors.UserError, match=r"holds a run of eval\.py, not of sft\.py"):
        runs.prepare_run_dir(tmp_path / "r", E.Args(output_dir=str(tmp_path), run_name="r", resume=True), "sft")
    # a run that stopped before logging anything (a bad data file, say) left only args.json: nothing to mix with
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "args.json").write_text(json.dumps(dict(script="eval")))
    (tmp_path / "early" / "data_stats.json").write_text("{}")
    runs.Run(E.Args(output_dir=str(tmp_path), run_name="early"), "eval")
    assert sorted(p.name for p in (tmp_path / "early").iterdir()) == ["args.json"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(errors.UserError, match="not a run folder"):  # never written into, --overwrite or not
        runs.Run(E.Args(output_dir=str(tmp_path), run_name="notes", overwrite=True), "eval")
    assert (tmp_path / "notes" / "todo.txt").exists()

    with pytest.raises(errors.UserError, match="holds a previous run .*--resume.*--overwrite"):
        runs.Run(E.Args(output_dir=str(tmp_path), run_name="r"), "eval")  # a used folder is never reused silently
    with pytest.raises(errors.UserError, match="^--resume continues the run in the folder and --overwrite deletes"):
        runs.Run(E.Args(output_dir=str(tmp_path), run_name="r", resume=True, overwrite=True), "eval")
    assert (tmp_path / "r" / "metrics.jsonl").exists()  # neither won: nothing was deleted
    fresh = runs.Run(E.Args(output_dir=str(tmp_path), run_name="r", overwrite=True), "eval")
    assert not (tmp_path / "r" / "metrics.jsonl").exists() and not (tmp_path / "r" / "samples.jsonl").exists()
    fresh.log(dict(loss=2.0), step=1)
    assert lines() == [dict(step=1, loss=2.0)]


def test_flatten_and_write_json(tmp_path):
    assert runs.flatten(dict(a=1, b=dict(c=2.5, d=dict(e="x")), f=[1, 2], g=None), "eval/") == {
        "eval/a": 1,
        "eval/b/c": 2.5,
        "eval/b/d/e": "x",
        "eval/g": None,
    }
    runs.write_json(tmp_path / "x.json", dict(a=1))
    assert json.loads((tmp_path / "x.json").read_text()) == dict(a=1)
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_curves_draw_agr_and_sft_label_loss_panels_when_logged():
    agrl_line = dict(
        step=1,
        loss=0.1,
        accuracy=0.5,
        agr_stagnant_share=0.5,
        agr_guided_share=0.25,
        agr_rescued_share=1.0,
        agr_guided_success_rate=0.5,
        all_fail_groups=0.25,
        label_share_Excellent=0.5,
    )
    panels = runs.curve_panels([agrl_line])
    assert panels["AGR: stagnant / guided / rescued"] == ("agr_stagnant_share", "agr_guided_share", "agr_rescued_share")
    assert "AGR: guided answers kept" in panels and "all-fail groups" in panels
    assert "label_loss" in runs.curve_panels([dict(step=1, loss=1.0, label_loss=0.7)])["loss"]
    assert not any(title.startswith("AGR") for title in runs.curve_panels([dict(step=1, loss=1.0)]))
