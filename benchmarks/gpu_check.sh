#!/usr/bin/env bash
# The GPU check (one CUDA GPU, about 10 minutes): versions; generation correctness; the bf16 update;
# a 7B-shaped model's generation speed, activation memory with and without checkpointing, AdamW step;
# SFT, GRPO and AGRL end to end on a 0.5B-shaped model with a resume round trip; the FSDP path at world
# size 1; the 7B dry-run plan. Writes everything to one file: results/gpu-check-<gpu>.txt
#
#     bash benchmarks/gpu_check.sh            # from the repository root, after `make install`
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))" 2>/dev/null || echo none)
OUT=results/gpu-check-$GPU.txt
WORK=$(mktemp -d /tmp/gpu_check.XXXX)
mkdir -p results
exec > >(tee "$OUT") 2>&1
export TQDM_DISABLE=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1

step() {  # step NAME SECONDS COMMAND...: one timed step, its exit code recorded, never stopping the script
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@"; local rc=$?
  echo "=== $name: rc $rc, $((SECONDS - start)) s"
}

echo "gpu_check $(date -u +%FT%TZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null)"
step versions 60 $PY -c "
import sys, torch, transformers, accelerate
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('gpu', torch.cuda.get_device_name(0), round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), 'GiB')
print('transformers', transformers.__version__, 'accelerate', accelerate.__version__)
try:
    import vllm; print('vllm', vllm.__version__)
except ImportError:
    print('vllm not installed')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step generation 120 $PY benchmarks/gpu_check.py generation
step bf16_update 120 $PY benchmarks/gpu_check.py update
step seven_b_shape 180 $PY benchmarks/gpu_check.py seven_b
step make_05b_shape 60 $PY benchmarks/gpu_check.py make_05b "$WORK/q05"

COMMON=(--model "$WORK/q05" --dataset synthetic --device cuda --limit 64 --eval-limit 16 --output-dir "$WORK/runs")
RL=(--prompts-per-step 8 --group-size 4 --max-new-tokens 64 --micro-batch-size 8 --no-dynamic-sampling --save-every 1)
step sft_2_steps 90 $PY sft.py "${COMMON[@]}" --run-name sft --total-steps 2 --save-every 1
step sft_resume_to_3 90 $PY sft.py "${COMMON[@]}" --run-name sft --total-steps 3 --save-every 1 --resume
step grpo_2_steps 90 $PY grpo.py "${COMMON[@]}" "${RL[@]}" --run-name grpo --total-steps 2
step grpo_resume_to_3 90 $PY grpo.py "${COMMON[@]}" "${RL[@]}" --run-name grpo --total-steps 3 --resume
step agrl_2_steps 90 $PY agrl.py "${COMMON[@]}" "${RL[@]}" --run-name agrl --total-steps 2
step agrl_resume_to_3 90 $PY agrl.py "${COMMON[@]}" "${RL[@]}" --run-name agrl --total-steps 3 --resume
step grpo_fsdp_world_1 120 $PY grpo.py "${COMMON[@]}" "${RL[@]}" --run-name grpo-fsdp --total-steps 2 --num-gpus 1 --strategy fsdp
for run in sft grpo agrl grpo-fsdp; do
  echo "--- $run metrics"; cat "$WORK/runs/$run/metrics.jsonl" 2>/dev/null | cut -c1-400
done
step dry_run_7b 60 $PY agrl.py --model Qwen2.5-7B --num-gpus 8 --dry-run
echo; echo "wrote $OUT"
