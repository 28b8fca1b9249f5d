"""Tests for sft.py on `tiny-random` (CPU): learning, the run folder, exact gradient accumulation, exact
resume, and NaN handling. Runs are a few steps on a few synthetic examples; the end-of-run evaluation
is stubbed out where a test does not look at it."""

from __future__ import annotations

import copy
import json
import signal

import pytest
import torch
from safetensors.torch import load_file

import eval as E
import rewards as R
import sft
from helpers import models, runs

TIMING = ("tokens_per_second", "step_seconds")
CONTRACT = ("accuracy", "macro_f1", "per_class", "confusion", "format_rate", "adherence_rate", "n")


@pytest.fixture
def fast(monkeypatch, tiny):
    """No end-of-run evaluation, and `tiny-random` copied from the session model instead of rebuilt."""
    model, tokenizer = tiny
    load = models.load_model

    def load_model(name, device="auto", *args, **kwargs):
        if name == "tiny-random":
            return copy.deepcopy(model).train(), tokenizer
        return load(name, device, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(E, "run_eval", lambda *a, **k: E.classification_metrics([], [], R.TAOBAO4.labels))


def make_args(tmp_path, name, **overrides):
    base = dict(
        model="tiny-random",
        dataset="synthetic",
        limit=4,
        total_steps=2,
        batch_size=2,
        grad_accum=1,
        lr=1e-2,
        warmup_steps=1,
        log_every=1,
        eval_limit=4,
        output_dir=str(tmp_path),
        run_name=name,
        device="cpu",
    )
    return sft.Args(**{**base, **overrides})


def metrics_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights_of(run_dir):
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def max_diff(a, b):
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ==================================================================================================
# 1. It learns, and the run folder is complete
# ==================================================================================================
def test_sft_drives_the_loss_down_and_fills_the_run_folder(tmp_path, monkeypatch, tiny):
    run_eval = E.run_eval

    def short_eval(args, *a, **k):  # the default 128-token budget is slow on CPU and proves nothing more
        args.max_new_tokens, args.batch_size = 8, 2
        return run_eval(args, *a, **k)

    monkeypatch.setattr(E, "run_eval", short_eval)
    metrics = sft.main(
        sft.Args(
            model="tiny-random",
            dataset="synthetic",
            limit=8,
            total_steps=8,
            batch_size=2,
            grad_accum=1,
            lr=2e-2,
            warmup_steps=1,
            log_every=1,
            eval_limit=4,
            output_dir=str(tmp_path),
            run_name="s",
            device="cpu",
        )
    )
    run = tmp_path / "s"
    lines = metrics_of(run)
    assert [line["step"] for line in lines] == list(range(1, 9))
    losses = [line["loss"] for line in lines]
    assert losses[0] > 9.0  # about ln(vocabulary) for a random model
    assert losses[-1] < 0.6 * losses[0], losses

    args = json.loads((run / "args.json").read_text())
    assert args["script"] == "sft" and args["total_steps"] == 8 and args["run_name"] == "s"
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["rows_after_sampling"] == 8 and "prompts_truncated" in stats
    saved = json.loads((run / "eval.json").read_text())
    assert set(CONTRACT) <= set(saved) and saved["n"] == 4 == metrics["n"]
    assert (run / "eval_samples.jsonl").exists() and (run / "confusion.png").exists()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "checkpoint")
    trained = load_file(str(run / "checkpoints" / "step-0000008" / "model.safetensors"))
    assert max_diff({k: v for k, v in model.state_dict().items() if k in trained}, trained) == 0.0
    assert max_diff(tiny[0].state_dict(), model.state_dict()) > 1e-3  # the weights did move


# ==================================================================================================
# 2. Gradient accumulation is exact
# ==================================================================================================
def test_gradient_accumulation_is_exact(tmp_path, monkeypatch, fast, tiny):
    # Adam's first step is ~lr * sign(gradient) and would hide a wrongly scaled gradient: plain SGD
    # moves every weight by exactly lr * gradient, so equal weights mean equal gradients.
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    runs = {}
    for batch_size, grad_accum in ((4, 1), (2, 2), (1, 4)):
        name = f"b{batch_size}x{grad_accum}"
        sft.main(
            make_args(
                tmp_path, name, total_steps=1, batch_size=batch_size, grad_accum=grad_accum, lr=1.0, max_grad_norm=1e9
            )
        )
        runs[name] = (weights_of(tmp_path / name), metrics_of(tmp_path / name)[0])
    (reference, ref_metrics), *others = runs.values()
    initial = {k: v for k, v in tiny[0].state_dict().items() if k in reference}
    assert max_diff(reference, initial) > 1e-3  # the step did change the weights
    for weights, metrics in others:
        assert max_diff(weights, reference) < 1e-6
        assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-6)
        assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-5)


