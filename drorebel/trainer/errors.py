"""The trainer's user-facing errors, in one place.

Every error a user can cause or fix (a setting, a data row, a checkpoint, a reward, a run that
diverged, a full disk) derives from :class:`UserError`; the CLI reports one as a single line
naming the file and line, the row and field, or the setting, and exits with code 2
(``--debug`` shows the traceback). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "DataError", "CheckpointError", "TrainingDiverged"]


class UserError(Exception):
    """An error the user can fix; its message is complete on one line."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, mistyped, out of range or points to nothing."""


class DataError(UserError, ValueError):
    """A dataset file or row is unusable; the message names the file and line or the row and
    the field."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or belongs to another run."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss, the gradient or the parameters became NaN/inf; the message names the step."""
