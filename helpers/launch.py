"""Launch: processes, parallelism and precision for the training scripts, and the --dry-run report.

`launch` starts every training script: the dry-run report (launch command, parallel plan, per-GPU memory
estimate from helpers/memory.py, without loading weights), then CUDA honesty, then the relaunch under N processes (accelerate
on GPUs, torchrun over gloo on CPU). `make_accelerator` builds the Accelerator inside each process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from helpers import flags, memory, models, runs
from helpers.errors import UserError


def parallel_strategy(strategy: str, device: str, world: int) -> str:
    """single | ddp | fsdp. auto: FSDP on GPUs (a 7B policy with AdamW does not fit one GPU whole), DDP
    on CPU; `fsdp` also on CPU over gloo, so the sharded path runs in the tests."""
    if strategy == "auto":
        return "single" if world <= 1 else "fsdp" if device.startswith("cuda") else "ddp"
    return "single" if strategy == "ddp" and world <= 1 else strategy


def mixed_precision(precision: str, device: str) -> str:
    """accelerate's mixed_precision for --precision auto | fp32 | bf16: bf16 compute over fp32 master weights
    and AdamW states, or no (fp32)."""
    return "bf16" if precision == "bf16" or (precision == "auto" and device.startswith("cuda")) else "no"


def fsdp_plugin(precision: str):
    """FSDP2 through accelerate: every transformer block a unit, fully sharded; whole (rank-0) state dicts."""
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else None
    )
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
        mixed_precision_policy=policy,
    )


def make_accelerator(device: str, strategy: str = "auto", precision: str = "auto"):
    """The Accelerator of a training script, from --device, --strategy and --precision (inside each launched process)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    device = models.pick_device(device)
    strategy = parallel_strategy(strategy, device, int(os.environ.get("WORLD_SIZE", "1")))
    precision = mixed_precision(precision, device)
    plugin = fsdp_plugin(precision) if strategy == "fsdp" else None
    if plugin is not None and "RANK" not in os.environ:
        raise UserError(
            "--strategy fsdp needs a process group: start the script with --num-gpus (it relaunches itself)"
        )
    if "RANK" not in os.environ:  # one process, maybe several runs in it (tests): each gets the precision it asks for
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision, fsdp_plugin=plugin)
    if plugin is not None and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate enables FSDP only for GPU process groups; on CPU (gloo) we flip the same switch, so the
        # tests run accelerate's own FSDP code: wrapping, state dicts, optimizer save and load.
        from accelerate.state import PartialState

        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does for GPUs
    return accelerator


def compute_dtype(accelerator) -> torch.dtype:
    return torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def micro_batch_sync(accelerator, model, last: bool):
    """The context of a micro-batch's forward and backward when gradients accumulate over micro-batches.

    DDP: skip the all-reduce until the last micro-batch (`no_sync`), as usual. FSDP2: reduce-scatter after
    every micro-batch, so gradients stay sharded: its no_sync (`set_requires_gradient_sync(False)`) keeps a
    whole gradient per parameter in the reduce dtype until the last one (for 7B, 28 GiB per GPU)."""
    if last or is_fsdp(model):
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def launch_command(
    num_gpus: int, device: str, strategy: str = "auto", precision: str = "auto", script: list[str] | None = None
) -> list[str]:
    """The command `--num-gpus N` re-executes the script with. On GPUs: `accelerate launch`, FSDP2 or DDP
    (accelerate takes `--use_fsdp` or `--multi_gpu`, never both). On CPU: `torchrun --standalone` (accelerate
    runs one CPU process per machine), N gloo ranks; the script builds the same FSDP plugin itself."""
    script = script if script is not None else [sys.argv[0], *sys.argv[1:]]
    if device == "cpu":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(num_gpus),
            *script,
        ]
    import socket

    with socket.socket() as s:  # a free port: two launches on one machine must not share a rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    precision = "bf16" if precision in ("auto", "bf16") else "no"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(num_gpus),
        "--num_machines",
        "1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        precision,
        "--dynamo_backend",
        "no",
    ]
    if parallel_strategy(strategy, "cuda", num_gpus) == "fsdp" or strategy == "fsdp":
        command += [
            "--use_fsdp",
            "--fsdp_version",
            "2",
            "--fsdp_reshard_after_forward",
            "true",
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
            "--fsdp_state_dict_type",
            "FULL_STATE_DICT",
            "--fsdp_cpu_ram_efficient_loading",
            "false",
        ]
    elif num_gpus > 1:
        command += ["--multi_gpu"]
    return command + script


