"""benchmarks/gpu_check: the dry run fits the device call (time, size, command, results only under $OUT), and
the parts that run on a CPU do, at tiny width (the GPU run itself: benchmarks/README.md, "The GPU check")."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

import agrl  # noqa: E402
from helpers import memory  # noqa: E402


@pytest.fixture(scope="module")
def info():
    return gpu_check.dry_run_info()


def test_dry_run_fits_the_device_call(info, capsys):
    assert info["steps_total_s"] == sum(info["steps"].values()) <= 540
    assert all(limit > 0 for limit in info["steps"].values())
    assert info["steps_total_s"] <= info["run_call"]["timeout_s"] <= 600  # the steps end before the call's limit
    assert info["command_chars"] == len(info["run_call"]["command"]) <= 2000
    assert info["total_bytes"] == info["tree_bytes"] + info["carried_bytes"] <= 64 * 2**20
    # the carried folder is ignored by git (a carried path must be) and holds what the device lacks, once prepared
    for path in info["run_call"]["carry"]:
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
    if not info["missing"]:
        names = [Path(p).name for p, _ in info["carried"]]
        assert any(n.startswith("tyro-") for n in names) and "tokenizer.json" in names
    gpu_check.dry_run()
    printed = capsys.readouterr().out
    assert json.dumps(info["run_call"]) in printed and f"{info['steps_total_s']} s (limit 540 s)" in printed


def test_results_only_under_out(info, tmp_path):
    """Only $OUT comes back: the outputs are named under it (at most 8 files, plain names), the scripts name no
    results folder (runs go to a temporary folder), and a run writes exactly those files into --out."""
    assert 0 < len(info["outputs"]) <= 8
    assert all(re.fullmatch(r"\$OUT/[A-Za-z0-9._-]+", path) for path in info["outputs"])
    shell = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert 'run --out "$OUT"' in shell and "results/" not in shell
    assert '"results"' not in (ROOT / "benchmarks" / "gpu_check.py").read_text()  # runs go to a temporary folder
    out = tmp_path / "out"
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    proc = subprocess.run(  # in gpu_check.sh's order: `run --out "$OUT" "$@"` (the steps come after --out)
        [sys.executable, script, "run", "--out", str(out), "versions", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUTPUTS)
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["steps"]["versions"]["rc"] == 0 and results["checks"]["versions"]["ok"] is True
    assert "=== versions: rc 0" in (out / "gpu_check.log").read_text()


def test_wide_model_is_the_largest_the_plan_fits(info):
    """Qwen2.5-7B's width with as many of its layers as keep the plan within PLAN_SHARE of a 141 GB card:
    one layer more would not."""
    shape, card = info["wide_shape"], info["card_gib"]
    assert (shape["hidden_size"], shape["intermediate_size"]) == (3584, 18944) and shape["num_hidden_layers"] < 28
    assert info["wide_plan"]["peak"] <= gpu_check.PLAN_SHARE * card
    flags = gpu_check.wide_flags(Path("/tmp/m"), Path("/tmp/r"), "cuda", tiny=False)
    args = gpu_check.wide_plan(shape, flags, card, tiny=False)[2]
    one_more = dict(shape, num_hidden_layers=shape["num_hidden_layers"] + 1)
    plan = memory.memory_plan(agrl.memory_workload(args), one_more, 1, "fsdp", "bf16", True)
    assert gpu_check.plan_totals(plan)["peak"] > gpu_check.PLAN_SHARE * card


def test_generation_checks_pass_at_tiny_width_on_cpu(tmp_path, monkeypatch):
    """The generation step in this process at tiny width: greedy equals HF generate, shared and unshared prefill
    sample the same tokens, behaviour and training log-probs agree, the speed is measured, and one bf16-autocast
    update at lr 1e-6 moves the fp32 weights while their bf16 rounding mostly stays."""
    monkeypatch.setenv("AGRL_CPU_KERNEL", "0")  # the plain-torch decode (the GPU's path), no kernel build
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "results.jsonl")
    gpu_check.generation("cpu", True, tmp_path)
    checks = {c.pop("check"): c for c in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert set(checks) == {
        "greedy_vs_hf_fp32",
        "sampling_shared_vs_unshared_prefill_fp32",
        "behaviour_vs_training_logprobs_fp32",
        "greedy_vs_hf_bf16",
        "decode_speed_bf16",
        "bf16_update_single_process",
    }
    assert all(c["ok"] is not False for c in checks.values()), checks
    assert checks["greedy_vs_hf_fp32"]["equal"] == 8
    assert checks["decode_speed_bf16"]["ours_tokens_per_second"] > 0
    update = checks["bf16_update_single_process"]
    assert update["mixed_precision"] == "bf16" and update["blocks_fp32"] > 0.9 > 0.2 > update["blocks_bf16"]


def test_agrl_driver_runs_a_config_only_model_and_reports(tmp_path):
    """The driver as the wide step runs it, in one CPU process at tiny width: tyro's parse, a model folder without
    weights built from its config, the mixed scorer (the step trains: a gradient), no checkpoint written, and the
    report of phases (refresh, generation, training, optimizer step) with the folder's shape, in place of the eval."""
    tokenizer = gpu_check.carried_tokenizer()
    shape = gpu_check.shapes(True, len(tokenizer))["wide"]
    folder, runs = tmp_path / "model", tmp_path / "runs"
    gpu_check.write_model_folder(folder, gpu_check.qwen_config(shape, tokenizer), tokenizer)
    flags = ["--model", str(folder), "--device", "cpu", "--limit", "16", "--total-steps", "1", "--prompts-per-step"]
    flags += ["2", "--group-size", "4", "--max-new-tokens", "4", "--no-dynamic-sampling", "--output-dir", str(runs)]
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", AGRL_CPU_KERNEL="0")
    env.update(GPU_CHECK_NO_SAVE="1", GPU_CHECK_MEMORY=str(tmp_path / "memory.json"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "agrl", *flags, "--run-name", "wide"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "memory.json").read_text())
    assert report["error"] is None and report["shape"] == shape
    assert {"refresh", "generation", "training", "optimizer step"} <= {s["phase"] for s in report["segments"]}
    metrics = gpu_check.read_metrics(runs / "wide")
    assert [m["step"] for m in metrics] == [1] and metrics[0]["grad_norm"] > 0
    assert not (runs / "wide" / "checkpoints").exists() and not (runs / "wide" / "checkpoint").exists()


