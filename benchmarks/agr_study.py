"""The pre-registered AGR studies (results/<name>/PLAN.md): arms (a script and its flags, ARMS) against a
baseline arm (GRPO), on one fixed training pool, paired RL seeds, the same number of updates.

    python benchmarks/agr_study.py --start runs/sft-start-tiny-tf1000/checkpoint --name agr-study-tiny --jobs 2

1. freeze: the start answers the pool (train split of --data-seed's world, --pool examples) greedily; the
   prompts it gets wrong are the hard slice; its own samples at the runs' temperature (group size, seeded) mark
   the prompts where they all fail (a slice defined by the start, not by any arm). Written once to
   results/<name>/hard_slice.json with the start's pool and dev scores; a rerun reads it and never rewrites it.
2. run: every (arm, seed) in its own process, checkpoints every --eval-every steps; an interrupted run
   resumes, a finished one is reused.
3. score: every checkpoint answers the pool greedily (kept in <run>/study/step-<k>.json).
4. report: results.json, results.md (per-seed values, mean, sample std, paired differences with their
   intervals) and curves.png under results/<name>/; the per-step metrics of every run are copied beside them.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data as D  # noqa: E402
import eval as E  # noqa: E402
import rewards as R  # noqa: E402
from helpers import models  # noqa: E402
from helpers.runs import code_version  # noqa: E402

B = ["--no-rrs", "--agr-tau", "0", "--agr-correction", "is"]  # AGR on all-fail groups, forced tokens at full weight
OWN_NLL = ["--agr-advantage", "own", "--agr-mix", "append", "--agr-nll-weight", "1"]
ARMS = {  # name -> (script, flags); agr-study-tiny ran A, B, C; agr-screening the rest (its PLAN.md)
    "A": ("grpo.py", []),
    "B": ("agrl.py", B),
    "C": ("agrl.py", []),
    "A-kl": ("grpo.py", ["--beta", "0.04"]),  # KL to the start against GRPO's collapse
    "B0": ("agrl.py", [*B, "--no-agr-replay-fresh"]),  # B at GRPO's step size: the current rule
    "own-nll": ("agrl.py", [*B, *OWN_NLL]),
    "no-replay": ("agrl.py", [*B, "--agr-buffer-size", "0"]),
    "forced-0": ("agrl.py", [*B, "--no-agr-replay-fresh", "--agr-forced-weight", "0"]),
    "k1": ("agrl.py", [*B, "--no-agr-replay-fresh", "--agr-k", "1"]),
    "half-prefix": ("agrl.py", [*B, "--no-agr-replay-fresh", "--agr-prefix-frac", "0.5"]),
    "cand": ("agrl.py", [*B, *OWN_NLL, "--agr-buffer-size", "0"]),
    "cand-rrs": ("agrl.py", [*B[1:], *OWN_NLL, "--agr-buffer-size", "0"]),  # B without --no-rrs
    # added after seed 13's first runs (README): stagnant prompts are not re-queued, so every step's prompts are
    # fresh ones as in GRPO (re-queued all-fail prompts took up to half of each batch)
    "cand-nq": ("agrl.py", [*B, *OWN_NLL, "--agr-buffer-size", "0", "--agr-replay-delay", "0"]),
    "grpo": ("grpo.py", []),  # agr-confirmation: each script with its shipped defaults
    "agrl": ("agrl.py", []),
}
PALETTE = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
PALETTE += ["tab:olive", "tab:cyan", "black", "gold"]
T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365}  # two-sided 95%, by number of seeds


@dataclass
class Args:
    start: str = "runs/sft-start-tiny-tf1000/checkpoint"
    """SFT checkpoint every arm starts from (its run folder's args.json gives the output order)"""
    name: str = "agr-study-tiny"
    """study name: results/<name>/ (PLAN.md there) and runs/<name>-<arm>-s<seed>/"""
    arms: tuple[str, ...] = ("A", "B", "C")
    """arms to run (names in ARMS; the first is the baseline every other arm is paired against)"""
    seeds: tuple[int, ...] = (11, 12, 13, 14)
    """RL seeds (sampling and prompt order), paired across arms"""
    data_seed: int = 7
    """world of the training pool (not the SFT's, which is 1)"""
    pool: int = 64
    """training prompts (the first of the data seed's shuffled train split)"""
    steps: int = 150
    """updates per run (one per step)"""
    eval_every: int = 25
    """steps between scored checkpoints"""
    dev_limit: int = 400
    """dev examples of each run's closing evaluation (eval.py's seeded sample)"""
    rl_flags: str = (
        "--prompts-per-step 4 --group-size 8 --max-new-tokens 96 --temperature 1.0 --lr 1e-3 "
        "--warmup-steps 5 --ds-max-tries 0 --prompt-sampling balanced"
    )
    """flags every arm shares (PLAN.md records the values chosen)"""
    jobs: int = 2
    """runs at a time (each with cores / jobs threads)"""
    output_dir: str = "runs"
    """where the runs go"""
    results_dir: str = "results"
    """where results/<name>/ is"""
    table_only: bool = False
    """start nothing: report what has finished"""
    score_run: str | None = None
    """internal: score one run folder's checkpoints and exit"""
    restate: bool = False
    """start nothing: re-state AGR's rates of the committed per-step metrics, weighted by attempts (restated.md)"""


def commit() -> str:
    """The code's commit as one string (what args.json records as code.commit and code.dirty)."""
    code = code_version()
    return f"{code['commit']}{'-dirty' if code['dirty'] else ''}"


def start_order(start: str) -> str:
    args_file = Path(start).parent / "args.json"
    return json.loads(args_file.read_text())["order"] if args_file.exists() else "label_first"


def max_new_tokens(args: Args) -> int:
    flags = args.rl_flags.split()
    return int(flags[flags.index("--max-new-tokens") + 1])


def answer(model_dir: str, examples, order: str, new_tokens: int) -> list[dict]:
    """Greedy answers of a checkpoint: per example gold, predicted label, correct."""
    model, tokenizer = models.load_model(model_dir, "cpu")
    _, records = E.evaluate(model, tokenizer, examples, D.TAOBAO4, order, max_new_tokens=new_tokens, batch_size=32)
    return [dict(gold=r["gold"], predicted=r["predicted"], correct=r["correct"]) for r in records]


def pool_examples(args: Args):
    return D.load_dataset("synthetic", "train", seed=args.data_seed, limit=args.pool).examples


def dev_examples(args: Args):
    return D.load_dataset("synthetic", "dev", seed=0, limit=args.dev_limit).examples  # what final_eval scores


def flag(args: Args, name: str, default: str) -> str:
    flags = args.rl_flags.split()
    return flags[flags.index(name) + 1] if name in flags else default


def start_all_fail(args: Args, examples, order: str, new_tokens: int) -> list[int]:
    """Pool prompts on which the start's own samples (group size, run temperature, seeded) are all wrong."""
    from helpers import rollouts

    model, tokenizer = models.load_model(args.start, "cpu")
    n, temperature = int(flag(args, "--group-size", "8")), float(flag(args, "--temperature", "1.0"))
    prompts = [D.encode_prompt(tokenizer, e, D.TAOBAO4, order)[0] for e in examples]
    out = rollouts.generate(
        model,
        tokenizer,
        prompts,
        n=n,
        max_new_tokens=new_tokens,
        temperature=temperature,
        seeds=list(range(len(prompts))),
    )
    right = [
        any(R.score_output(t, e.label, e.criteria, D.TAOBAO4, order).correct for t in out.texts[i * n : (i + 1) * n])
        for i, e in enumerate(examples)
    ]
    return [i for i, ok in enumerate(right) if not ok]


def freeze_hard_slice(args: Args, out: Path) -> dict:
    path = out / "hard_slice.json"
    if path.exists():
        return json.loads(path.read_text())
    order, new_tokens = start_order(args.start), max_new_tokens(args)
    pool = answer(args.start, pool_examples(args), order, new_tokens)
    dev = answer(args.start, dev_examples(args), order, new_tokens)
    all_fail = start_all_fail(args, pool_examples(args), order, new_tokens)
    frozen = dict(
        start=args.start,
        commit=commit(),
        data_seed=args.data_seed,
        pool=args.pool,
        order=order,
        max_new_tokens=new_tokens,
        hard=[i for i, r in enumerate(pool) if not r["correct"]],
        start_all_fail=all_fail,
        start_pool=pool,
        start_dev=dev,
        frozen_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    path.write_text(json.dumps(frozen, indent=1))
    print(f"froze the hard slice: {len(frozen['hard'])} of {args.pool} pool prompts answered wrong by the start")
    return frozen


def run_dir_of(args: Args, arm: str, seed: int) -> Path:
    return Path(args.output_dir) / f"{args.name}-{arm}-s{seed}"


def command_of(args: Args, arm: str, seed: int, order: str) -> list[str]:
    script, flags = ARMS[arm]
    run_dir = run_dir_of(args, arm, seed)
    return [
        sys.executable,
        script,
        "--model",
        args.start,
        "--dataset",
        "synthetic",
        "--data-seed",
        str(args.data_seed),
        "--limit",
        str(args.pool),
        "--order",
        order,
        *args.rl_flags.split(),
        *flags,
        "--seed",
        str(seed),
        "--total-steps",
        str(args.steps),
        "--save-every",
        str(args.eval_every),
        "--keep-last",
        "1000",
        "--eval-limit",
        str(args.dev_limit),
        "--device",
        "cpu",
        "--output-dir",
        args.output_dir,
        "--run-name",
        run_dir.name,
        *(["--resume"] if (run_dir / "args.json").exists() else []),
    ]


def run_and_score(args: Args, arm: str, seed: int, order: str, threads: int) -> None:
    run_dir = run_dir_of(args, arm, seed)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if not (run_dir / "eval.json").exists():
        command = command_of(args, arm, seed, order)
        print("$", " ".join(command[1:]), flush=True)
        started = time.time()
        log = Path(args.output_dir) / f"{run_dir.name}.log"
        with open(log, "a") as f:
            code = subprocess.call(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        (run_dir / "study_commit.txt").write_text(commit() + "\n")
        if code not in (0, 1):  # 1: a run that stopped (empty steps) and still saved and evaluated what it had
            raise SystemExit(f"{run_dir.name} failed ({code}); see {log}")
        print(f"  {run_dir.name} done in {time.time() - started:.0f}s", flush=True)
    subprocess.check_call([sys.executable, __file__, "--score-run", str(run_dir), *sys.argv[1:]], cwd=ROOT, env=env)


def score_run(args: Args, run_dir: Path) -> None:
    """Greedy pool answers of each kept checkpoint (step-k) and of the final export, once each."""
    order, new_tokens = start_order(args.start), max_new_tokens(args)
    examples = pool_examples(args)
    (run_dir / "study").mkdir(exist_ok=True)
    for folder in sorted((run_dir / "checkpoints").glob("step-???????")):
        out = run_dir / "study" / f"{folder.name}.json"
        if not out.exists():
            out.write_text(json.dumps(answer(str(folder), examples, order, new_tokens)))


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
def accuracy(records: list[dict], where: list[int]) -> float:
    return sum(records[i]["correct"] for i in where) / len(where) if where else float("nan")


def scores(records: list[dict], hard: list[int]) -> dict:
    everything = list(range(len(records)))
    easy = [i for i in everything if i not in set(hard)]
    m = E.classification_metrics([r["gold"] for r in records], [r["predicted"] for r in records], D.TAOBAO4.labels)
    present = [label for label, c in m["per_class"].items() if c["support"]]
    return dict(
        hard=accuracy(records, hard),
        easy=accuracy(records, easy),
        accuracy=m["accuracy"],
        macro_f1=m["macro_f1"],
        balanced_accuracy=sum(m["per_class"][label]["recall"] for label in present) / len(present),
        f1={label: c["f1"] for label, c in m["per_class"].items()},
        hard_predicted={
            label: sum(records[i]["predicted"] == label for i in hard) / max(1, len(hard))
            for label in (*D.TAOBAO4.labels, None)
        },
    )


def mean_std(xs: list[float]) -> dict:
    n, m = len(xs), sum(xs) / len(xs)
    std = (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5 if n > 1 else float("nan")  # sample std
    half = T_975.get(n, 1.96) * std / n**0.5 if n > 1 else float("nan")
    return dict(values=xs, mean=m, std=std, ci95=[m - half, m + half])


def bootstrap(
    metric, records_a: list[list[dict]], records_b: list[list[dict]], where: list[int], n: int = 2000
) -> list[float]:
    """95% interval of mean over seeds of metric(b) - metric(a), resampling the examples (paired: the same
    resample for both arms and every seed)."""
    rng, diffs = random.Random(0), []
    for _ in range(n):
        pick = [rng.choice(where) for _ in where]
        diffs.append(
            sum(metric([b[i] for i in pick]) - metric([a[i] for i in pick]) for a, b in zip(records_a, records_b))
            / len(records_a)
        )
    diffs.sort()
    return [diffs[int(0.025 * n)], diffs[int(0.975 * n) - 1]]


def macro_f1(records: list[dict]) -> float:
    return E.classification_metrics([r["gold"] for r in records], [r["predicted"] for r in records], D.TAOBAO4.labels)[
        "macro_f1"
    ]


def hard_accuracy(records: list[dict]) -> float:
    return sum(r["correct"] for r in records) / len(records)


def attempt_weighted(metrics: list[dict], group_size: int = 8, n_groups: int = 4) -> dict:
    """AGR's rates over a run, weighted by their attempts (a step that tried nothing counts for nothing):
    kept guided answers per guided answer tried, and stagnant groups rescued per stagnant group that was not
    replayed. Older runs logged only the per-step rates (0 on a step without attempts); their attempts are
    rebuilt from the level counts (K = group_size // 4 answers a guided group) and the shares of the step's
    n_groups groups (prompts per step: those runs had no refills)."""
    tried = kept = rescued = guidable = 0.0
    for m in metrics:
        if "agr_stagnant_share" not in m:
            return dict(kept_rate=None, rescued_share=None)
        if "agr_guided_tried" in m:
            tried, kept = tried + m["agr_guided_tried"], kept + m["agr_guided_kept"]
            rescued, guidable = rescued + m["agr_groups_guided"], guidable + m["agr_groups_guidable"]
            continue
        attempts = (m["agr_level_1"] + m["agr_level_2"]) * max(1, group_size // 4)
        tried, kept = tried + attempts, kept + m["agr_guided_success_rate"] * attempts
        stagnant = round(m["agr_stagnant_share"] * n_groups)
        guided = round(m["agr_guided_share"] * n_groups) - m["agr_buffer_hits"]
        rescued, guidable = rescued + guided, guidable + stagnant - m["agr_buffer_hits"]
    return dict(
        kept_rate=kept / tried if tried else None,
        rescued_share=rescued / guidable if guidable else None,
        tried=tried,
        guidable=guidable,
    )


def own_adherence(metrics: list[dict], window: int = 25) -> dict:
    """Rule adherence of the policy's own samples over the first and the last `window` updates."""
    first, last = metrics[:window], metrics[-window:]
    return dict(
        first=sum(m["adherence_rate"] for m in first) / len(first),
        last=sum(m["adherence_rate"] for m in last) / len(last),
    )


def read_metrics(run_dir: Path) -> list[dict]:
    by_step = {m["step"]: m for m in map(json.loads, open(run_dir / "metrics.jsonl"))}
    return [by_step[step] for step in sorted(by_step)]


def report(args: Args, frozen: dict, out: Path) -> dict:
    hard, base = frozen["hard"], args.arms[0]
    sizes = int(flag(args, "--group-size", "8")), int(flag(args, "--prompts-per-step", "4"))
    all_fail = set(frozen.get("start_all_fail", []))
    slices = dict(  # parts of the hard slice fixed by the start, the same for every arm
        hard_start_all_fail=[i for i in hard if i in all_fail],
        hard_start_some_right=[i for i in hard if i not in all_fail],
    )
    start_pool, start_dev = scores(frozen["start_pool"], hard), scores(frozen["start_dev"], [])
    runs, missing = {}, []
    for arm in args.arms:
        for seed in args.seeds:
            run_dir = run_dir_of(args, arm, seed)
            scored = sorted((run_dir / "study").glob("step-???????.json"))
            if not scored or not (run_dir / "eval.json").exists():
                missing.append(run_dir.name)
                continue
            final = scored[-1]  # the last step, or where a run stopped for empty steps
            curve = {int(p.stem[5:]): scores(json.loads(p.read_text()), hard) for p in scored}
            dev = [json.loads(line) for line in open(run_dir / "eval_samples.jsonl")]
            metrics, closing = read_metrics(run_dir), json.loads((run_dir / "eval.json").read_text())
            (out / "metrics").mkdir(exist_ok=True)
            shutil.copy(run_dir / "metrics.jsonl", out / "metrics" / f"{run_dir.name}.jsonl")
            runs[arm, seed] = dict(
                pool=curve[max(curve)],
                curve=curve,
                dev=scores(dev, []),
                dev_records=dev,
                pool_records=json.loads(final.read_text()),
                command=" ".join(command_of(args, arm, seed, frozen["order"])[1:]).replace(" --resume", ""),
                commit=(run_dir / "study_commit.txt").read_text().strip()
                if (run_dir / "study_commit.txt").exists()
                else None,
                update_scale=sum(m["update_scale"] for m in metrics) / len(metrics),
                completions=metrics[-1]["completions_generated"],
                steps=len(metrics),
                all_fail=[m["all_fail_groups"] for m in metrics],
                rescued=[m.get("agr_rescued_share") for m in metrics],
                own_adherence=own_adherence(metrics),
                agr_rates=dict(
                    run=attempt_weighted(metrics, *sizes),
                    first_25=attempt_weighted(metrics[:25], *sizes),
                    last_25=attempt_weighted(metrics[-25:], *sizes),
                ),
                collapsed_steps=sum(
                    max(m.get(f"label_share_{label}", 0) for label in D.TAOBAO4.labels) >= 0.9 for m in metrics
                ),
                format=closing["format_rate"],
                adherence=closing["adherence_rate"],
                touched=agr_touch(run_dir, hard),
            )
    results = dict(
        name=args.name,
        plan=f"results/{args.name}/PLAN.md",
        start=args.start,
        data_seed=args.data_seed,
        pool=args.pool,
        hard_slice=len(hard),
        seeds=list(args.seeds),
        steps=args.steps,
        rl_flags=args.rl_flags,
        arms={arm: ARMS[arm] for arm in args.arms},
        start_pool=start_pool,
        start_dev=start_dev,
        missing_runs=missing,
        runs={},
        arms_summary={},
        differences={},
    )
    for (arm, seed), r in runs.items():
        results["runs"][f"{arm}-s{seed}"] = {k: v for k, v in r.items() if k != "dev_records"}
        results["runs"][f"{arm}-s{seed}"]["slices"] = {
            name: accuracy(r["pool_records"], where) for name, where in slices.items()
        }
    results["slices"] = {name: len(where) for name, where in slices.items()}
    for arm in args.arms:
        done = [runs[arm, s] for s in args.seeds if (arm, s) in runs]
        if done:
            results["arms_summary"][arm] = {key: mean_std([get(r) for r in done]) for key, get in SUMMARY.items()}
    for arm in args.arms[1:]:
        paired = [s for s in args.seeds if (base, s) in runs and (arm, s) in runs]
        if not paired:
            continue
        a, b = [runs[base, s] for s in paired], [runs[arm, s] for s in paired]
        results["differences"][f"{arm}-{base}"] = dict(
            seeds=paired,
            hard=mean_std([y["pool"]["hard"] - x["pool"]["hard"] for x, y in zip(a, b)]),
            hard_bootstrap=bootstrap(
                hard_accuracy, [x["pool_records"] for x in a], [y["pool_records"] for y in b], hard
            ),
            easy=mean_std([y["pool"]["easy"] - x["pool"]["easy"] for x, y in zip(a, b)]),
            dev_macro_f1=mean_std([y["dev"]["macro_f1"] - x["dev"]["macro_f1"] for x, y in zip(a, b)]),
            dev_macro_f1_bootstrap=bootstrap(
                macro_f1,
                [x["dev_records"] for x in a],
                [y["dev_records"] for y in b],
                list(range(len(a[0]["dev_records"]))),
            ),
            own_adherence_last_25=mean_std(
                [y["own_adherence"]["last"] - x["own_adherence"]["last"] for x, y in zip(a, b)]
            ),
            dev_adherence=mean_std([y["adherence"] - x["adherence"] for x, y in zip(a, b)]),
            **{
                name: mean_std(
                    [accuracy(y["pool_records"], where) - accuracy(x["pool_records"], where) for x, y in zip(a, b)]
                )
                for name, where in slices.items()
                if where
            },
        )
    for arm in args.arms[1:]:  # the hard prompts AGR guided against those it never did (selected by the arm itself)
        paired = [s for s in args.seeds if (base, s) in runs and (arm, s) in runs and runs[arm, s]["touched"]]
        if paired:
            parts = {}
            for s in paired:
                a, b, guided = (
                    runs[base, s]["pool_records"],
                    runs[arm, s]["pool_records"],
                    set(runs[arm, s]["touched"]["guided"]),
                )
                for part, where in (
                    ("guided", [i for i in hard if i in guided]),
                    ("never_guided", [i for i in hard if i not in guided]),
                ):
                    parts.setdefault(part, []).append(dict(n=len(where), a=accuracy(a, where), b=accuracy(b, where)))
            results["differences"].setdefault(f"{arm}-{base}", {})["by_guidance"] = parts
    results["report_commit"] = commit()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    plot(runs, args, out / "curves.png", start_pool)
    return results


def agr_touch(run_dir: Path, hard: list[int]) -> dict | None:
    """Which hard prompts AGR acted on by the end (from the last checkpoint's AGR state): ever all-fail
    (stagnant), and with a kept guided answer in the replay buffer. None for a run without AGR."""
    import torch

    last = sorted((run_dir / "checkpoints").glob("step-???????"))[-1]
    state = torch.load(last / "train_state.pt", weights_only=True, map_location="cpu").get("agr_state")
    if state is None:
        return None
    return dict(
        stagnant=[i for i in hard if state.get(i, {}).get("stagnant_ever")],
        guided=[i for i in hard if state.get(i, {}).get("buffer")],
    )


SUMMARY = {
    "hard": lambda r: r["pool"]["hard"],
    "easy": lambda r: r["pool"]["easy"],
    "pool_accuracy": lambda r: r["pool"]["accuracy"],
    "pool_macro_f1": lambda r: r["pool"]["macro_f1"],
    "pool_balanced_accuracy": lambda r: r["pool"]["balanced_accuracy"],
    "dev_macro_f1": lambda r: r["dev"]["macro_f1"],
    "dev_accuracy": lambda r: r["dev"]["accuracy"],
    "dev_balanced_accuracy": lambda r: r["dev"]["balanced_accuracy"],
    "dev_format": lambda r: r["format"],
    "dev_adherence": lambda r: r["adherence"],
    "update_scale": lambda r: r["update_scale"],
    "completions": lambda r: r["completions"],
    "own_adherence_last_25": lambda r: r["own_adherence"]["last"],
    "collapsed_steps": lambda r: r["collapsed_steps"],
}


def markdown(results: dict) -> str:
    f = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f} ({', '.join(f'{v:.3f}' for v in d['values'])})"  # noqa: E731
    sp, sd = results["start_pool"], results["start_dev"]
    lines = [
        f"# {results['name']}: results",
        "",
        f"Plan: `{results['plan']}`. Start `{results['start']}`; pool: {results['pool']} prompts of data seed "
        f"{results['data_seed']}, hard slice {results['hard_slice']} (answered wrong by the start, frozen before the "
        f"runs); {results['steps']} updates a run; RL seeds {results['seeds']}. Values: mean ± sample std (per seed).",
        "",
        *([f"**Partial**: not finished: {', '.join(results['missing_runs'])}.", ""] if results["missing_runs"] else []),
        "| | hard slice acc | easy acc | pool acc | pool macro-F1 | pool balanced acc | dev macro-F1 | dev acc | "
        "dev balanced acc | dev format | dev adherence | mean update_scale | completions | own adherence, last 25 "
        "| steps with one label >= 0.9 |",
        "|---" * 15 + "|",
        f"| start | {sp['hard']:.3f} | {sp['easy']:.3f} | {sp['accuracy']:.3f} | {sp['macro_f1']:.3f} | "
        f"{sp['balanced_accuracy']:.3f} | {sd['macro_f1']:.3f} | {sd['accuracy']:.3f} | {sd['balanced_accuracy']:.3f} "
        "| - | - | - | - | - | - |",
    ]
    for arm, s in results["arms_summary"].items():
        lines.append(f"| {arm} | " + " | ".join(f(s[k]) for k in SUMMARY) + " |")
    lines += [
        "",
        "Paired differences (per seed, then mean ± sample std, 95% t interval over seeds, and a 95% bootstrap "
        "interval resampling the examples):",
        "",
        "| | seeds | hard slice acc | t interval | bootstrap | easy acc | dev macro-F1 | t interval | bootstrap "
        "| own adherence, last 25 | dev adherence |",
        "|---" * 11 + "|",
    ]
    for name, d in results["differences"].items():
        lines.append(
            f"| {name} | {len(d['seeds'])} | {f(d['hard'])} | [{d['hard']['ci95'][0]:+.3f}, {d['hard']['ci95'][1]:+.3f}] | "
            f"[{d['hard_bootstrap'][0]:+.3f}, {d['hard_bootstrap'][1]:+.3f}] | {f(d['easy'])} | {f(d['dev_macro_f1'])} | "
            f"[{d['dev_macro_f1']['ci95'][0]:+.3f}, {d['dev_macro_f1']['ci95'][1]:+.3f}] | "
            f"[{d['dev_macro_f1_bootstrap'][0]:+.3f}, {d['dev_macro_f1_bootstrap'][1]:+.3f}] | "
            f"{f(d['own_adherence_last_25'])} | {f(d['dev_adherence'])} |"
        )
    lines += [
        "",
        f"The hard slice split by the start's own samples (frozen before the runs, the same for every arm; sizes "
        f"{results.get('slices', {})}): paired differences",
        "",
    ]
    for name, d in results["differences"].items():
        parts = [f"{k}: {f(d[k])}" for k in ("hard_start_all_fail", "hard_start_some_right") if k in d]
        if parts:
            lines.append(f"- {name}: " + "; ".join(parts))
    lines += [
        "",
        "AGR's rates weighted by attempts (kept guided answers / tried; rescued / guidable stagnant groups), "
        "whole run, first 25 and last 25 updates, per seed:",
        "",
    ]
    for key, r in results["runs"].items():
        rates = r.get("agr_rates", {})
        if rates.get("run", {}).get("kept_rate") is not None:
            lines.append(
                f"- {key}: "
                + "; ".join(
                    f"{part} kept {v['kept_rate'] if v['kept_rate'] is None else round(v['kept_rate'], 2)}, "
                    f"rescued {v['rescued_share'] if v['rescued_share'] is None else round(v['rescued_share'], 2)}"
                    for part, v in rates.items()
                )
            )
    lines += [
        "",
        "Hard slice: predicted-label shares at the end (mean over seeds) and per-class dev F1:",
        "",
        "| | "
        + " | ".join(f"hard: {k}" for k in sp["hard_predicted"])
        + " | "
        + " | ".join(f"dev F1 {k}" for k in sd["f1"])
        + " |",
        "|---" * (1 + len(sp["hard_predicted"]) + len(sd["f1"])) + "|",
        "| start | "
        + " | ".join(f"{v:.2f}" for v in sp["hard_predicted"].values())
        + " | "
        + " | ".join(f"{v:.3f}" for v in sd["f1"].values())
        + " |",
    ]
    for arm in results["arms_summary"]:
        mine = [r for k, r in results["runs"].items() if k.rsplit("-s", 1)[0] == arm]
        hp = {
            k: sum(r["pool"]["hard_predicted"][k] for r in mine) / len(mine) for k in mine[0]["pool"]["hard_predicted"]
        }
        f1 = {k: sum(r["dev"]["f1"][k] for r in mine) / len(mine) for k in mine[0]["dev"]["f1"]}
        lines.append(
            f"| {arm} | "
            + " | ".join(f"{v:.2f}" for v in hp.values())
            + " | "
            + " | ".join(f"{v:.3f}" for v in f1.values())
            + " |"
        )
    lines += [
        "",
        "The hard prompts AGR guided (a kept guided answer by the end) and those it never did, per seed: "
        "n, A's and the arm's greedy accuracy on them at the end:",
        "",
    ]
    for name, d in results["differences"].items():
        for part, rows in d.get("by_guidance", {}).items():
            lines.append(
                f"- {name}, {part}: " + "; ".join(f"n {r['n']}: A {r['a']:.2f}, {name[0]} {r['b']:.2f}" for r in rows)
            )
    lines += ["", "Commands (each run's commit is in results.json):", ""]
    lines += [f"    {r['command']}" for r in results["runs"].values()]
    return "\n".join(lines) + "\n"


def plot(runs: dict, args: Args, path: Path, start_pool: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(xs, w=10):
        xs = [x for x in xs if x is not None] or [0.0]
        return [sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]

    panels = [
        ("hard slice accuracy (greedy)", "hard"),
        ("pool macro-F1 (greedy)", "macro_f1"),
        ("all-fail share of own groups", "all_fail"),
        ("rescued share of stagnant groups", "rescued"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 4.2))
    for ax, (title, key) in zip(axes, panels):
        for arm in args.arms:
            mine = [r for (a, _), r in runs.items() if a == arm]
            if not mine:
                continue
            if key in ("hard", "macro_f1"):
                steps = [0] + sorted(mine[0]["curve"])  # a run stopped early has its last point at its own step
                ys = [[start_pool[key]] + [r["curve"][s][key] for s in sorted(r["curve"])] for r in mine]
            else:
                ys = [smooth(r[key]) for r in mine]
                steps = list(range(1, len(ys[0]) + 1))
                if key == "rescued" and all(v is None for r in mine for v in r["rescued"]):
                    continue
            n = min(map(len, ys))
            mean = [sum(col) / len(col) for col in zip(*(y[:n] for y in ys))]
            color = PALETTE[args.arms.index(arm) % len(PALETTE)]  # an arm keeps its colour in every panel
            ax.plot(steps[:n], mean, label=arm, color=color)
            low, high = [min(c) for c in zip(*(y[:n] for y in ys))], [max(c) for c in zip(*(y[:n] for y in ys))]
            ax.fill_between(steps[:n], low, high, alpha=0.15, color=color)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("update")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def restate(args: Args, out: Path) -> None:
    """AGR's rates of a finished study from its committed metrics/: per step averaged (as first reported, a step
    without attempts counting 0) against weighted by attempts."""
    sizes = int(flag(args, "--group-size", "8")), int(flag(args, "--prompts-per-step", "4"))
    lines = [
        f"# {args.name}: AGR's rates re-stated, weighted by attempts",
        "",
        "Made by `python benchmarks/agr_study.py --name " + args.name + " --restate` from the committed per-step "
        "metrics. 'per step' is the mean of the logged per-step rate over steps (a step that tried nothing logged 0: "
        "the figure first reported); 'weighted' divides the summed counts.",
        "",
        "| run | part | kept guided answers: per step | weighted | tried | rescued share: per step | weighted |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in sorted((out / "metrics").glob("*.jsonl")):
        metrics = [json.loads(line) for line in open(path)]
        if "agr_stagnant_share" not in metrics[0]:
            continue
        for part, window in (("first 25", metrics[:25]), ("last 25", metrics[-25:]), ("run", metrics)):
            w = attempt_weighted(window, *sizes)
            per_step = lambda key: sum(m[key] or 0 for m in window) / len(window)  # noqa: E731
            show = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
            lines.append(
                f"| {path.stem} | {part} | {per_step('agr_guided_success_rate'):.2f} | {show(w['kept_rate'])} | "
                f"{w['tried']:.0f} | {per_step('agr_rescued_share'):.2f} | {show(w['rescued_share'])} |"
            )
    (out / "restated.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(args: Args) -> None:
    if args.score_run:
        return score_run(args, Path(args.score_run))
    out = Path(args.results_dir) / args.name
    if args.restate:
        return restate(args, out)
    if not (out / "PLAN.md").exists():
        raise SystemExit(f"{out}/PLAN.md is missing: commit the plan before the study's first run")
    frozen = freeze_hard_slice(args, out)
    if not args.table_only:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]  # seed by seed: paired results arrive together
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run_and_score(args, *job, frozen["order"], threads), jobs))
    results = report(args, frozen, out)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.md, results.json, curves.png ({len(results['missing_runs'])} runs missing)")


if __name__ == "__main__":
    main(tyro.cli(Args))