def launch(args: flags.TrainFlags, script: str, workload: memory.Workload) -> None:
    """The start of every training script: --dry-run (what is cheap to check, the plan, then exit), else
    `relaunch`."""
    if args.dry_run:
        check_inputs(args, script)
        print(dry_run_report(args, workload))
        raise SystemExit(0)
    relaunch(args.num_gpus, args.device, args.strategy, args.precision)


def check_inputs(args: flags.TrainFlags, script: str) -> None:
    """--dry-run's checks that cost nothing: the data file, a local model folder, the run folder (a used one,
    --resume without a run, --resume with --overwrite). The first problem is a UserError: one line, exit 2."""
    if args.dataset != "synthetic" and args.data_path is None:
        raise UserError(f"--dataset {args.dataset} needs --data-path (docs/DATA.md)")
    if args.data_path is not None and not Path(args.data_path).exists():
        raise UserError(f"--data-path {args.data_path} does not exist")
    model = Path(args.model)
    if len(model.parts) > 1 and Path(model.parts[0]).is_dir() and not model.exists():  # a local path, not a hub id
        raise UserError(f"--model {args.model} does not exist")
    runs.prepare_run_dir(Path(args.output_dir) / args.run_name, args, script, dry_run=True)


def relaunch(num_gpus: int, device: str, strategy: str = "auto", precision: str = "auto") -> None:
    """Device honesty, then the relaunch under N processes (once).

    Multi-node: run `accelerate launch` yourself with your cluster's flags (docs/SCALING.md); a launched process
    has RANK set and never relaunches."""
    check_device(device, num_gpus)
    if "RANK" in os.environ or (num_gpus <= 1 and strategy != "fsdp"):
        return
    if os.environ.get("AGRL_LAUNCHED"):  # a launcher that did not give us a rank: never relaunch in a loop
        raise RuntimeError("relaunched without RANK set: the distributed launcher did not start ranked processes")
    os.environ["AGRL_LAUNCHED"] = str(os.getpid())  # the ranks' launcher's parent (cli.end_launch)
    error_file = Path(tempfile.mkdtemp(prefix="agrl-launch-")) / "user-error"
    os.environ["AGRL_ERROR_FILE"] = str(error_file)  # a rank's user error, printed here once
    command = launch_command(num_gpus, models.pick_device(device), strategy, precision)
    print("[launch]", " ".join(command), flush=True)
    code = subprocess.call(command)
    message = error_file.read_text() if error_file.exists() else None
    shutil.rmtree(error_file.parent, ignore_errors=True)
    if message is not None:
        raise UserError(message)
    sys.exit(code)


def check_device(device: str, num_gpus: int = 1) -> None:
    """CUDA asked for (`--device cuda`, `--num-gpus N > 1`) where torch sees none: one line, exit 2."""
    if device != "cpu" and not torch.cuda.is_available() and (device.startswith("cuda") or num_gpus > 1):
        asked = f"--device {device}" if device.startswith("cuda") else f"--num-gpus {num_gpus}"
        raise UserError(
            f"{asked} needs CUDA, but torch {torch.__version__} sees no GPU on this machine; "
            f"add --device cpu to run {num_gpus} CPU process(es) instead, or --dry-run to see the GPU plan"
        )