def test_memory_against_the_plan_reads_the_last_step():
    """The comparison uses the last step (AdamW states in place): its start, its generation, training and
    optimizer-step peaks against the plan's tensors (without the flat allowance), and the device's peak use
    against the whole plan."""
    plan = [
        ("parameters fp32", 10.0, "static"),
        ("CUDA context, NCCL, allocator slack", 3.0, "static"),
        ("rollout KV cache", 1.0, "generation"),
        ("gradients fp32", 10.0, "training"),
    ]

    def segment(step, phase, allocated, device):
        return dict(step=step, phase=phase, peak_allocated_gib=allocated, peak_device_gib=device)

    report = dict(
        card_gib=140.0,
        step_starts=[dict(step=1, allocated_gib=5.0), dict(step=2, allocated_gib=9.0)],
        segments=[
            segment(1, "generation", 50.0, 60.0),
            segment(2, "generation", 10.5, 12.0),
            segment(2, "training", 19.0, 21.0),
            segment(2, "optimizer step", 22.0, 25.0),
        ],
    )
    result = gpu_check.compare_with_plan(plan, report)
    compared = result["compared"]
    assert result["last_step"] == 2 and result["plan"]["peak"] == 23.0
    assert compared["static"]["plan_gib"] == 10.0 and compared["static"]["measured_gib"] == 9.0
    assert compared["generation"]["measured_gib"] == 10.5 and compared["generation"]["plan_gib"] == 11.0
    assert compared["training_forward_backward"]["measured_gib"] == 19.0
    assert compared["optimizer_step"]["measured_gib"] == 22.0 and compared["optimizer_step"]["plan_gib"] == 20.0
    assert compared["whole_step_device"] == dict(plan_gib=23.0, measured_gib=60.0, measured_over_plan=60.0 / 23.0)


