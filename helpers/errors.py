"""The two ways a script ends early on purpose, each one line on the command line (see `cli.run`)."""


class UserError(ValueError):
    """A problem with what the user gave (flags, files, model, run folder): the scripts print its message as
    one line and exit 2, without a traceback (AGRL_DEBUG=1 shows it)."""


class RunStopped(RuntimeError):
    """A run that cannot go on (NaN after NaN, nothing to train on): one line and exit 1."""