def dry_run_report(args: flags.TrainFlags, workload: memory.Workload) -> str:
    """What `--num-gpus N` would do, without loading weights: model id, launch command, parallel plan, memory."""
    on_cpu = args.device == "cpu"
    device = "cpu" if on_cpu else "cuda"
    world = max(1, args.num_gpus)
    strategy = parallel_strategy(args.strategy, device, world)
    precision = mixed_precision(args.precision, device)
    checkpointing = models.gradient_checkpointing_on(args.gradient_checkpointing, device)
    resolved = models.resolve_model_name(args.model)
    shape, source = memory.model_shape(args.model)
    argv = [a for a in sys.argv[1:] if a != "--dry-run"]
    if world > 1 or strategy == "fsdp":
        command = " ".join(launch_command(world, device, strategy, args.precision, [sys.argv[0], *argv]))
    else:
        command = " ".join([sys.executable, sys.argv[0], *argv]) + "   (one process: no relaunch)"
    lines = [f"model     {args.model} -> {resolved}", f"shape     {source}", f"launch    {command}"]
    how = {
        "fsdp": "FSDP2 full shard, one unit per transformer block (parameters, gradients and AdamW states split over "
        f"{world} ranks)",
        "ddp": f"DDP, a whole copy of the model on each of {world} processes",
        "single": "one process",
    }[strategy]
    lines.append(f"parallel  {world} x {'CPU' if on_cpu else 'GPU'}: {how}")
    lines.append(
        f"precision {'bf16 compute, fp32 master weights, gradients and AdamW states' if precision == 'bf16' else 'fp32'}; "
        f"gradient checkpointing {'on' if checkpointing else 'off'}"
    )
    if workload.group_size:
        per_rank = -(-workload.prompts_per_step // world)
        vllm = workload.vllm_gpu_memory is not None
        backend = (
            "colocated vLLM engine per rank (external_launcher), weights pushed after each update"
            if vllm
            else "HF generation on an unsharded inference copy, gathered once per step (no collective inside "
            "generation, so ranks may generate different amounts)"
            if strategy == "fsdp"
            else "HF generation on the local model"
        )
        lines.append(
            f"rollouts  {workload.prompts_per_step} prompts x {workload.group_size} completions per step, "
            f"<= {per_rank} prompts per rank; {backend}"
        )
        lines.append(f"training  micro-batches of {workload.rows} sequences per rank, equal count on every rank")
    if shape is None:
        lines.append(
            "memory    unknown: " + source + ". Put the model's config.json in a local folder and pass that folder."
        )
        return "\n".join(lines)
    n = memory.parameter_count(shape)
    plan = memory.memory_plan(workload, shape, world, strategy, precision, checkpointing)
    lines.append(
        f"memory    per GPU, estimated GiB ({n / 1e9:.2f}B parameters; {shape['num_hidden_layers']} layers, "
        f"hidden {shape['hidden_size']}, vocabulary {shape['vocab_size']}):"
    )
    totals = {phase: sum(g for _, g, p in plan if p == phase) for phase in ("static", "generation", "training")}
    width = max(66, *(len(item) for item, _, _ in plan))
    for phase in ("static", "generation", "training"):
        for item, gib, p in plan:
            if p == phase:
                lines.append(f"  {phase:<10} {item:<{width}} {gib:7.2f}")
    peak = totals["static"] + max(totals["generation"], totals["training"])
    lines.append(f"  {'peak':<10} {'static + max(generation, training) (phases do not overlap)':<{width}} {peak:7.2f}")
    lines += memory.host_ram_lines(workload, shape, world, strategy)
    for card, gib in memory.GPU_GIB.items():
        vllm_share = workload.vllm_gpu_memory or 0.0  # of every card: a larger card gives vLLM more
        need = peak + vllm_share * (gib - memory.GPU_GIB["80 GB"])
        verdict = "fits" if need < 0.9 * gib else "tight" if need < gib else "does NOT fit"
        lines.append(f"  on {card} cards ({gib:.1f} GiB): {verdict}, headroom {gib - need:.1f} GiB")
    return "\n".join(lines)
