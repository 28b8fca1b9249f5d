"""Tests for rollouts.generate's fast decoder and sampler (issue 13): the grouped, preallocated KV decode step
against the HF forward, the counter-based sampler's randomness and distribution, and the guarantees the
RL scripts rely on (seeded samples independent of batching and prefix sharing, exact behaviour log-probs).

Models: `lively` (tiny-random's architecture with larger random weights, so next-token distributions
are peaked and varied) and `stopper`, the same model whose LM head gives the stop token a bias, so that
completions end at different lengths and rows drop out of the decode at different steps. Both are plain
LlamaForCausalLM, so `generate` takes the fast path; `fast_decode=False` is the HF-forward reference.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers import cpu_decode, models, rollouts


def with_stop_bias(model, stop_id: int, bias: float):
    """A copy whose LM head adds `bias` to the stop token's logit (a Linear with a bias: still a LlamaForCausalLM)."""
    model = copy.deepcopy(model)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[stop_id] = bias
    model.lm_head = head
    return model


@pytest.fixture(scope="module")
def stopper(lively, tokenizer):
    return with_stop_bias(lively, tokenizer.eos_token_id, 13.0)  # about one in six steps stops


@pytest.fixture(scope="module")
def prompts():
    """Four prompts sharing a 6-token system prefix, of different lengths (left padding after the prefix)."""
    gen = torch.Generator().manual_seed(1)
    system = torch.randint(100, 40000, (6,), generator=gen).tolist()
    return [system + torch.randint(100, 40000, (k,), generator=gen).tolist() for k in (3, 11, 7, 1)]


def assert_same(a: rollouts.Rollouts, b: rollouts.Rollouts, atol: float = 1e-4):
    assert a.completion_ids == b.completion_ids
    assert a.truncated == b.truncated and a.texts == b.texts and a.prompt_ids == b.prompt_ids
    for x, y in zip(a.logprobs, b.logprobs):
        assert len(x) == len(y) and torch.allclose(torch.tensor(x), torch.tensor(y), atol=atol, rtol=0)


