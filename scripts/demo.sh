#!/usr/bin/env bash
# `make demo`: the embedded SmolLM2-135M-Instruct, zero-shot -> short SFT -> short AGRL on the synthetic
# rule world, on a CPU. Prints the before/after evaluation table and where each run's files are.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
EVAL_N=${EVAL_N:-64}          # dev examples evaluated at each stage: the same ones, answered alike (96 new tokens)
SFT_STEPS=${SFT_STEPS:-20}    # x 8 sequences
AGRL_STEPS=${AGRL_STEPS:-4}   # x 4 prompts x 4 completions
export TOKENIZERS_PARALLELISM=false
rm -rf "$OUT"
started=$(date +%s)

echo "== 1/3 zero-shot evaluation of smollm2-135m on synthetic dev ($EVAL_N examples)"
$PY eval.py --model smollm2-135m --dataset synthetic --split dev --limit "$EVAL_N" --max-new-tokens 96 \
  --output-dir "$OUT" --run-name base

echo "== 2/3 SFT: $SFT_STEPS steps of 8 sequences (label, criteria, reason)"
$PY sft.py --model smollm2-135m --dataset synthetic --total-steps "$SFT_STEPS" --batch-size 8 --grad-accum 1 \
  --lr 2e-4 --warmup-steps 3 --log-every 4 --eval-limit "$EVAL_N" --max-new-tokens 96 --output-dir "$OUT" --run-name sft

# The rollout settings under which GRPO learned in results/agr-study-tiny: temperature 0.3 (samples no longer at
# chance), a fixed pool of 64 prompts drawn balanced by label, dynamic sampling without refills; agrl.py's own
# defaults otherwise (results/agr-screening). lr 2e-6: at 2e-5 one update moved the 135M model's samples from
# 75% "Irrelevant" to 75% "Excellent", and two updates later all were "Excellent" (results/demo/README.md).
echo "== 3/3 AGRL from the SFT checkpoint: $AGRL_STEPS steps of 4 prompts x 4 completions"
$PY agrl.py --model "$OUT/sft/checkpoint" --dataset synthetic --limit 64 --total-steps "$AGRL_STEPS" \
  --prompts-per-step 4 --group-size 4 --micro-batch-size 4 --max-new-tokens 96 --temperature 0.3 \
  --prompt-sampling balanced --ds-max-tries 0 --lr 2e-6 --warmup-steps 1 \
  --eval-limit "$EVAL_N" --output-dir "$OUT" --run-name agrl

echo
echo "== before / after (synthetic dev, natural and class-balanced samples)"
$PY eval.py --compare "$OUT/base" "$OUT/sft" "$OUT/agrl" --output-dir "$OUT" --run-name comparison
echo
echo "Finished in $(( $(date +%s) - started ))s. Files:"
for d in base sft agrl comparison; do echo "  $OUT/$d/"; done
echo "  (eval.json, metrics.jsonl, samples.jsonl, confusion.png, checkpoint/; comparison.md/.json/.png)"
