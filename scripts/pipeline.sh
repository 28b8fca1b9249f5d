#!/usr/bin/env bash
# The whole TaoSR1 / TaoSR-AGRL pipeline in one command, then one comparison table:
#
#   SFT -> eval          runs/pipeline-<dataset>/sft
#   SFT -> DPO           runs/pipeline-<dataset>/dpo            (pass@N sampling + DPO, TaoSR1 stage 2)
#   DPO -> GRPO          runs/pipeline-<dataset>/sft-dpo-grpo   (TaoSR1 stage 3)
#   DPO -> AGRL          runs/pipeline-<dataset>/sft-dpo-agrl
#   SFT -> AGRL          runs/pipeline-<dataset>/sft-agrl
#   comparison           results/pipeline-<dataset>/comparison.{md,json,png}
#
#   bash scripts/pipeline.sh [MODEL] [DATASET] [BUDGET]          # defaults: smollm2-135m synthetic cpu
#   DATA_PATH=data/esci bash scripts/pipeline.sh Qwen2.5-7B-Instruct esci gpu     # 8 GPUs
#
# Every stage evaluates itself at its end (eval.json, same dev examples and seed for all stages).
# BUDGET: cpu (about 25 minutes for smollm2-135m on a 2-core CPU) or gpu (Qwen2.5-7B-Instruct on 8 GPUs).
# Environment:
#   DATA_PATH      dataset file or folder (not needed for synthetic)
#   EXTRA_ARGS     appended to every stage, e.g. "--field-map query=q,title=t --rulebook esci"
#   WANDB_TRACK=1  log every stage to wandb, all in one --wandb-group pipeline-<dataset>-<timestamp>
#   SEED           seed of every stage (default 1)
#   PY             python to use (default .venv/bin/python, else python3)
#   RUNS_ROOT, RESULTS_ROOT   where run folders and the table go (default runs, results)
#   PIPELINE_SMOKE=1   every stage 1-2 tiny steps (a wiring check, e.g. with MODEL=tiny-random);
#                      writes to pipeline-<dataset>-smoke so real results are never overwritten
# Re-running the same command resumes: finished stages (eval.json present) are skipped, an interrupted
# stage continues from its last checkpoint. A folder made with other settings is refused.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-smollm2-135m}
DATASET=${2:-synthetic}
BUDGET=${3:-cpu}
SEED=${SEED:-1}
SMOKE=${PIPELINE_SMOKE:-0}
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export TOKENIZERS_PARALLELISM=false

# --- budget presets ------------------------------------------------------------------------------
# Sizes are per process; RL steps are generation batches (prompts x group completions each).
case "$BUDGET" in
  cpu)  # smollm2-135m, 2 CPU cores: ~4 min SFT, ~4 min DPO, ~5 min per RL stage, 40-example evals
    NUM_GPUS=1
    EVAL_LIMIT=40; MAX_NEW_TOKENS=128
    SFT_STEPS=24; SFT_BS=8; SFT_ACCUM=1; SFT_LR=2e-4; SFT_WARMUP=3
    DPO_PROMPTS=24; DPO_N=4; DPO_PAIRS_PER_PROMPT=1; DPO_STEPS=8; DPO_BS=2; DPO_ACCUM=2; DPO_LR=5e-6
    DPO_BETA=0.1; DPO_WARMUP=1; DPO_GEN_BS=8
    RL_STEPS=5; RL_PROMPTS=4; RL_GROUP=4; RL_MICRO=4; RL_LR=2e-5; RL_WARMUP=1; RL_DS_TRIES=1
    SAVE_EVERY=50
    ;;
  gpu)  # Qwen2.5-7B-Instruct, 8 GPUs (FSDP): 64 SFT sequences, 32 DPO pairs, 64x8 RL rollouts per step
    NUM_GPUS=8
    EVAL_LIMIT=2000; MAX_NEW_TOKENS=128
    SFT_STEPS=500; SFT_BS=4; SFT_ACCUM=2; SFT_LR=1e-5; SFT_WARMUP=20
    DPO_PROMPTS=8000; DPO_N=8; DPO_PAIRS_PER_PROMPT=1; DPO_STEPS=200; DPO_BS=2; DPO_ACCUM=2; DPO_LR=5e-7
    DPO_BETA=0.1; DPO_WARMUP=10; DPO_GEN_BS=32
    RL_STEPS=300; RL_PROMPTS=64; RL_GROUP=8; RL_MICRO=4; RL_LR=1e-6; RL_WARMUP=10; RL_DS_TRIES=3
    SAVE_EVERY=50
    ;;
  *) echo "unknown BUDGET '$BUDGET': expected cpu or gpu" >&2; exit 2 ;;
esac
if [[ "$SMOKE" == 1 ]]; then  # wiring check: every stage 1-2 steps on a handful of examples
  EVAL_LIMIT=2; MAX_NEW_TOKENS=8
  SFT_STEPS=2; SFT_BS=2; SFT_ACCUM=1
  DPO_PROMPTS=2; DPO_N=2; DPO_STEPS=1; DPO_BS=1; DPO_ACCUM=1
  RL_STEPS=1; RL_PROMPTS=2; RL_GROUP=2; RL_MICRO=2; RL_DS_TRIES=0
