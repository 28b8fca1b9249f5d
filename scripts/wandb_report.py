"""A wandb report for one pipeline: the stages of `scripts/pipeline.sh` share a `--wandb-group`.

    python scripts/wandb_report.py --group pipeline-synthetic-20261130-031500
    python scripts/wandb_report.py --group G --project agrl --entity my-team --runs-dir runs/pipeline-synthetic

Online (logged in, `pip install wandb-workspaces`), it saves a report with the group's training curves
(reward, accuracy, format, adherence, loss, KL, entropy, predicted label shares), the comparison table
of the runs' final evaluations, their confusion matrices and sample tables, and prints its URL. Offline
(no login, WANDB_MODE=offline, no network, or no wandb-workspaces), it prints what it would build and the
local runs of the group it found under --runs-dir, then `wandb sync` uploads them and the same command
builds the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

# (section, panel kind, metric keys): what the report shows, in order
PANELS = [
    (
        "Training curves",
        "line",
        [
            "reward_mean",
            "accuracy",
            "format_rate",
            "adherence_rate",
            "loss",
            "approx_kl",
            "entropy",
            "groups_kept",
            "agr_guided_share",
            "reward_margin",
        ],
    ),
    ("Predicted label shares", "line", ["label_share_*"]),
    (
        "Final evaluation",
        "comparison table",
        ["eval/accuracy", "eval/macro_f1", "eval/format_rate", "eval/adherence_rate", "eval/n"],
    ),
    ("Confusion matrices", "media", ["eval/confusion"]),
    ("Samples", "table", ["samples"]),
]


@dataclass
class Args:
    group: str
    """wandb group of the pipeline (its stages' --wandb-group; scripts/pipeline.sh writes it to <runs>/wandb_group)"""
    project: str = "agrl"
    """wandb project the runs were logged to"""
    entity: str | None = None
    """wandb entity (default: your default entity)"""
    runs_dir: str = "runs"
    """where to look for the group's local run folders (searched recursively for args.json)"""
    title: str | None = None
    """report title (default: the group)"""


def local_runs(runs_dir: Path, group: str) -> list[tuple[str, str, Path]]:
    """(run name, script, folder) of every local run whose args.json names this wandb group."""
    found = []
    for args_file in sorted(runs_dir.rglob("args.json")):
        try:
            args = json.loads(args_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if args.get("wandb_group") == group:
            found.append((args.get("run_name", args_file.parent.name), args.get("script", "?"), args_file.parent))
    return found


def why_offline() -> str | None:
    """Why the report cannot be saved now, or None."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return f"WANDB_MODE={os.environ['WANDB_MODE']}"
    try:
        import wandb_workspaces.reports.v2  # noqa: F401
    except ImportError:
        return "wandb-workspaces is not installed (pip install wandb-workspaces)"
    import wandb

    if not wandb.Api().api_key:
        return "not logged in (wandb login, or WANDB_API_KEY)"
    import socket

    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
    except OSError as e:
        return f"api.wandb.ai cannot be reached ({e})"
    return None


def plan(args: Args, runs: list[tuple[str, str, Path]]) -> str:
    lines = [f"report '{args.title or args.group}' in project {args.project}: runs of wandb group {args.group}"]
    for section, kind, keys in PANELS:
        lines.append(f"  {section}: {kind} of {', '.join(keys)}")
    lines.append(f"local runs of the group under {args.runs_dir}: {len(runs)}")
    lines += [f"  {name} ({script}.py) {folder}" for name, script, folder in runs]
    return "\n".join(lines)


def expand(keys: list[str], runs: list[tuple[str, str, Path]]) -> list[str]:
    """'label_share_*' -> the label_share keys the group's local runs logged (both rulebooks' labels if none)."""
    out = []
    for key in keys:
        if not key.endswith("*"):
            out.append(key)
            continue
        logged = set()
        for _, _, folder in runs:
            with contextlib.suppress(OSError, json.JSONDecodeError, IndexError):
                logged |= set(json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1]))
        prefix = key[:-1]
        found = sorted(k for k in logged if k.startswith(prefix))
        out += found or [
            prefix + label
            for label in (
                "Excellent",
                "Related",
                "Mismatch",
                "Irrelevant",
                "Exact",
                "Substitute",
                "Complement",
                "invalid",
            )
        ]
    return out


def build(args: Args, runs: list[tuple[str, str, Path]]):
    """Save the report with wandb's reports API; returns it (its .url)."""
    import wandb_workspaces.reports.v2 as wr

    runset = wr.Runset(
        entity=args.entity, project=args.project, name=args.group, filters=f"Metric('Group') == '{args.group}'"
    )
    blocks = [
        wr.H1(args.title or args.group),
        wr.P(f"The stages of the pipeline whose runs share the wandb group {args.group}."),
    ]
    for section, kind, keys in PANELS:
        if kind == "line":
            panels = [wr.LinePlot(x="Step", y=[key], title=key) for key in expand(keys, runs)]
        elif kind == "comparison table":
            panels = [wr.RunComparer(diff_only=False)]
        elif kind == "media":
            panels = [wr.MediaBrowser(media_keys=keys, num_columns=3)]
        else:
            panels = [wr.WeavePanelSummaryTable(table_name=key) for key in keys]
        blocks += [wr.H2(section), wr.PanelGrid(runsets=[runset], panels=panels)]
    report = wr.Report(
        entity=args.entity,
        project=args.project,
        title=args.title or args.group,
        description=f"wandb group {args.group}",
        blocks=blocks,
    )
    report.save()
    return report


def main(args: Args) -> int:
    runs = local_runs(Path(args.runs_dir), args.group)
    offline = why_offline()
    if offline and not runs:  # nothing to build, nothing to upload: most likely a typo in the group
        print(
            f"error: no run under {args.runs_dir} belongs to wandb group {args.group!r} (the wandb_group in its "
            "args.json; scripts/pipeline.sh writes a pipeline's group to <runs>/wandb_group)",
            file=sys.stderr,
        )
        return 2
    if offline:
        print(f"offline ({offline}): the report is not built. It would be:")
        print(plan(args, runs))
        if runs:
            print(
                "upload the runs with: wandb sync "
                + " ".join(str(folder / "wandb" / "offline-run-*") for _, _, folder in runs)
            )
        return 0
    report = build(args, runs)
    print(plan(args, runs))
    print(f"report saved: {report.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