# ==================================================================================================
# 3. Resume is exact
# ==================================================================================================
class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny):
    """A 4-step run, and the same run killed after logging step 3 (last checkpoint: step 2), resumed."""
    tmp_path = tmp_path_factory.mktemp("resume")
    model, tokenizer = tiny
    kw = dict(total_steps=4, save_every=2, batch_size=1, limit=4)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.MonkeyPatch.context() as mp:
        load = models.load_model
        mp.setattr(
            models,
            "load_model",
            lambda name, device="auto", **kw: (
                (copy.deepcopy(model).train(), tokenizer) if name == "tiny-random" else load(name, device, **kw)
            ),
        )
        mp.setattr(E, "run_eval", lambda *a, **k: E.classification_metrics([], [], R.TAOBAO4.labels))
        try:
            sft.main(make_args(tmp_path, "straight", **kw))

            log = runs.Run.log

            def crashing_log(self, metrics, step):
                log(self, metrics, step)
                if step == 3:
                    raise Crash

            mp.setattr(runs.Run, "log", crashing_log)
            with pytest.raises(Crash):
                sft.main(make_args(tmp_path, "killed", **kw))
            mp.setattr(runs.Run, "log", log)
            assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step-0000002"]
            sft.main(make_args(tmp_path, "killed", resume=True, **kw))
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
    return tmp_path / "straight", tmp_path / "killed"


def test_resume_is_exact(resumed):
    straight, killed = resumed
    assert max_diff(weights_of(straight), weights_of(killed)) < 1e-6
    by_step = {}
    for line in metrics_of(killed):  # the lines of the resumed run come last
        by_step[line["step"]] = line
    for line in metrics_of(straight):
        other = by_step[line["step"]]
        assert set(line) == set(other)
        for key in set(line) - set(TIMING):
            assert other[key] == pytest.approx(line[key], rel=1e-6, abs=1e-9), (line["step"], key)
    state = torch.load(killed / "checkpoints" / "step-0000004" / "train_state.pt", weights_only=True)
    assert state["step"] == 4


def test_resume_does_not_duplicate_metric_lines(resumed):
    _, killed = resumed
    steps = [line["step"] for line in metrics_of(killed)]
    assert steps == [1, 2, 3, 4]


# ==================================================================================================
# 4. NaN handling
# ==================================================================================================
def nan_on_calls(monkeypatch, bad_calls):
    """token_logprobs returns NaN log-probs on the given (1-based) calls: that micro-batch's loss is NaN."""
    original, calls = models.token_logprobs, []

    def token_logprobs(model, batch, *args, **kwargs):
        calls.append(1)
        logp, entropy = original(model, batch, *args, **kwargs)
        return (logp * float("nan") if len(calls) in bad_calls else logp), entropy

    monkeypatch.setattr(sft.models, "token_logprobs", token_logprobs)
    return calls


def test_nan_steps_are_skipped_and_logged(tmp_path, monkeypatch, fast):
    # two micro-batches a step: NaN in the 2nd micro-batch of step 2 and the 1st of step 4
    calls = nan_on_calls(monkeypatch, {4, 7})
    sft.main(make_args(tmp_path, "nan", total_steps=5, batch_size=1, grad_accum=2, max_nan_skips=2))
    assert len(calls) == 10
    lines = {line["step"]: line for line in metrics_of(tmp_path / "nan")}
    assert sorted(lines) == [1, 2, 3, 4, 5]
    for step in (2, 4):
        assert lines[step] == dict(step=step, nan_skipped=1, nan_skips_consecutive=1)
    for step in (1, 3, 5):
        assert "nan_skipped" not in lines[step] and torch.isfinite(torch.tensor(lines[step]["loss"]))
    # the skipped steps did not move the optimizer, and their NaN gradients were not carried over
    state = torch.load(tmp_path / "nan" / "checkpoints" / "step-0000005" / "train_state.pt", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {3}
    assert all(torch.isfinite(w).all() for w in weights_of(tmp_path / "nan").values())


def test_consecutive_nans_stop_the_run(tmp_path, monkeypatch, fast):
    nan_on_calls(monkeypatch, set(range(1, 100)))
    with pytest.raises(
        RuntimeError, match="3 consecutive steps with a non-finite loss or gradient: stopping at step 3"
    ):
        sft.main(make_args(tmp_path, "nans", total_steps=10, batch_size=1, max_nan_skips=3))
    assert [line["nan_skips_consecutive"] for line in metrics_of(tmp_path / "nans")] == [1, 2, 3]
    assert not (tmp_path / "nans" / "checkpoint").exists()


def test_nan_on_the_last_step_still_writes_the_final_checkpoint(tmp_path, monkeypatch, fast):
    nan_on_calls(monkeypatch, {2})
    sft.main(make_args(tmp_path, "lastnan", total_steps=2, batch_size=1))
    assert (tmp_path / "lastnan" / "checkpoint" / "model.safetensors").exists()


# ==================================================================================================
# 5. The label's weight in the loss, and class-balanced sampling
# ==================================================================================================
@pytest.mark.parametrize("order", ["label_first", "think_first"])
def test_label_token_mask_marks_exactly_the_label(tokenizer, order):
    import data as D

    dataset = D.load_dataset("synthetic", "train", limit=12)
    for example in dataset.examples:
        ids, labels, _ = D.encode_sft(tokenizer, example, dataset.rulebook, order)
        completion = ids[labels.count(-100) :]
        mask = sft.label_token_mask(tokenizer, example, dataset.rulebook, order)
        assert len(mask) == len(completion)
        assert tokenizer.decode([t for t, m in zip(completion, mask) if m]) == example.label
        # the tokens just around it are the tags
        first, last = mask.index(True), len(mask) - 1 - mask[::-1].index(True)
        assert tokenizer.decode(completion[:first]).endswith("<label>")
        assert tokenizer.decode(completion[last + 1 :]).startswith("</label>")


def completion_nll(model, tokenizer, order, limit):
    """Per-token NLL of every training completion, from a plain forward over prompt + completion, and which
    tokens spell the label (found by decoding growing prefixes, not by sft.py's offsets)."""
    import data as D

    dataset = D.load_dataset("synthetic", "train", seed=1, limit=limit)
    nll, is_label = [], []
    for example in dataset.examples:
        ids, labels, _ = D.encode_sft(tokenizer, example, dataset.rulebook, order)
        start = labels.count(-100)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, start - 1 : -1].float()
        nll.append(-torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[start:])[:, None]).squeeze(-1))
        completion = ids[start:]
        target = tokenizer.decode(completion)
        span_start = target.index(f"<label>{example.label}</label>") + len("<label>")
        span_end = span_start + len(example.label)
        ends = [len(tokenizer.decode(completion[: j + 1])) for j in range(len(completion))]
        is_label.append(torch.tensor([(b > span_start and a < span_end) for a, b in zip([0] + ends[:-1], ends)]))
    return torch.cat(nll), torch.cat(is_label)