def qwen_model(tokenizer, kind: str):
    """A tiny random Qwen2 (q/k/v biases) or Qwen3 (per-head query/key norms) with large weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(3)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.5 if "embed" in name else 0.3)
    return model.eval()


# ==================================================================================================
# The decode step against the HF forward
# ==================================================================================================
@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_fast_decode_equals_hf_forward(stopper, tokenizer, prompts, temperature, top_p):
    kw = dict(n=3, max_new_tokens=7, temperature=temperature, top_p=top_p, seeds=[5, 6, 7, 8])
    fast = rollouts.generate(stopper, tokenizer, prompts, **kw)
    reference = rollouts.generate(stopper, tokenizer, prompts, fast_decode=False, **kw)
    assert_same(fast, reference)
    if temperature > 0:  # rows stopped at different steps: the running-rows LM head was exercised
        assert len({len(c) for c in fast.completion_ids}) > 2 and any(fast.truncated) and not all(fast.truncated)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_fast_decode_other_architectures(tokenizer, prompts, kind):
    model = qwen_model(tokenizer, kind)
    assert cpu_decode.fast_decoder_supports(model, 100)
    kw = dict(n=2, max_new_tokens=6, temperature=1.0, seeds=[1, 2, 3, 4])
    assert_same(
        rollouts.generate(model, tokenizer, prompts, **kw),
        rollouts.generate(model, tokenizer, prompts, fast_decode=False, **kw),
    )


def test_fast_decoder_declines_what_it_cannot_run(lively, tokenizer):
    assert cpu_decode.fast_decoder_supports(lively, 100)
    assert not cpu_decode.fast_decoder_supports(
        torch.nn.Sequential(lively), 100
    )  # a wrapper: decodes through model(...)
    windowed = copy.deepcopy(lively)
    windowed.config.sliding_window = 50
    assert cpu_decode.fast_decoder_supports(windowed, 50) and not cpu_decode.fast_decoder_supports(windowed, 51)


def test_greedy_equals_hf_generate_in_a_batch(lively, tokenizer, prompts):
    """Batched, shared prefix, left padding and n copies: each row equals HF generate on its prompt alone."""
    k = 9
    ours = rollouts.generate(lively, tokenizer, prompts, n=2, max_new_tokens=k, min_new_tokens=k)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        hf = lively.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=k,
            min_new_tokens=k,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert ours.completion_ids[2 * i] == ours.completion_ids[2 * i + 1] == hf[0, len(prompt) :].tolist(), i


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_equal_a_training_forward(stopper, tokenizer, prompts, temperature):
    out = rollouts.generate(
        stopper, tokenizer, prompts, n=3, max_new_tokens=8, temperature=temperature, seeds=[3, 4, 5, 6]
    )
    assert len({len(c) for c in out.completion_ids}) > 2
    batch = models.pad_batch(out.prompt_ids, out.completion_ids, tokenizer.pad_token_id, "cpu", share_prefix=True)
    with torch.no_grad():
        logp, _ = models.token_logprobs(stopper, batch, temperature)
    for row, behaviour in enumerate(out.logprobs):
        assert torch.allclose(logp[row, : len(behaviour)], torch.tensor(behaviour), atol=1e-4, rtol=0), row


def test_seeded_samples_independent_of_batching_and_prefix_sharing(stopper, tokenizer, prompts):
    kw = dict(n=3, max_new_tokens=7, temperature=1.0, top_p=0.95)
    seeds = [21, 22, 23, 24]
    together = rollouts.generate(stopper, tokenizer, prompts, seeds=seeds, batch_size=4, **kw)
    for batch_size in (1, 3):
        assert_same(rollouts.generate(stopper, tokenizer, prompts, seeds=seeds, batch_size=batch_size, **kw), together)
    assert_same(rollouts.generate(stopper, tokenizer, prompts, seeds=seeds, shared_prefill=False, **kw), together)
    alone = rollouts.generate(
        stopper, tokenizer, prompts[1:2], seeds=[22], **kw
    )  # as another rank or a resumed run would
    assert_same(
        alone,
        rollouts.Rollouts(
            *(
                field[3:6]
                for field in (
                    together.prompt_ids,
                    together.completion_ids,
                    together.logprobs,
                    together.texts,
                    together.truncated,
                )
            )
        ),
    )
    assert len({tuple(c) for c in together.completion_ids[3:6]}) > 1  # a group's samples differ
    assert rollouts.generate(stopper, tokenizer, prompts[1:2], seeds=[99], **kw).completion_ids != alone.completion_ids


def test_lm_head_runs_only_on_rows_still_going(stopper, tokenizer, prompts, monkeypatch):
    decode_rows = []  # the decode step's LM head goes through decode_linear (the prefill's through the module)
    decode_linear = cpu_decode.decode_linear

    def counting_decode_linear(x, linear):
        if linear is stopper.lm_head:
            decode_rows.append(x.shape[0])
        return decode_linear(x, linear)

    monkeypatch.setattr(cpu_decode, "decode_linear", counting_decode_linear)
    out = rollouts.generate(stopper, tokenizer, prompts, n=3, max_new_tokens=8, temperature=1.0, seeds=[3, 4, 5, 6])
    lengths = [len(c) for c in out.completion_ids]
    # one call per decode step, on the rows whose completion is longer than the step
    assert decode_rows == [sum(length > t for length in lengths) for t in range(1, len(decode_rows) + 1)]
    assert decode_rows[-1] < 12


# ==================================================================================================
# The CPU decode kernels (helpers/cpu_decode.cpp)
# ==================================================================================================
NO_COMPILER = "no C++ compiler ($CXX, else c++, on PATH): the CPU decode kernels cannot be built here (decoding falls back to torch)"


def built_kernels():
    """The compiled ops; skipped, with the reason, where there is no compiler to build them. Where there is
    one, a failed build is a failure."""
    if cpu_decode.cxx_compiler() is None:
        pytest.skip(NO_COMPILER)
    ops = cpu_decode.cpu_decode_ops()
    assert ops is not None, "a C++ compiler is there, but the CPU decode kernels did not build (see the warning above)"
    return ops


@pytest.fixture(scope="module")
def ops():
    return built_kernels()


def test_the_kernel_cache_is_keyed_by_source_content_and_toolchain(tmp_path):
    """Two clones (two paths, the same source) share one build; an edited source or another compiler gets
    its own name, so no checkout rebuilds over another's."""
    compiler = cpu_decode.cxx_compiler()
    if compiler is None:
        pytest.skip(NO_COMPILER)
    source = cpu_decode.Path(cpu_decode.__file__).with_name("cpu_decode.cpp")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for clone in ("a", "b"):
        (tmp_path / clone / "cpu_decode.cpp").write_bytes(source.read_bytes())
    name = cpu_decode.build_name(source, compiler)
    assert cpu_decode.build_name(tmp_path / "a" / "cpu_decode.cpp", compiler) == name
    assert cpu_decode.build_name(tmp_path / "b" / "cpu_decode.cpp", compiler) == name
    (tmp_path / "b" / "cpu_decode.cpp").write_bytes(source.read_bytes() + b"\n// edited\n")
    assert cpu_decode.build_name(tmp_path / "b" / "cpu_decode.cpp", compiler) != name
    fake = tmp_path / "other-c++"
    fake.write_text("#!/bin/sh\necho 'other compiler 1.0'\n")
    fake.chmod(0o755)
    assert cpu_decode.build_name(source, str(fake)) != name
    assert name.startswith(f"agrl_cpu_decode_{cpu_decode.torch.backends.cpu.get_cpu_capability().lower()}_")


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 33, 70])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_linear_equals_f_linear(ops, rows, with_bias):
    """Every row count (one or two vectors of 16 rows a pass, several passes), an output width that is not a
    multiple of the 8-row weight block, with and without bias; `x` a non-contiguous view."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(100, rows, generator=gen).t()  # [rows, 100], not contiguous
    weight, bias = torch.randn(45, 100, generator=gen), torch.randn(45, generator=gen) if with_bias else None
    assert torch.allclose(
        ops.skinny_linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias), atol=1e-4, rtol=1e-5
    )


def test_skinny_linear_rows_do_not_depend_on_the_batch(ops):
    """Each row's sum runs over the same order whatever rows surround it: bitwise equal alone and in any batch."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(40, 576, generator=gen), torch.randn(200, 576, generator=gen)
    everything = ops.skinny_linear(x, weight, None)
    for part in (slice(0, 1), slice(3, 9), slice(5, 21), slice(7, 40)):
        assert torch.equal(ops.skinny_linear(x[part], weight, None), everything[part])


