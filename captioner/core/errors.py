"""User-facing errors: a mistake a person can fix. `captioner.cli.main.main` catches these once and
prints one line (plus a hint); `captioner -v ...` shows the traceback as well."""
from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for. `hint` says what to do about it."""
    exit_code = 2

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class NotACheckpointError(UserError, ValueError):
    """A file given as a checkpoint is not one."""


class UnsafeOutputError(UserError):
    """An output folder holds things a command would destroy."""


class UnreachableError(UserError, ConnectionError):
    """A server (Kubeflow Pipelines, Triton...) could not be reached."""


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained encoder weights are neither cached nor downloadable."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A data source path that does not exist."""
