#!/usr/bin/env bash
# The confirmation's runs (PLAN.md), from a checkout of the plan's commit: two harnesses side by side (seeds 21-22
# and 23-24, two runs each at a time), so that no core idles while the slower agrl.py runs finish. Resumable: a
# rerun continues unfinished runs from their last checkpoint and reuses finished ones; --table-only re-makes the
# report over all four seeds.
set -euo pipefail
START=${START:-runs/sft-start-tiny-tf1000/checkpoint}
OUT=${OUT:-runs}
FLAGS="--prompts-per-step 4 --group-size 8 --max-new-tokens 96 --temperature 0.3 --lr 3e-4 --warmup-steps 5 --ds-max-tries 0 --prompt-sampling balanced"
study() { .venv/bin/python benchmarks/agr_study.py --start "$START" --name agr-confirmation --jobs 2 --steps 150 \
  --eval-every 25 --data-seed 29 --arms grpo agrl --output-dir "$OUT" --rl-flags="$FLAGS" "$@"; }
study --seeds 21 22 > "$OUT/agr-confirmation-21-22.log" 2>&1 &
study --seeds 23 24 > "$OUT/agr-confirmation-23-24.log" 2>&1 &
wait
study --seeds 21 22 23 24 --table-only
