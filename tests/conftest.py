"""Shared fixtures: the real SmolLM2 tokenizer and the 2-layer random Llama (`tiny-random`), loaded once."""

from __future__ import annotations

import copy
import signal
import sys
from pathlib import Path

import pytest
import torch

# The test models are tiny: intra-op threads only add synchronisation, and on a shared CPU they make
# every forward pass several times slower (measured: 1 s vs 0.2 s for a small generate call).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest tests` without the repository root on sys.path
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """The scripts install SIGINT/SIGTERM handlers (checkpoints.StopFlag); give pytest its own back after each test."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of `models.load_model("tiny-random", "cpu")`. Tests must not change the weights."""
    from helpers import models

    model, tokenizer = models.load_model("tiny-random", "cpu")
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return tiny[1]


@pytest.fixture(scope="session")
def tiny_model(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def lively(tiny):
    """tiny-random with larger random weights, so sampled and greedy completions vary (read-only)."""
    model = copy.deepcopy(tiny[0])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "embed" in name else 0.3))
    return model.eval()


@pytest.fixture(scope="session")
def grpo_fsdp(tmp_path_factory) -> Path:
    """The uninterrupted 3-step 2-process FSDP grpo.py run (tests/test_distributed.py's driver), made once for
    test_distributed.py and test_sharded_checkpoints.py: the reference of the resume tests, and its checkpoints."""
    from test_distributed import fsdp_command, run_launched

    out = tmp_path_factory.mktemp("grpo_fsdp")
    run_launched(fsdp_command(out, "grpo", "two", total_steps=3), out)
    return out / "two"
