#!/usr/bin/env bash
# The embedded SmolLM2-135M-Instruct on ESCI dev: zero-shot, then after a short CPU SFT on ESCI train,
# then GRPO and AGRL from that SFT checkpoint (RL_STEPS steps each, benchmarks/grpo_curve.py, the same
# seeded dev sample before and after). Full generation and the label-only serving path for the first
# rows; writes results/esci-smollm2.md. Resumable: finished stages are kept, an unfinished run resumes.
#   bash benchmarks/esci_smollm2.sh /path/to/esci      (a folder with train.jsonl and dev.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/esci}
PY=${PY:-.venv/bin/python}
N=${N:-64}                 # dev examples (a seeded sample)
SFT_STEPS=${SFT_STEPS:-30} # x 8 sequences
RL_STEPS=${RL_STEPS:-8}    # x 4 prompts x 4 completions
SEED=${SEED:-1}
OUT=runs/esci-smollm2
mkdir -p "$OUT" results
common=(--dataset esci --data-path "$DATA" --split dev --limit "$N" --max-new-tokens 128 --output-dir "$OUT")
finished() { [[ -f "$OUT/$1/eval.json" ]]; }  # finished stages are kept: re-running continues
finished zero-shot || $PY eval.py --model smollm2-135m "${common[@]}" --run-name zero-shot --overwrite
finished zero-shot-label-only || $PY eval.py --model smollm2-135m "${common[@]}" --run-name zero-shot-label-only --label-only --overwrite
[[ -f "$OUT/sft/checkpoint/config.json" ]] || $PY sft.py --model smollm2-135m --dataset esci --data-path "$DATA" \
  --total-steps "$SFT_STEPS" --batch-size 8 --grad-accum 1 --lr 1e-4 --warmup-steps 3 --log-every 5 --eval-limit "$N" \
  --output-dir "$OUT" --run-name sft $([[ -f "$OUT/sft/args.json" ]] && echo --resume)
finished sft-generate || $PY eval.py --model "$OUT/sft/checkpoint" "${common[@]}" --run-name sft-generate --overwrite
finished sft-label-only || $PY eval.py --model "$OUT/sft/checkpoint" "${common[@]}" --run-name sft-label-only --label-only --overwrite
for script in grpo.py agrl.py; do
  $PY benchmarks/grpo_curve.py --sft "$OUT/sft/checkpoint" --script $script --name "esci-smollm2-s$SEED" --seed "$SEED" \
    --dataset esci --data-path "$DATA" --steps "$RL_STEPS" --prompts-per-step 4 --group-size 4 --max-new-tokens 96 \
    --lr 2e-5 --eval-limit "$N" --device cpu --extra='--prompt-sampling balanced'
done
$PY eval.py --compare "$OUT/zero-shot" "$OUT/zero-shot-label-only" "$OUT/sft-generate" "$OUT/sft-label-only" \
  --output-dir "$OUT" --run-name comparison
$PY - "$OUT" "$SEED" <<'PYEOF' > results/esci-smollm2.md
import json, sys
out = sys.argv[1]
table = open(f"{out}/comparison/comparison.md").read()
m = [json.loads(l) for l in open(f"{out}/sft/metrics.jsonl")]
rows = {r: json.load(open(f"{out}/{r}/eval.json")) for r in ("zero-shot", "zero-shot-label-only", "sft-generate", "sft-label-only")}
print("# SmolLM2-135M-Instruct (embedded) on ESCI dev, 2-core CPU\n")
print(table)
print(f"SFT budget: {m[-1]['step']} steps x 8 sequences, mean step time {sum(x['step_seconds'] for x in m) / len(m):.1f} s, "
      f"{sum(x['tokens_per_second'] for x in m) / len(m):.1f} target (loss) tokens/s.\n")
for r, e in rows.items():
    print(f"- {r}: {e['examples_per_second']:.2f} examples/s ({e['mode']}), n={e['n']}, prompts truncated {e['prompts_truncated']}")
curves = {s: json.load(open(f"results/{s}-curve-esci-smollm2-s{sys.argv[2]}.json")) for s in ("grpo", "agrl")}
print("\n## RL from the SFT checkpoint (grpo_curve.py, the same seeded dev sample, greedy, 96 new tokens)\n")
print("| run | steps | completions | macro-F1 | accuracy | format | adherence | mean step s |")
print("|---|---|---|---|---|---|---|---|")
start = curves["grpo"]["dev_eval_start"]
print(f"| SFT start | 0 | 0 | {start['macro_f1']:.3f} | {start['accuracy']:.3f} | {start['format_rate']:.3f} | {start['adherence_rate']:.3f} | - |")
for s, c in curves.items():
    e, b = c["dev_eval"] or {}, c["budget"]
    cells = " | ".join(f"{e[k]:.3f}" if k in e else "-" for k in ("macro_f1", "accuracy", "format_rate", "adherence_rate"))
    print(f"| SFT -> {s.upper()} | {b['steps']} | {b['completions']} | {cells} | {b['mean_step_seconds']:.0f} |")
PYEOF
cat results/esci-smollm2.md
