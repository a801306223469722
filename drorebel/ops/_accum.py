"""Deprecated location of :func:`drorebel.kernels.accum.addmm_acc` (kept for old imports)."""

from __future__ import annotations

from drorebel.kernels.accum import addmm_acc

__all__ = ["addmm_acc"]