@pytest.mark.parametrize("group,t", [(5, 0), (5, 4), (7, 3), (1, 5)])
def test_grouped_attention_equals_the_torch_step(ops, monkeypatch, group, t):
    """The compiled attention against cpu_decode._attend's torch arithmetic: 2 prompts, the second left-padded
    (-inf bias), 2 KV heads of 3 query heads each; a group's 15 or 21 query heads fill one or two vectors
    of lanes, and each row attends to its own t + 1 generated tokens."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(group * 10 + t)
    prompts, kv_heads, rep, length, dim, new = 2, 2, 3, 37, 32, 6
    rows = prompts * group
    bias = torch.zeros(prompts, 1, 1, length)
    bias[1, ..., :9] = -float("inf")
    kv = SimpleNamespace(
        group=group,
        prompt_bias=bias,
        prompt_k=[torch.randn(prompts, kv_heads, length, dim, generator=gen)],
        prompt_v=[torch.randn(prompts, kv_heads, length, dim, generator=gen)],
        gen_k=[torch.randn(rows, kv_heads, new, dim, generator=gen)],
        gen_v=[torch.randn(rows, kv_heads, new, dim, generator=gen)],
    )
    q = torch.randn(rows, kv_heads * rep, dim, generator=gen)
    with torch.no_grad():
        compiled = cpu_decode._attend(q, kv, 0, t, 0.3)
        monkeypatch.setattr(cpu_decode, "ops_for", lambda x: None)
        reference = cpu_decode._attend(q, kv, 0, t, 0.3)
    assert compiled.shape == (rows, kv_heads * rep * dim)
    assert torch.allclose(compiled, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_decode_layer_equals_the_torch_layer(ops, lively, tokenizer, prompts, kind, monkeypatch):
    """cpu_decode.cpp's decode_layer (one call a layer) against decode_step's torch lines: the hidden state and the new
    token's keys and values written into the cache; Qwen2's q/k/v biases and Qwen3's per-head norms included."""
    model = lively if kind == "llama" else qwen_model(tokenizer, kind)
    rows, n = 2 * len(prompts), 2
    with torch.no_grad():
        _, cache, mask, positions = rollouts.prefill(model, prompts, tokenizer.pad_token_id, "cpu")
        kv = cpu_decode.GroupedKV(cache, mask, n, rows, 4)
        tokens, position = torch.randint(100, 40000, (rows,)), positions[:, -1].repeat_interleave(n) + 1
        cpu_decode.decode_step(model, tokens, position, kv, 0)
        compiled = cpu_decode.decode_step(model, tokens, position, kv, 1)
        compiled_kv = [x[:, :, :2].clone() for x in kv.gen_k + kv.gen_v]
        assert all(layer is not None for layer in kv.compiled_layers)  # the compiled path ran
        monkeypatch.setattr(cpu_decode, "_compiled_layer_weights", lambda model, layer: None)
        kv.compiled_layers = None
        cpu_decode.decode_step(model, tokens, position, kv, 0)
        reference = cpu_decode.decode_step(model, tokens, position, kv, 1)
    assert torch.allclose(compiled, reference, atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled_kv, [x[:, :, :2] for x in kv.gen_k + kv.gen_v]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_decode_layer_declines_what_it_does_not_compute(lively):
    assert cpu_decode._compiled_layer_weights(lively, lively.model.layers[0]) is not None
    gelu = copy.deepcopy(lively)
    gelu.config.hidden_act = "gelu"
    wrapped = copy.deepcopy(lively)
    wrapped.model.layers[0].mlp.up_proj = torch.nn.Sequential(wrapped.model.layers[0].mlp.up_proj)  # as LoRA wraps it
    half = copy.deepcopy(lively).to(torch.bfloat16)
    for model in (gelu, wrapped, half):
        assert cpu_decode._compiled_layer_weights(model, model.model.layers[0]) is None


def test_cpu_kernels_used_only_where_they_apply(ops, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_decode, "cpu_decode_ops", lambda: SimpleOps(ops, calls))
    linear, x = torch.nn.Linear(8, 3), torch.randn(4, 8)
    with torch.no_grad():
        expected = linear(x)
        assert torch.allclose(cpu_decode.decode_linear(x, linear), expected, atol=1e-6) and len(calls) == 1
        cpu_decode.decode_linear(x.double(), linear.double())  # not float32
        cpu_decode.decode_linear(
            torch.randn(cpu_decode.SKINNY_MAX_ROWS + 1, 8), linear.float()
        )  # more rows than it pays for
        cpu_decode.decode_linear(x, torch.nn.Sequential(linear))  # not a plain nn.Linear (a LoRA wrapper, say)
    cpu_decode.decode_linear(x, linear)  # grad mode: the kernel has no backward
    assert len(calls) == 1


class SimpleOps:
    """ops whose skinny_linear records its calls."""

    def __init__(self, ops, calls):
        self.ops, self.calls = ops, calls

    def skinny_linear(self, *args):
        self.calls.append(args)
        return self.ops.skinny_linear(*args)


def test_kernels_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("AGRL_CPU_KERNEL", "0")
    cpu_decode.cpu_decode_ops.cache_clear()
    try:
        assert cpu_decode.cpu_decode_ops() is None
        linear, x = torch.nn.Linear(8, 3), torch.randn(4, 8)
        with torch.no_grad():
            assert torch.equal(cpu_decode.decode_linear(x, linear), linear(x))
    finally:
        cpu_decode.cpu_decode_ops.cache_clear()


def test_without_a_compiler_generation_falls_back_to_torch(stopper, tokenizer, prompts, monkeypatch, capsys):
    """No C++ compiler: the kernels are not built (one warning naming why), and the fast decode runs its torch
    lines: the same completions as the HF forward, as with the kernels."""
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    cpu_decode.cpu_decode_ops.cache_clear()
    try:
        assert cpu_decode.cxx_compiler() is None and cpu_decode.cpu_decode_ops() is None
        assert "no C++ compiler (no-such-c++-compiler is not on PATH)" in capsys.readouterr().err
        kw = dict(n=3, max_new_tokens=7, temperature=1.0, seeds=[5, 6, 7, 8])
        assert_same(
            rollouts.generate(stopper, tokenizer, prompts, **kw),
            rollouts.generate(stopper, tokenizer, prompts, fast_decode=False, **kw),
        )
    finally:
        cpu_decode.cpu_decode_ops.cache_clear()


# ==================================================================================================
# The sampler
# ==================================================================================================
def lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_sampling_noise_is_exact_integer_arithmetic():
    """Keys and noise bits equal a plain-Python evaluation of the hash: integer ops only, so every device
    agrees; the Gumbel transform of 24-bit uniforms is then one float32 formula."""
    seeds = [0, 1, 2**31 - 1, 123_456_789_012, 7 * 1_000_003 + 5]
    samples = [0, 3, 1, 7, 2]
    keys = rollouts.sampling_keys(torch.tensor(seeds), torch.tensor(samples), 5)
    vocab_hash = rollouts._mix32(torch.arange(50))
    for r, (seed, j) in enumerate(zip(seeds, samples)):
        key = lowbias32((lowbias32(seed & 0xFFFFFFFF) + 0x9E3779B9 * ((seed >> 32) + 1)) & 0xFFFFFFFF)
        key = lowbias32((key + j) & 0xFFFFFFFF)
        expected = [lowbias32((key * 0x2545F491 + t) & 0xFFFFFFFF) for t in range(5)]
        assert keys[r].tolist() == expected
    noise = rollouts.gumbel_noise(keys[:, 2], vocab_hash)
    for r in range(len(seeds)):
        bits = [lowbias32(int(keys[r, 2]) ^ lowbias32(i)) for i in range(50)]
        u = torch.tensor([((b >> 9) + 0.5) / 2**23 for b in bits], dtype=torch.float32)  # exact in float32
        assert torch.equal(noise[r], -torch.log(-torch.log(u)))


def test_sampling_noise_looks_gumbel_and_independent():
    rows = 512
    keys = rollouts.sampling_keys(torch.arange(rows) // 8, torch.arange(rows) % 8, 4)
    noise = rollouts.gumbel_noise(keys[:, 1], rollouts._mix32(torch.arange(1000)))
    u = torch.exp(-torch.exp(-noise.double()))  # back to uniforms
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    expected = u.numel() / 20
    assert ((counts - expected) ** 2 / expected).sum() < 60  # chi-square, 19 dof: p < 1e-5 beyond 50
    # neighbouring rows (samples of a group, and groups), tokens and steps are uncorrelated
    other_step = torch.exp(-torch.exp(-rollouts.gumbel_noise(keys[:, 2], rollouts._mix32(torch.arange(1000))).double()))
    for a, b in ((u[:-1], u[1:]), (u[:, :-1], u[:, 1:]), (u[::8], u[1::8]), (u, other_step)):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.01


@pytest.mark.parametrize(
    "temperature,top_p,compiled",
    [(1.0, 1.0, False), (0.5, 1.0, False), (1.0, 0.7, False), (1.0, 1.0, True), (0.5, 1.0, True)],
)
def test_sample_draws_from_the_tempered_nucleus(temperature, top_p, compiled, monkeypatch):
    """Token frequencies over many rows match softmax(logits / T), cut to the top-p nucleus and renormalised:
    the torch sampler, and the compiled one where it applies (CPU, fp32, top-p 1)."""
    if compiled:
        built_kernels()
    else:
        monkeypatch.setattr(cpu_decode, "ops_for", lambda x: None)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 20_000
    keys = rollouts.sampling_keys(torch.arange(rows), torch.zeros(rows, dtype=torch.long), 1)[:, 0]
    with torch.no_grad():
        token, logp = rollouts._sample(
            logits.expand(rows, -1).clone(), temperature, top_p, keys, rollouts._mix32(torch.arange(len(logits)))
        )
    probs = torch.softmax(logits / temperature, -1)
    assert torch.allclose(logp, probs.log()[token])  # the behaviour log-prob: the full tempered distribution
    inside = probs.cumsum(-1) - probs < top_p
    target = torch.where(inside, probs, 0.0)
    target /= target.sum()
    freq = torch.bincount(token, minlength=len(logits)).double() / rows
    assert (freq[~inside] == 0).all()
    assert torch.allclose(freq, target.double(), atol=4 * math.sqrt(0.25 / rows))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_compiled_sampler_equals_the_torch_sampler(ops, temperature, monkeypatch):
    """gumbel_sample against _sample's torch lines on 3000 rows: the same tokens, log-probs within rounding;
    a vocabulary that is not a multiple of the 16-lane vector, and tokens masked to -inf (min_new_tokens)."""
    rows, vocab = 3000, 1003
    gen = torch.Generator().manual_seed(int(temperature * 10))
    logits = torch.randn(rows, vocab, generator=gen) * 3
    logits[:, [0, 17, 1002]] = -float("inf")
    keys = rollouts.sampling_keys(torch.arange(rows) // 8, torch.arange(rows) % 8, 3)[:, 2]
    vocab_hash = rollouts._mix32(torch.arange(vocab))
    with torch.no_grad():
        token, logp = rollouts._sample(logits, temperature, 1.0, keys, vocab_hash)
        monkeypatch.setattr(cpu_decode, "ops_for", lambda x: None)
        expected_token, expected_logp = rollouts._sample(logits, temperature, 1.0, keys, vocab_hash)
    assert torch.equal(token, expected_token)
    assert torch.allclose(logp, expected_logp, atol=1e-5, rtol=0)
    assert len(token.unique()) > 500  # the noise spreads the picks: not one argmax for all rows


def test_greedy_sample_and_its_logprob():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    token, logp = rollouts._sample(logits, 0.0, 1.0, None, None)
    assert token.tolist() == [1, 0]
    assert torch.allclose(logp, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])
