"""Step metrics: JSONL file (one object per step, appended), a tqdm progress bar and, when
asked (``report_to``), TensorBoard scalars and a Weights & Biases run (rank 0 only: the
driver makes the logger on rank 0).

A full disk while writing a line is a one-line
:class:`~drorebel.trainer.run_dir.NoSpaceLeft`; the partial line it may leave (or one left by a
killed run) is dropped when the run resumes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from drorebel.trainer.run_dir import writing

__all__ = ["MetricsLogger", "to_floats", "open_wandb"]


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Detached tensors / numbers → plain floats (one host sync per step)."""
    return {k: float(v.detach().float().item() if torch.is_tensor(v) else v)
            for k, v in metrics.items()}


class MetricsLogger:
    """Appends ``{"step": s, ...}`` lines to ``path`` and updates a progress bar with ETA.

    On resume, lines with ``step > start_step`` (written after the checkpoint) are dropped first so
    that the file matches an uninterrupted run, and so are lines that do not parse (the partial
    last line of a run killed, or out of disk space, while writing it).
    """

    def __init__(self, path: str, start_step: int, total: int, progress: bool,
                 tensorboard_dir: str | None = None, wandb: dict[str, Any] | None = None
                 ) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        _truncate_after(path, start_step)
        self.bar = None
        self.tb = open_tensorboard(tensorboard_dir, start_step) if tensorboard_dir else None
        self.wandb = open_wandb(**wandb) if wandb is not None else None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4g}")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
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


def open_wandb(output_dir: str, config: dict[str, Any]) -> Any:
    """A Weights & Biases run for the step scalars: project ``WANDB_PROJECT`` (default
    ``drorebel``), named after ``output_dir``, files under ``WANDB_DIR`` (default
    ``output_dir``), the training config as its config. ``WANDB_MODE=offline`` writes the run
    locally (``wandb sync`` uploads it later). Each start of a run (a resume too) is a new
    W&B run unless ``WANDB_RUN_ID`` / ``WANDB_RESUME`` say otherwise (wandb reads them). A
    failing ``wandb.init`` (e.g. online without an API key) is one :class:`ConfigError`
    line."""
    import wandb

    from drorebel.trainer.errors import ConfigError

    name = os.path.basename(os.path.abspath(output_dir))
    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT") or "drorebel", name=name,
                          dir=None if os.environ.get("WANDB_DIR") else output_dir,
                          config=config)
    except Exception as err:  # noqa: BLE001 - wandb raises many kinds (usage, comm, auth)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"report_to wandb: wandb.init failed ({first}); log in with `wandb "
                          "login`, or set WANDB_MODE=offline to log locally") from None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_after(path: str, step: int) -> None:
    """Keep the lines of steps ``<= step`` that parse (a partial line is dropped); rewritten
    through a temp file, so a crash here leaves the old file whole."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw)
            except ValueError:  # a partial line (killed or out of space mid-write)
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                keep.append(raw.decode() if raw.endswith(b"\n") else raw.decode() + "\n")
    tmp = path + ".tmp"
    with writing(tmp), open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