@pytest.mark.parametrize("order", ["label_first", "think_first"])
def test_label_weight_weighs_the_label_tokens_only(tmp_path, fast, tiny, order):
    # one step over the whole (4-example) data set: the logged loss is the untrained model's on it
    nll, is_label = completion_nll(tiny[0], tiny[1], order, limit=4)
    assert 4 <= is_label.sum() <= 4 * 3  # one to three tokens per label
    logged = {}
    for weight in (1.0, 5.0):
        name = f"w{weight:g}-{order}"
        sft.main(make_args(tmp_path, name, total_steps=1, batch_size=4, order=order, label_weight=weight))
        logged[weight] = metrics_of(tmp_path / name)[0]
    assert logged[1.0]["loss"] == pytest.approx(nll.mean().item(), rel=1e-4)  # weight 1: the plain mean
    weighted = (nll.sum() + 4 * nll[is_label].sum()) / (len(nll) + 4 * is_label.sum())
    assert logged[5.0]["loss"] == pytest.approx(weighted.item(), rel=1e-4)
    assert abs(logged[5.0]["loss"] - logged[1.0]["loss"]) > 1e-3
    for weight in (1.0, 5.0):  # the plain label NLL is logged beside it, whatever the weight
        assert logged[weight]["label_loss"] == pytest.approx(nll[is_label].mean().item(), rel=1e-4)


def test_balanced_epoch_draws_every_label_equally():
    gold = ["A"] * 10 + ["B"] * 3 + ["C"] * 1
    plain = sft.epoch_order(gold, seed=1, epoch=0, balanced=False)
    assert sorted(plain) == list(range(14))
    for epoch in range(3):
        order = sft.epoch_order(gold, seed=1, epoch=epoch, balanced=True)
        counts = {label: sum(gold[i] == label for i in order) for label in "ABC"}
        assert counts == dict(A=10, B=10, C=10)
        assert sorted(i for i in order if gold[i] == "A") == list(range(10))  # the largest class: each once
        assert set(i for i in order if gold[i] == "B") == {10, 11, 12}
    assert sft.epoch_order(gold, 1, 0, True) != sft.epoch_order(gold, 1, 1, True)


def test_balanced_training_sees_every_label_equally_often(tmp_path, monkeypatch, fast):
    import re

    import data as D

    seen, pad_batch, tokenizer = [], models.pad_batch, models.embedded_tokenizer()

    def spy(prompts, completions, *args, **kwargs):  # the gold label of every sequence trained on
        seen.extend(re.search(r"<label>(\w+)</label>", tokenizer.decode(c)).group(1) for c in completions)
        return pad_batch(prompts, completions, *args, **kwargs)

    monkeypatch.setattr(models, "pad_batch", spy)
    gold = [e.label for e in D.load_dataset("synthetic", "train", seed=1, limit=16).examples]
    largest = max(gold.count(label) for label in set(gold))
    assert largest > min(gold.count(label) for label in set(gold))  # the sample is skewed
    steps = len(set(gold)) * largest // 2  # one balanced epoch, two sequences a step
    sft.main(make_args(tmp_path, "balanced", limit=16, total_steps=steps, batch_size=2, balanced=True, save_every=1000))
    assert {label: seen.count(label) for label in set(seen)} == {label: largest for label in set(gold)}
