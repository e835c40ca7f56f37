"""Errors that the CLI turns into one line on stderr and a non-zero exit code."""

import signal


class NefgptError(Exception):
    """A runtime problem with an input, artifact or state: exit code 1."""

    exit_code = 1


class UsageError(NefgptError):
    """A bad option, preset or parameter value: exit code 2."""

    exit_code = 2


class DataError(NefgptError):
    """A dataset that can't be read or doesn't have the expected layout."""


class ArtifactError(NefgptError):
    """A run-directory artifact that is missing, corrupt or inconsistent."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the CLI's handler: the command unwinds as on Ctrl-C
    (temporary files deleted, the run lock released) and the CLI exits 128 + 15 = 143."""

    signum = signal.SIGTERM
