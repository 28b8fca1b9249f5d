"""The vLLM backend against a recording fake engine (the real engine on a CPU: tests/test_vllm_cpu.py, make test-vllm).

What is checked: the engine is built the colocated way (one per rank, `external_launcher`, the resolved
model id, context from the budgets, processed log-probs, sleep mode); weights are pushed parameter by
parameter under the Hugging Face names and shapes, then the prefix cache is reset; completions and
their log-probs come back in the `generate` contract; grpo.py/agrl.py route every rollout, AGR's guided
samples included, through the engine and sync it once per step; without vLLM, one line and exit 2.
What is not: vLLM's own numerics, memory, speed (benchmarks/gpu_check.sh, on a GPU).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from test_distributed import RUN, fake_score_group, no_eval  # noqa: E402
from test_grpo import read_metrics  # noqa: E402

import agrl  # noqa: E402
import grpo  # noqa: E402
from helpers import errors, models, rollouts  # noqa: E402


class FakeLLM:
    """Records what the trainer asks of a vLLM engine; generates token ids from the prompt alone."""

    def __init__(self, **kwargs):
        self.kwargs, self.log, self.requests = kwargs, [], []

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"], (method, kwargs)
        for name, tensor in kwargs["weights_iterator"]:
            self.log.append(("load", name, tuple(tensor.shape), tensor.dtype, tensor.clone()))
        return [None]

    def reset_prefix_cache(self):
        self.log.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.log.append(("sleep", level))

    def wake_up(self, tags=None):
        self.log.append(("wake_up", tuple(tags) if tags else ("weights", "kv_cache")))

    def generate(self, prompts, params, use_tqdm=True):
        self.requests.append((prompts, params))
        results = []
        for prompt, p in zip(prompts, params):
            ids = prompt["prompt_token_ids"]
            outputs = []
            for j in range(p.kwargs["n"]):
                length = 1 + (sum(ids) + j) % p.kwargs["max_tokens"]
                tokens = [100 + (sum(ids) * 7 + j * 13 + t) % 500 for t in range(length)]
                logprobs = [{tok: types.SimpleNamespace(logprob=-0.1 * (t + 1))} for t, tok in enumerate(tokens)]
                outputs.append(
                    types.SimpleNamespace(
                        token_ids=tokens,
                        logprobs=logprobs,
                        finish_reason="length" if length == p.kwargs["max_tokens"] else "stop",
                    )
                )
            results.append(types.SimpleNamespace(outputs=outputs))
        return results


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_without_vllm_the_backend_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(errors.UserError) as stop:
        rollouts.make_vllm_engine("Qwen2.5-0.5B-Instruct", max_model_len=1024)
    assert "\n" not in str(stop.value) and str(stop.value).startswith("--vllm needs vLLM")


def test_vllm_is_imported_lazily(tmp_path):
    """Every script imports with `import vllm` made to fail: vLLM is only needed once --vllm asks for it."""
    import subprocess

    code = "import sys; sys.modules['vllm'] = None; import eval, grpo, agrl, sft, dpo"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_engine_is_colocated_per_rank_with_resolved_id_budgets_and_processed_logprobs(fake_vllm):
    with mock.patch.dict("os.environ", {"LOCAL_RANK": "3"}):
        engine = rollouts.make_vllm_engine(
            "Qwen2.5-0.5B-Instruct",
            max_model_len=1500,
            gpu_memory_utilization=0.25,
            seed=7,
            sleep_mode=True,
            device="cuda",
        )
    kw = engine.kwargs
    assert kw["model"] == "Qwen/Qwen2.5-0.5B-Instruct" and kw["distributed_executor_backend"] == "external_launcher"
    assert kw["tensor_parallel_size"] == 1 and kw["max_model_len"] == 1500 and kw["gpu_memory_utilization"] == 0.25
    assert kw["seed"] == 7 and kw["enable_sleep_mode"] and kw["logprobs_mode"] == "processed_logprobs"
    assert kw["enable_prefix_caching"] and kw["load_format"] == "auto"


def test_on_a_cpu_the_engine_is_one_fp32_eager_process_in_this_process(fake_vllm, monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    engine = rollouts.make_vllm_engine("Qwen2.5-0.5B-Instruct", max_model_len=512, device="cpu")
    kw = engine.kwargs
    assert "distributed_executor_backend" not in kw and kw["dtype"] == "float32" and kw["enforce_eager"]
    assert engine.agrl_dtype == torch.float32 and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_sync_pushes_every_hf_tensor_by_name_and_shape_then_resets_the_prefix_cache(tiny_model):
    engine = FakeLLM()
    engine.agrl_asleep = True
    pushed = rollouts.sync_vllm_weights(engine, tiny_model)
    hf = tiny_model.state_dict()
    loads = [entry for entry in engine.log if entry[0] == "load"]
    assert [(name, shape) for _, name, shape, *_ in loads] == [(n, tuple(t.shape)) for n, t in hf.items()]
    assert pushed == len(hf) and all(dtype == torch.bfloat16 for *_, dtype, _ in loads)
    for _, name, _, _, tensor in loads:
        assert torch.equal(tensor, hf[name].bfloat16()), name
    # woken in two stages: the weights, the push, then the KV cache (never beside the old weights' leftovers)
    assert engine.log[0] == ("wake_up", ("weights",)) and engine.log[-2:] == [
        ("wake_up", ("kv_cache",)),
        ("reset_prefix_cache",),
    ]
    assert not engine.agrl_asleep
    assert [e[0] for e in engine.log].count("reset_prefix_cache") == 1 and not engine.agrl_asleep


def test_generate_vllm_keeps_the_generate_contract(fake_vllm, tokenizer):
    engine = FakeLLM()
    prompts = [[1, 2, 3], [4, 5]]
    out = rollouts.generate_vllm(
        engine, tokenizer, prompts, n=3, max_new_tokens=4, temperature=0.7, top_p=0.9, min_new_tokens=1, seeds=[11, 12]
    )
    ((requests, params),) = engine.requests
    assert [r["prompt_token_ids"] for r in requests] == prompts
    assert [p.kwargs["seed"] for p in params] == [11, 12]
    assert all(
        p.kwargs["temperature"] == 0.7
        and p.kwargs["top_p"] == 0.9
        and p.kwargs["min_tokens"] == 1
        and p.kwargs["logprobs"] == 0
        and p.kwargs["stop_token_ids"] == models.stop_token_ids(tokenizer)
        for p in params
    )
    assert out.prompt_ids == [prompts[0]] * 3 + [prompts[1]] * 3
    results = engine.generate([{"prompt_token_ids": p} for p in prompts], params)
    expected = [c for r in results for c in r.outputs]
    assert out.completion_ids == [c.token_ids for c in expected]
    assert out.logprobs == [[-0.1 * (t + 1) for t in range(len(c.token_ids))] for c in expected]
    assert out.truncated == [c.finish_reason == "length" for c in expected]
    assert out.texts == [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in expected]


@pytest.mark.parametrize("module", [grpo, agrl])
def test_training_routes_every_rollout_through_the_engine(module, fake_vllm, tmp_path, monkeypatch):
    """One step with --vllm --vllm-sleep: weights pushed once at the step start (woken first), all rollouts
    (and in agrl.py, AGR's guided ones, whose prompts carry the guidance) from the engine, then sleep."""
    engines = []
    make = rollouts.make_vllm_engine

    def recording_engine(*args, **kwargs):
        engines.append(make(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(rollouts, "make_vllm_engine", recording_engine)
    monkeypatch.setattr(module, "score_group", fake_score_group)
    no_eval(monkeypatch)
    with mock.patch.dict("os.environ"):
        module.main(
            module.Args(
                **{
                    **RUN,
                    "total_steps": 1,
                    "vllm": True,
                    "vllm_sleep": True,
                    "output_dir": str(tmp_path),
                    "run_name": "v",
                }
            )
        )
    (engine,) = engines
    assert engine.kwargs["max_model_len"] > RUN["max_new_tokens"]
    assert engine.kwargs["load_format"] == "dummy"  # random weights: the policy's are pushed before any rollout
    events = [e[0] for e in engine.log]
    first_load = events.index("load")
    assert events[:first_load].count("wake_up") == 0  # the engine starts awake
    assert events.count("reset_prefix_cache") == 1 and events[-1] == "sleep"
    seeds = [p.kwargs["seed"] for _, params in engine.requests for p in params]
    guided = [seed for seed in seeds if seed >= RUN["seed"] * 1_000_003 + 987_654_321]  # AGR's guided seeds
    metrics = read_metrics(tmp_path / "v")[0]
    assert len(seeds) - len(guided) == metrics["data_position"]  # every rollout prompt went to the engine
    # the engine's log-probs (made up here) are replaced by the trainer's: the one update starts at ratio 1
    assert metrics["grad_norm"] > 0 and metrics["approx_kl"] == 0 and metrics["clip_low"] == metrics["clip_high"] == 0
    if module is agrl:
        assert (
            metrics["agr_level_1"] + metrics["agr_level_2"] > 0
            and len(guided) == metrics["agr_level_1"] + metrics["agr_level_2"]
        )
    else:
        assert not guided
