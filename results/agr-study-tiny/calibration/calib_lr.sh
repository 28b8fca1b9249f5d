#!/bin/bash
# learning-rate calibration of results/agr-study-tiny/PLAN.md (arm A's flags, T from the temperature calibration)
cd /work/exp
LR=$1
OMP_NUM_THREADS=1 .venv/bin/python grpo.py --model runs/sft-start-tiny-tf1000/checkpoint --dataset synthetic --data-seed 7 \
  --limit 64 --order think_first --prompts-per-step 4 --group-size 8 --max-new-tokens 96 --temperature 0.3 --lr $LR \
  --warmup-steps 5 --ds-max-tries 0 --prompt-sampling balanced --seed 99 --total-steps 40 --save-every 1000 \
  --eval-limit 8 --device cpu --run-name agr-study-tiny-calib-lr$LR > runs/calib-lr$LR.log 2>&1
