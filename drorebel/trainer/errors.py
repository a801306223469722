"""The trainer's user-facing errors: each is reported by the CLI as one line, exit code 2."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration value is missing, mistyped, out of range or points to nothing."""
