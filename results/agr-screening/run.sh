#!/usr/bin/env bash
# The screening's runs (PLAN.md), from a checkout of the plan's commit: seed 13 for every arm, then seed 14 for
# the seven deciding arms. Resumable: a rerun continues unfinished runs and reuses finished ones.
set -euo pipefail
START=${START:-runs/sft-start-tiny-tf1000/checkpoint}
OUT=${OUT:-runs}
FLAGS="--prompts-per-step 4 --group-size 8 --max-new-tokens 96 --temperature 0.3 --lr 3e-4 --warmup-steps 5 --ds-max-tries 0 --prompt-sampling balanced"
study() { .venv/bin/python benchmarks/agr_study.py --start "$START" --name agr-screening --jobs 2 --steps 80 \
  --eval-every 20 --output-dir "$OUT" --rl-flags="$FLAGS" "$@"; }
study --seeds 13 --arms A B0 own-nll cand cand-rrs no-replay A-kl forced-0 k1 half-prefix
study --seeds 14 --arms A B0 own-nll cand cand-rrs no-replay A-kl
