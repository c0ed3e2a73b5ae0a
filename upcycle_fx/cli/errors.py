"""The command line's own named errors and its interruption signal."""

from __future__ import annotations

from ..errors import UpcycleError


class UsageError(UpcycleError):
    """A command-line argument cannot work (exit code 2): the message says which and what to give."""


class UnsafeOutputError(UsageError):
    """The output would overwrite, delete or sit inside the input (or hold it)."""


class RecipeError(UsageError):
    """The recipe file cannot be read, or has unknown keys or values."""


class CheckFailedError(UpcycleError):
    """The written model does not compute what the dense model computes (exit code 1)."""


class Terminated(BaseException):
    """SIGTERM arrived (Slurm, Kubernetes, `timeout`): raised in the main thread so that every
    `finally` and context manager on the way out runs, as for Ctrl-C (KeyboardInterrupt)."""
