"""Helpers shared by the experiment packages (kept import-light: no matplotlib at import time)."""

from __future__ import annotations

from types import ModuleType

__all__ = ["pyplot"]


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive ``Agg`` backend, imported on first use (the
    experiments write PNG files only, and ``import matplotlib`` is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
