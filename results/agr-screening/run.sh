#!/usr/bin/env bash
# The screening's runs (PLAN.md), from a checkout of the plan's commit with the buffer-size-0 fix (5dcbbc9):
# the deciding arms on seeds 13 and 14 first, then the three single-factor arms on seed 13.
# Resumable: a rerun continues unfinished runs and reuses finished ones.
set -euo pipefail
START=${START:-runs/sft-start-tiny-tf1000/checkpoint}
OUT=${OUT:-runs}
FLAGS="--prompts-per-step 4 --group-size 8 --max-new-tokens 96 --temperature 0.3 --lr 3e-4 --warmup-steps 5 --ds-max-tries 0 --prompt-sampling balanced"
study() { .venv/bin/python benchmarks/agr_study.py --start "$START" --name agr-screening --jobs 2 --steps 80 \
  --eval-every 20 --output-dir "$OUT" --rl-flags="$FLAGS" "$@"; }
study --seeds 13 --arms A B0 own-nll cand no-replay cand-rrs A-kl
study --seeds 14 --arms A cand own-nll B0 A-kl no-replay cand-rrs
study --seeds 13 --arms A forced-0 k1 half-prefix
