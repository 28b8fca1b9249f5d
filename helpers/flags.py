"""The flags every script shares, declared once: each script's `Args` extends `CommonFlags` (eval.py) or
`TrainFlags` (sft, dpo, grpo, agrl) with its own.

Whether a flag may change when a run is resumed is said where the flag is declared: `may_change_on_resume`
marks how long a run goes, how it evaluates, logs and saves, and where it runs. Any other difference
(model, data, sizes, learning rate, reward weights, ...) would make the resumed run a different run from
the one its checkpoint and metrics come from, so `--resume` refuses it (runs.prepare_run_dir).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal


def may_change_on_resume(default):
    """The default of a flag that `--resume` accepts a new value of (the change is recorded in args.json)."""
    return field(default=default, metadata={"may_change_on_resume": True})


def changeable_on_resume(args) -> set[str]:
    """The names of the flags of this Args dataclass that a resumed run may change."""
    return {f.name for f in fields(args) if f.metadata.get("may_change_on_resume")}


@dataclass
class CommonFlags:
    """Every script's flags: the model, the data, the seeds, the device and the run folder."""

    model: str = "smollm2-135m"
    """alias (smollm2-135m, tiny-random), hub id, bare name or directory; a training stage usually starts from the previous stage's checkpoint"""
    dataset: str = "synthetic"
    """synthetic | esci | jsonl | csv | parquet"""
    data_path: str | None = None
    """file or folder of the dataset (not needed for synthetic)"""
    split: str = "train"
    """split to train on: train | dev | test (a single data file has train and dev; all: the whole file)"""
    field_map: str | None = None
    """for jsonl/csv: our_field=their_column pairs, comma separated"""
    label_map: str | None = None
    """for jsonl/csv: raw=Label pairs or >=threshold:Label rules"""
    rulebook: str | None = None
    """label set for jsonl/csv data: taobao4 | esci"""
    skip_bad_rows: bool = False
    """skip malformed rows (each reported in the run folder) instead of stopping"""
    limit: int | None = None
    """use a seeded sample of this many examples (None: all)"""
    order: Literal["label_first", "think_first"] = "label_first"
    """output order: label then reasoning (post-CoT, default) or reasoning then label"""
    max_item_tokens: int = 256
    """token budget of the item text in the prompt (longer texts are truncated and counted)"""
    seed: int = 1
    """seed of data order, sampling and initialisation"""
    data_seed: int | None = None
    """seed of the synthetic world and of --limit's sample (None: --seed); fix it to vary only the RL seed"""
    device: str = may_change_on_resume("auto")
    """auto | cpu | cuda"""
    output_dir: str = may_change_on_resume("runs")
    """where run folders go"""
    run_name: str | None = may_change_on_resume(None)
    """run folder name (default <script>-<model>-<dataset>-s<seed>; eval.py: eval-<model>-<dataset>-<split>)"""
    track: bool = may_change_on_resume(False)
    """log to wandb (offline unless logged in)"""
    wandb_project: str = may_change_on_resume("agrl")
    """wandb project"""
    wandb_group: str | None = may_change_on_resume(None)
    """wandb group (a pipeline puts its stages in one group)"""
    resume: bool = may_change_on_resume(False)
    """continue from the run folder's last valid checkpoint"""
    overwrite: bool = may_change_on_resume(False)
    """delete a previous run in the run folder and start clean (without it, a used folder is refused)"""


@dataclass
class TrainFlags(CommonFlags):
    """The training scripts' flags besides: the final evaluation, checkpoints, processes and precision."""

    eval_split: str = may_change_on_resume("dev")
    """split evaluated at the end"""
    eval_limit: int | None = may_change_on_resume(200)
    """examples evaluated at the end (None: the whole split)"""
    max_nan_skips: int = may_change_on_resume(10)
    """stop after this many consecutive updates with a NaN/inf loss or gradient"""
    keep_last: int = may_change_on_resume(2)
    """checkpoints kept"""
    num_gpus: int = may_change_on_resume(1)
    """processes: >1 relaunches under accelerate (FSDP on GPUs, gloo DDP on CPU)"""
    strategy: Literal["auto", "ddp", "fsdp"] = may_change_on_resume("auto")
    """with several processes: auto (FSDP on GPUs, DDP on CPU), ddp (a whole model per process), fsdp (sharded; also on CPU)"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 compute over fp32 master weights and AdamW states on GPUs, fp32 on CPU; bf16: that mixed precision anywhere"""
    gradient_checkpointing: Literal["auto", "on", "off"] = may_change_on_resume("auto")
    """recompute activations in the backward pass instead of keeping them (auto: on for GPUs)"""
    dry_run: bool = may_change_on_resume(False)
    """print the resolved model, launch command, parallel plan and per-GPU memory estimate, then exit (loads no weights)"""


# `--help` shows each script's flags by concern, in this order (cli.print_help); the flags themselves stay flat
# (`--lr`, not `--loss.lr`). Every field of every script's Args is in exactly one group (tests/test_cli.py); a
# flag missing here (say, one added to a copied script) is shown under "other".
HELP_GROUPS = {
    "model": "model order max_item_tokens",
    "data": "dataset data_path split field_map label_map rulebook skip_bad_rows limit data_seed prompt_sampling "
    "balanced",
    "training": "total_steps generation_budget seed lr warmup_steps weight_decay max_grad_norm batch_size grad_accum "
    "micro_batch_size num_updates_per_batch label_weight max_nan_skips max_empty_steps",
    "generation": "prompts_per_step group_size max_new_tokens min_new_tokens temperature top_p gen_batch_size vllm "
    "vllm_gpu_memory vllm_sleep",
    "dynamic sampling": "dynamic_sampling ds_rule ds_low ds_high ds_max_tries underfill_scale",
    "DPO pairs": "n_samples sample_temperature pairs_per_prompt sample_margin sample_all pairs_path",
    "loss and reward": "beta loss clip_eps_low clip_eps_high loss_agg adv_scale adv_clamp ordinal_reward "
    "recompute_old_logprobs",
    "RRS (rule-aware reward shaping)": "rrs rrs_credit w_out w_crit w_rule format_penalty",
    "AGR (adaptive guided replay)": "agr agr_tau agr_guide agr_mix agr_k agr_max_level agr_recover agr_ema "
    "agr_correction agr_gamma agr_is_cap agr_advantage agr_nll_weight agr_forced_weight agr_prefix_frac "
    "agr_prefix_anneal agr_replay_fresh agr_buffer_size agr_replay_delay agr_replay_queue",
    "evaluation": "eval_split eval_limit label_only tier_threshold compare",
    "logging and run folder": "output_dir run_name resume overwrite dry_run track wandb_project wandb_group log_every "
    "log_samples_every save_every keep_last",
    "scale-out": "device num_gpus strategy precision gradient_checkpointing shared_prefix",
}


def help_groups(args_class) -> list[tuple[str, list[str]]]:
    """(group, field names) in HELP_GROUPS' order, the empty groups left out. eval.py trains nothing: its seed
    and batch size (under "training" in the other scripts) are the evaluation's."""
    listed = [(group, name) for group, names in HELP_GROUPS.items() for name in names.split()]
    declared = [f.name for f in fields(args_class)]
    evaluates_only = not issubclass(args_class, TrainFlags)
    groups = {group: [] for group in HELP_GROUPS}
    for group, name in listed:
        if name in declared:
            groups["evaluation" if evaluates_only and group == "training" else group].append(name)
    groups["other"] = [name for name in declared if name not in {name for _, name in listed}]
    return [(group, names) for group, names in groups.items() if names]
