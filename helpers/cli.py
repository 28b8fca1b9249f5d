"""The command line of every script: flags -> main(args), with the one error handler.

A user error (flags, data, model, run folder: `UserError`) is one line on stderr and exit 2, a run that had
to stop (`RunStopped`) one line and exit 1, without a traceback unless AGRL_DEBUG=1; however the script
ends, its open runs get their curves.png.
"""

from __future__ import annotations

import contextlib
import os
import sys

import tyro

from helpers import runs
from helpers.errors import RunStopped, UserError


def parse(args_class):
    """The flags; `--help | head` ends quietly (the reader closed the pipe: nothing is wrong)."""
    try:
        try:
            return tyro.cli(args_class)
        except SystemExit:  # --help was printed: flush it here, where a closed pipe can be caught
            sys.stdout.flush()
            raise
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
        sys.exit(0)


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


def run(main, args_class) -> None:
    """`main(tyro.cli(args_class))` under the one error handler."""
    args = parse(args_class)
    debug = os.environ.get("AGRL_DEBUG", "") not in ("", "0")
    try:
        main(args)
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