def test_phase_memory_on_a_fake_allocator(monkeypatch):
    """The bookkeeping of the driver's memory phases, on a fake CUDA allocator (no GPU here): two steps of
    refresh, generation, training with an optimizer step inside it; step 1 allocates the inference copy and the
    AdamW states. The comparison must read step 2: its start (weights, AdamW, copy), its phase peaks, and the
    device's use (reserved + what is outside the allocator)."""
    GiB = 2**30
    fake = dict(allocated=0, peak=0, reserved=0, peak_reserved=0)

    def alloc(gib):
        fake["allocated"] += gib * GiB
        fake["peak"] = max(fake["peak"], fake["allocated"])
        fake["reserved"] = max(fake["reserved"], fake["allocated"])  # the caching allocator keeps what it took
        fake["peak_reserved"] = max(fake["peak_reserved"], fake["reserved"])

    def reset():
        fake["peak"], fake["peak_reserved"] = fake["allocated"], fake["reserved"]

    cuda = gpu_check.torch.cuda
    monkeypatch.setattr(cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cuda, "mem_get_info", lambda: (140 * GiB - fake["reserved"] - GiB, 140 * GiB))  # 1 GiB context
    monkeypatch.setattr(cuda, "memory_allocated", lambda: fake["allocated"])
    monkeypatch.setattr(cuda, "memory_reserved", lambda: fake["reserved"])
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda: fake["peak"])
    monkeypatch.setattr(cuda, "max_memory_reserved", lambda: fake["peak_reserved"])
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(cuda, "get_device_properties", lambda i: type("P", (), dict(total_memory=140 * GiB)))
    memory = gpu_check.PhaseMemory("cpu")
    memory.cuda = True
    alloc(20)  # fp32 weights
    copy, adam = [], []
    refresh = memory.wrap("refresh", lambda: copy or (alloc(10), copy.append(1)), new_step=True)
    generate = memory.wrap("generation", lambda: (alloc(2), alloc(-2)))

    def update():
        alloc(5)  # activations and gradients
        alloc(-3)  # activations freed, 2 GiB of gradients kept
        memory.enter("optimizer step")
        adam or (alloc(4), adam.append(1))  # AdamW states, made by the first step
        alloc(1)  # a temporary of the step
        alloc(-1)
        memory.exit()
        alloc(-2)  # zero_grad(set_to_none=True)

    train = memory.wrap("training", update)
    for _ in range(2):
        refresh()
        generate()
        train()
    plan = [
        ("parameters fp32", 20.0, "static"),
        ("AdamW states fp32", 4.0, "static"),
        ("rollout inference copy", 10.0, "static"),
        ("CUDA context, NCCL, allocator slack", 3.0, "static"),
        ("rollout KV cache", 2.0, "generation"),
        ("gradients fp32", 2.0, "training"),
        ("activations", 5.0, "training"),
    ]
    result = gpu_check.compare_with_plan(plan, memory.report())
    measured = {name: row["measured_gib"] for name, row in result["compared"].items()}
    assert result["last_step"] == 2 and result["card_gib"] == 140
    assert measured == dict(
        static=34.0, generation=36.0, training_forward_backward=39.0, optimizer_step=37.0, whole_step_device=40.0
    )
    planned = {name: row["plan_gib"] for name, row in result["compared"].items()}
    assert planned == dict(
        static=34.0, generation=36.0, training_forward_backward=41.0, optimizer_step=41.0, whole_step_device=44.0
    )


@pytest.mark.skipif(os.environ.get("GPU_CHECK_SLOW") != "1", reason="about 4 minutes here: GPU_CHECK_SLOW=1")
def test_every_step_passes_at_tiny_width_on_cpu(tmp_path):
    """The whole check as the device runs it, at tiny width on the CPU: the agrl.py driver under torchrun (FSDP
    at world size 1), the memory report, and the resume round trip."""
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", AGRL_CPU_KERNEL="0")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "run", "--device", "cpu", "--tiny"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 0 and all(s["rc"] == 0 for s in results["steps"].values()), proc.stdout[-3000:]
    assert all(c["ok"] is not False for c in results["checks"].values())
    assert results["checks"]["resume_round_trip"]["gap_over_update"] <= 0.1
