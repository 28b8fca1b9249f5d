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

# the probe answers in the output order the SFT start was trained with (grpo_curve.start_order, as the curves do)
ORDER=$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); from grpo_curve import start_order; print(*start_order(sys.argv[1]))" "$SFT")
part probe && { [[ -f results/guidance-probe-smollm2-sft-synthetic.json ]] || \
  $PY benchmarks/guidance_probe.py --model "$SFT" --name smollm2-sft-synthetic --limit 32 --samples 4 --device cpu $ORDER; }

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

# The tables (whatever has finished): results/smollm2-evidence-synthetic.md
$PY - "$SFT" "$SEEDS" "$BASE_GUIDES" <<'PYEOF' > results/smollm2-evidence-synthetic.md
import json, statistics, sys
from pathlib import Path
sft, seeds, guides = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
load = lambda name: json.loads(Path(f"results/{name}.json").read_text()) if Path(f"results/{name}.json").exists() else None
keys = ("macro_f1", "accuracy", "format_rate", "adherence_rate")
def cells(e): return " | ".join(f"{e[k]:.3f}" for k in keys) if e else " | ".join("-" for _ in keys)
def row(label, r):
    b = r["budget"]
    guided = [m["agr_guided_success_rate"] for m in r["steps"] if m.get("agr_guided_share")]
    kept = f"{statistics.mean(guided):.2f} ({len(guided)} steps)" if guided else "-"
    end = r["dev_eval"] or {}
    return (f"| {label} | {b['steps']} | {b['completions']} | {cells(end)} | {r['steps'][0]['format_rate']:.2f} -> "
            f"{r['steps'][-1]['format_rate']:.2f} | {kept} | {b['mean_step_seconds']:.0f} |" + (" stopped itself |" if r["stopped"] else " |"))
head = ("| run | steps | completions | macro-F1 | accuracy | format | adherence | sampled format, first -> last step "
        "| guided answers kept (mean over guided steps) | s/step | |\n|---|---|---|---|---|---|---|---|---|---|---|")
print("# SmolLM2-135M on the synthetic world: the confirmation and the base policy (benchmarks/smollm2_evidence.sh)\n")
print("Every run: 4 prompts x 4 completions a step, 96 new tokens, lr 2e-5, balanced prompts; greedy dev evaluation "
      "on the same seeded 64 examples before and after (macro-F1, accuracy, format, adherence: at the end).\n")
runs = {f"{s} seed {seed}": load(f"{s}-curve-smollm2-sft-s{seed}") for seed in seeds for s in ("grpo", "agrl")}
first = next((r for r in runs.values() if r), None)
if first:
    print(f"## From the SFT start `{sft}`\n")
    print(f"Start: {cells(first['dev_eval_start'])} (macro-F1, accuracy, format, adherence)\n")
    print(head)
    for label, r in runs.items():
        if r: print(row(label.replace("grpo", "GRPO").replace("agrl", "AGRL (prefix)"), r))
    for s in ("grpo", "agrl"):
        f1 = [r["dev_eval"]["macro_f1"] for k, r in runs.items() if r and r["dev_eval"] and k.startswith(s)]
        if f1: print(f"\n{s.upper()} macro-F1 over {len(f1)} seeds: mean {statistics.mean(f1):.3f}, range {min(f1):.3f}-{max(f1):.3f}", end="")
    print("\n")
base = {"GRPO": load("grpo-curve-smollm2-base"), **{f"AGRL ({g})": load(f"agrl-curve-smollm2-base-{g}") for g in guides}}
if any(base.values()):
    print("## From the base policy (smollm2-135m, no SFT)\n")
    start = next(r for r in base.values() if r)["dev_eval_start"]
    print(f"Start: {cells(start)} (macro-F1, accuracy, format, adherence)\n")
    print(head)
    for label, r in base.items():
        if r: print(row(label, r))
PYEOF
cat results/smollm2-evidence-synthetic.md
