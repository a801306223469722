"""Step metrics: JSONL file (one object per step, appended), a tqdm progress bar and, when
asked, TensorBoard scalars."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

__all__ = ["MetricsLogger", "to_floats"]


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Detached tensors / numbers → plain floats (one host sync per step)."""
    return {k: float(v.detach().float().item() if torch.is_tensor(v) else v)
            for k, v in metrics.items()}


class MetricsLogger:
    """Appends ``{"step": s, ...}`` lines to ``path`` and updates a progress bar with ETA.

    On resume, lines with ``step > start_step`` (written after the checkpoint) are dropped first so
    that the file matches an uninterrupted run.
    """

    def __init__(self, path: str, start_step: int, total: int, progress: bool,
                 tensorboard_dir: str | None = None) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        _truncate_after(path, start_step)
        self.bar = None
        self.tb = open_tensorboard(tensorboard_dir, start_step) if tensorboard_dir else None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4g}")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def open_tensorboard(log_dir: str, start_step: int) -> Any:
    """A ``SummaryWriter`` on ``log_dir``; on resume, events after ``start_step`` are purged
    (``purge_step``) so the curves match an uninterrupted run. Needs the ``tensorboard``
    package (``pip install tensorboard``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("tensorboard=true needs the tensorboard package: "
                          "pip install tensorboard") from err
    return SummaryWriter(log_dir=log_dir, purge_step=start_step + 1 if start_step else None)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    keep = [r for r in read_jsonl(path) if r["step"] <= step]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
