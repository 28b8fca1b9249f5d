#!/usr/bin/env bash
# The GPU check on the lent GPU machine as it is (no tyro, no .venv, no network; results only under $OUT).
# Prepare and look here first (benchmarks/README.md, "The GPU check"):
#
#     .venv/bin/python benchmarks/gpu_check.py prepare     # .gpu_check/: tyro's wheels, the SmolLM2 tokenizer
#     .venv/bin/python benchmarks/gpu_check.py dry-run     # sizes, step limits, the exact device run call
#
# There, through that run call (carry .gpu_check):
#
#     bash benchmarks/gpu_check.sh [STEP ...]              # all steps, or those named: versions generation fsdp_step resume
#
# Installs the carried wheels into /tmp (PYTHONPATH), then runs the steps of benchmarks/gpu_check.py, each killed at
# its limit; writes $OUT/gpu_check.log and $OUT/gpu_check.json, nothing else.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT must name the results folder (the device machine sets it)}"
PY=${PY:-python3}  # the image's python3 holds torch
SITE=/tmp/gpu_check_site
mkdir -p "$OUT"
if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu_check/wheels/*.whl \
  >>"$OUT/gpu_check.log" 2>&1; then
  echo "gpu_check: the carried wheels did not install: run 'gpu_check.py prepare' here and carry .gpu_check" | tee -a "$OUT/gpu_check.log"
  exit 1
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec $PY benchmarks/gpu_check.py run --out "$OUT" "$@"