fi

NAME=pipeline-$DATASET
[[ "$SMOKE" == 1 ]] && NAME=$NAME-smoke
ROOT=${RUNS_ROOT:-runs}/$NAME
RESULTS=${RESULTS_ROOT:-results}
mkdir -p "$ROOT"

# One configuration per folder: resuming with other settings would mix runs in one table.
CONF="model=$MODEL dataset=$DATASET budget=$BUDGET smoke=$SMOKE seed=$SEED data_path=${DATA_PATH:-} extra=${EXTRA_ARGS:-}"
if [[ -f "$ROOT/pipeline.conf" && "$(cat "$ROOT/pipeline.conf")" != "$CONF" ]]; then
  echo "$ROOT holds a pipeline with other settings:" >&2
  echo "  there: $(cat "$ROOT/pipeline.conf")" >&2
  echo "  now:   $CONF" >&2
  echo "delete $ROOT or set RUNS_ROOT to start a new one" >&2
  exit 2
fi
echo "$CONF" > "$ROOT/pipeline.conf"
[[ -f "$ROOT/wandb_group" ]] || echo "$NAME-$(date +%Y%m%d-%H%M%S)" > "$ROOT/wandb_group"
GROUP=$(cat "$ROOT/wandb_group")

COMMON=(--dataset "$DATASET" --seed "$SEED" --eval-limit "$EVAL_LIMIT" --num-gpus "$NUM_GPUS"
        --output-dir "$ROOT" --wandb-group "$GROUP" --save-every "$SAVE_EVERY")
[[ -n "${DATA_PATH:-}" ]] && COMMON+=(--data-path "$DATA_PATH")
[[ "${WANDB_TRACK:-0}" == 1 ]] && COMMON+=(--track)
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
RL=(--total-steps "$RL_STEPS" --prompts-per-step "$RL_PROMPTS" --group-size "$RL_GROUP"
    --micro-batch-size "$RL_MICRO" --max-new-tokens "$MAX_NEW_TOKENS" --lr "$RL_LR" --warmup-steps "$RL_WARMUP"
    --ds-max-tries "$RL_DS_TRIES")

started=$(date +%s)
# stage NAME SCRIPT ARGS...: run one stage into $ROOT/NAME (skipped when finished, resumed when interrupted)
stage() {
  local name=$1 script=$2
  shift 2
  local dir=$ROOT/$name t0
  if [[ -f "$dir/eval.json" ]]; then
    echo "== $name: finished earlier ($dir/eval.json), skipped"
    return
  fi
  local resume=()
  [[ -f "$dir/args.json" ]] && resume=(--resume)  # an interrupted stage: continue it (a stage never reuses a folder silently)
  echo
  echo "== $name: $PY $script $*"
  t0=$(date +%s)
  "$PY" "$script" "${COMMON[@]}" --run-name "$name" "$@" ${resume[@]+"${resume[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
  echo "== $name: done in $(( $(date +%s) - t0 ))s"
}

echo "pipeline $NAME: model=$MODEL budget=$BUDGET smoke=$SMOKE python=$PY wandb group=$GROUP"

stage sft sft.py --model "$MODEL" --total-steps "$SFT_STEPS" --batch-size "$SFT_BS" --grad-accum "$SFT_ACCUM" \
  --lr "$SFT_LR" --warmup-steps "$SFT_WARMUP"

stage dpo dpo.py --model "$ROOT/sft/checkpoint" --limit "$DPO_PROMPTS" --n-samples "$DPO_N" \
  --pairs-per-prompt "$DPO_PAIRS_PER_PROMPT" --max-new-tokens "$MAX_NEW_TOKENS" --gen-batch-size "$DPO_GEN_BS" \
  --total-steps "$DPO_STEPS" --batch-size "$DPO_BS" --grad-accum "$DPO_ACCUM" --lr "$DPO_LR" --beta "$DPO_BETA" \
  --warmup-steps "$DPO_WARMUP"

stage sft-dpo-grpo grpo.py --model "$ROOT/dpo/checkpoint" "${RL[@]}"
stage sft-dpo-agrl agrl.py --model "$ROOT/dpo/checkpoint" "${RL[@]}"
stage sft-agrl agrl.py --model "$ROOT/sft/checkpoint" "${RL[@]}"

echo
echo "== comparison"
"$PY" eval.py --compare "$ROOT/sft" "$ROOT/dpo" "$ROOT/sft-dpo-grpo" "$ROOT/sft-dpo-agrl" "$ROOT/sft-agrl" \
  --output-dir "$RESULTS" --run-name "$NAME"
echo
echo "Pipeline finished in $(( $(date +%s) - started ))s."
echo "  runs:  $ROOT/{sft,dpo,sft-dpo-grpo,sft-dpo-agrl,sft-agrl}/ (eval.json, metrics.jsonl, checkpoint/)"
echo "  table: $RESULTS/$NAME/comparison.md, comparison.json, comparison.png"
