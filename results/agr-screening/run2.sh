#!/usr/bin/env bash
# The screening's remaining runs after run.sh was stopped at 16:25 (README: the order changed, one arm added;
# the confirmation starts when the deciding runs are in, and what is left then is not run).
set -euo pipefail
START=${START:-runs/sft-start-tiny-tf1000/checkpoint}
OUT=${OUT:-runs}
FLAGS="--prompts-per-step 4 --group-size 8 --max-new-tokens 96 --temperature 0.3 --lr 3e-4 --warmup-steps 5 --ds-max-tries 0 --prompt-sampling balanced"
study() { .venv/bin/python benchmarks/agr_study.py --start "$START" --name agr-screening --jobs 2 --steps 80 \
  --eval-every 20 --output-dir "$OUT" --rl-flags="$FLAGS" "$@"; }
study --seeds 13 14 --arms A cand-nq
study --seeds 14 --arms A cand A-kl
study --seeds 13 --arms A forced-0 k1 half-prefix
study --seeds 14 --arms A own-nll B0 no-replay cand-rrs
