#!/usr/bin/env bash
# Issue 12's SmolLM2-135M evidence on the synthetic world, on a CPU, resumable (run it again after an
# interruption: finished parts are kept, an unfinished run resumes from its last checkpoint):
#   1. the guidance probe of each AGR mode on the SFT'd embedded model;
#   2. the confirmation: grpo.py vs agrl.py (default prefix guidance) from that SFT start, SEEDS seeds;
#   3. from the base policy (no SFT): grpo.py vs agrl.py with target and with prefix guidance.
# Every run: STEPS steps of 4 prompts x 4 completions, 96 new tokens, lr 2e-5, balanced prompts,
# evaluated on the same seeded EVAL_N dev examples before and after (benchmarks/grpo_curve.py).
#   bash benchmarks/smollm2_evidence.sh runs/demo/sft/checkpoint
#   PARTS=base bash benchmarks/smollm2_evidence.sh            # one part only (probe, sft, base)
set -euo pipefail
cd "$(dirname "$0")/.."
SFT=${1:-runs/demo/sft/checkpoint}
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-12}
SEEDS=${SEEDS:-"1 2"}
EVAL_N=${EVAL_N:-64}
PARTS=${PARTS:-"probe sft base"}
BASE_GUIDES=${BASE_GUIDES:-"target prefix"}
part() { [[ " $PARTS " == *" $1 "* ]]; }
export TOKENIZERS_PARALLELISM=false
curve() { $PY benchmarks/grpo_curve.py --steps "$STEPS" --prompts-per-step 4 --group-size 4 --max-new-tokens 96 \
  --lr 2e-5 --eval-limit "$EVAL_N" --device cpu "$@"; }

# the output order the SFT start was trained with (grpo_curve.py reads it the same way)
ORDER=$($PY -c "import json,sys,pathlib; p=pathlib.Path(sys.argv[1]).resolve().parent/'args.json'; print(json.loads(p.read_text())['order'] if p.exists() else 'label_first')" "$SFT")
part probe && { [[ -f results/guidance-probe-smollm2-sft-synthetic.json ]] || \
  $PY benchmarks/guidance_probe.py --model "$SFT" --name smollm2-sft-synthetic --limit 32 --samples 4 --device cpu --order "$ORDER"; }

part sft && for seed in $SEEDS; do
  curve --sft "$SFT" --script grpo.py --name "smollm2-sft-s$seed" --seed "$seed" --extra='--prompt-sampling balanced'
  curve --sft "$SFT" --script agrl.py --name "smollm2-sft-s$seed" --seed "$seed" --extra='--prompt-sampling balanced'
done

if part base; then
  curve --sft smollm2-135m --script grpo.py --name smollm2-base --extra='--prompt-sampling balanced'
  for guide in $BASE_GUIDES; do
    curve --sft smollm2-135m --script agrl.py --name "smollm2-base-$guide" --extra="--prompt-sampling balanced --agr-guide $guide"
  done
fi
