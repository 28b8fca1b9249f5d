"""The command line of every script: flags -> main(args), with the one error handler.

A user error (flags, data, model, run folder: `UserError`) is one line on stderr and exit 2, a run that had
to stop (`RunStopped`) one line and exit 1, without a traceback unless AGRL_DEBUG=1; however the script
ends, its open runs get their curves.png.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import os
import sys
import textwrap
import typing
from pathlib import Path

import tyro

from helpers import flags, runs
from helpers.errors import RunStopped, UserError


def parse(args_class):
    """The flags; `-h`/`--help` prints them by concern (help_text); `--help | head` ends quietly (the reader
    closed the pipe: nothing is wrong)."""
    try:
        if {"-h", "--help"} & set(sys.argv[1:]):
            print(help_text(args_class, help_width()))
            sys.stdout.flush()  # here, where a closed pipe can be caught
            sys.exit(0)
        try:
            return tyro.cli(args_class)
        except SystemExit:  # tyro printed a message: flush it here too
            sys.stdout.flush()
            raise
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
        sys.exit(0)


def help_text(args_class, width: int | None = None) -> str:
    """The flags by concern (flags.HELP_GROUPS), one line each: `--name TYPE = default  what it does`; a
    description that does not fit in `width` columns wraps under itself (None: never wrap)."""
    script = Path(sys.argv[0]).name
    about = (sys.modules[args_class.__module__].__doc__ or "").strip().split("\n")[0]
    wrap = (lambda text: textwrap.wrap(text, width)) if width else (lambda text: [text])
    lines = [f"usage: {script} [--flag VALUE ...]", *wrap(about), ""]
    lines += wrap("each flag: --name TYPE = default, then what it does; a boolean is --name or --no-name")
    docs, types = field_docs(args_class), typing.get_type_hints(args_class)
    usages = {f.name: flag_usage(f.name, types[f.name], f.default) for f in dataclasses.fields(args_class)}
    column = min(max(map(len, usages.values())) + 4, 40)  # where the descriptions start
    for group, names in flags.help_groups(args_class):
        lines += ["", f"{group}:"]
        for name in names:
            start, doc = f"  {usages[name]}".ljust(column - 2) + "  ", docs.get(name, "")
            if width is None or len(start) + len(doc) <= width:
                lines.append(start + doc)
                continue
            parts = textwrap.wrap(doc, max(width - column, 30))
            if len(start) > column:  # a long usage: the description under it
                lines.append(start.rstrip())
                parts = [" " * column + part for part in parts]
            else:
                parts = [start + parts[0], *(" " * column + part for part in parts[1:])]
            lines += parts
    return "\n".join(lines)


def flag_usage(name: str, kind, default) -> str:
    """`--name TYPE = default` as tyro parses it: `--[no-]name` for a boolean, `{a,b}` for a choice."""
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        return f"--[no-]{flag[2:]} = {default}"
    return f"{flag} {type_name(kind)} = {' '.join(default) or '()' if isinstance(default, tuple) else default}"


def type_name(kind) -> str:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if typing.get_origin(kind) is tuple:
        return type_name(args[0]) + "..."
    if len(args) < len(typing.get_args(kind)):  # X | None
        return "|".join(map(type_name, args)) + "|None"
    return getattr(kind, "__name__", str(kind)).upper()


def field_docs(args_class) -> dict[str, str]:
    """Each field's docstring (the string under it, one line by the house style), as tyro reads them."""
    docs = {}
    for cls in reversed(args_class.__mro__[:-1]):
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
            ):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def help_width() -> int | None:
    """The terminal's columns (the help goes to a pipe: the one on stderr), None for a file."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            return os.get_terminal_size(fd).columns
    return None


def end_launch(message: str) -> None:
    """A user error in one process of a `--num-gpus N` run: the relaunching process prints it once
    (launch.relaunch), so this rank records it and ends the launcher and every rank at once, before the
    launcher can print its failure report (about 40 lines per failed rank) or a rank waits on the others."""
    import psutil  # accelerate's dependency

    with contextlib.suppress(FileExistsError):  # every rank may fail alike: the first one's line is kept
        with open(os.environ["AGRL_ERROR_FILE"], "x") as f:
            f.write(message)
    launcher = psutil.Process().parent()  # torchrun, or accelerate launch on GPUs
    if launcher is None or str(launcher.ppid()) != os.environ.get("AGRL_LAUNCHED"):
        sys.exit(2)  # another rank has ended the launcher already (this one was orphaned)
    ranks = launcher.children(recursive=True)
    launcher.kill()  # first: it would report the ranks' deaths
    for process in ranks:
        if process.pid != os.getpid():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    sys.exit(2)


def leave_process_group() -> None:
    """A rank that finished leaves its process group before Python exits, after the others finished too: torch's
    teardown of a live gloo group can abort the process (seen here: 'terminate called without an active
    exception', exit -6, on a rank that was done while rank 0 still wrote)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run(main, args_class) -> None:
    """`main(tyro.cli(args_class))` under the one error handler."""
    args = parse(args_class)
    debug = os.environ.get("AGRL_DEBUG", "") not in ("", "0")
    try:
        main(args)
        leave_process_group()
    except UserError as e:
        if debug:
            raise
        if "RANK" in os.environ and os.environ.get("AGRL_ERROR_FILE"):
            end_launch(str(e))
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as e:
        if debug:
            raise
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one checkpoints and stops after the step)
        if debug:
            raise
        print("aborted: a second interrupt stops at once, without a checkpoint of this step", file=sys.stderr)
        sys.exit(130)
    finally:
        for open_run in list(runs.OPEN_RUNS):
            with contextlib.suppress(Exception):
                open_run.finish()
