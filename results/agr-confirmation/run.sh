#!/usr/bin/env bash
# The confirmation's runs (PLAN.md), from a checkout of the plan's commit. Resumable: a rerun continues unfinished
# runs and reuses finished ones; --table-only re-makes the report.
set -euo pipefail
START=${START:-runs/sft-start-tiny-tf1000/checkpoint}
OUT=${OUT:-runs}
FLAGS="--prompts-per-step 4 --group-size 8 --max-new-tokens 96 --temperature 0.3 --lr 3e-4 --warmup-steps 5 --ds-max-tries 0 --prompt-sampling balanced"
.venv/bin/python benchmarks/agr_study.py --start "$START" --name agr-confirmation --jobs 2 --steps 150 --eval-every 25 \
  --data-seed 29 --seeds 21 22 23 24 --arms grpo agrl --output-dir "$OUT" --rl-flags="$FLAGS" "$@"
