#!/bin/bash
# temperature calibration of results/agr-study-tiny/PLAN.md
cd /work/exp
for T in "$@"; do
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_probe.py --model runs/sft-start-tiny-tf1000/checkpoint \
    --seed 7 --limit 64 --samples 8 --tau 0 --order think_first --temperature $T --max-new-tokens 96 \
    --name agr-study-tiny-calib-T$T --device cpu > runs/calib-T$T.log 2>&1
done
