"""What a run owns in its ``output_dir``, how it starts or resumes there, and failed writes.

The rules (Hugging Face's ``overwrite_output_dir`` convention, made non-destructive):

* **A new run refuses another run's directory.** With ``resume`` unset, an ``output_dir``
  holding another run's files — ``checkpoint-<step>`` folders, ``metrics.jsonl``, a ``final/``
  or ``tensorboard/`` folder — is a :class:`ConfigError` raised before the model loads
  (:func:`drorebel.trainer.driver.prepare_run`), unless ``overwrite_output_dir=true``. An
  ``output_dir`` that is not a directory is refused too.
* **A run deletes only what it wrote.** Every checkpoint records the id of the run that wrote
  it (``run_id`` in ``trainer_state.json``; a resumed run carries on with the id of the
  checkpoint it resumed from). Rotation (``save_total_limit``) deletes only checkpoints of
  this run; checkpoints of other runs, and those written before run ids existed, are never
  deleted.
* **overwrite_output_dir=true starts a new run next to the old one and deletes nothing of
  it.** The old run's checkpoint folders stay where they are (the new run never rotates them
  away); its ``metrics.jsonl`` and ``tensorboard/`` are renamed to ``metrics.jsonl.old`` and
  ``tensorboard.old`` when the new run starts; an old ``final/`` or ``checkpoint-<step>``
  that the new run is about to write is renamed to ``final.old`` / ``checkpoint-<step>.old``
  just before the new one takes its place (``.old2``, ``.old3``, … when the name is taken).
  Renamed files are never touched again: delete them yourself when you no longer need them.
* **Links are not followed.** A symbolic link at ``final``, ``checkpoint-<step>`` or a temp
  folder is removed (the link only, never its target) before the run writes there.
* **Resume picks an intact checkpoint.** ``resume=auto`` takes the newest checkpoint that is
  intact (:func:`drorebel.trainer.checkpoint.checkpoint_problem`: ``trainer_state.json``
  parses and names the step, the safetensors header parses and the file has its full size,
  the torch files are complete) and was written with this config (its fingerprint); each newer
  checkpoint it passes over is named on one line with the reason. A checkpoint named
  explicitly (``resume=<path>``) that is missing or damaged is a one-line
  :class:`CheckpointError`.

Writes that fail for lack of space (``ENOSPC``, or a serializer's error saying so) become
:class:`NoSpaceLeft`, a one-line :class:`UserError` ``no space left on device at PATH``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from drorebel.trainer.errors import CheckpointError, UserError

__all__ = ["RunDir", "NoSpaceLeft", "CheckpointNotFound", "other_run_files", "writing",
           "as_write_error", "agree", "set_aside", "remove_link_or_temp", "is_checkpoint_name",
           "torch_save", "RUN_FILES", "SET_ASIDE_AT_START"]

#: files and folders of a run besides its checkpoints
RUN_FILES = ("metrics.jsonl", "final", "tensorboard")
SET_ASIDE_AT_START = ("metrics.jsonl", "tensorboard")  # renamed when overwriting
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_LOW_SPACE = 16 * 2**20  # bytes: a failed C++ write with less free space than this = ENOSPC


class NoSpaceLeft(UserError, OSError):
    """A write failed because the device is full; the message names the path."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC
        self.filename = path

    def __str__(self) -> str:
        return self.args[0]


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """``resume`` names a checkpoint that does not exist."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class RunDir:
    """One run's standing in ``output_dir``.

    ``run_id``: written into every checkpoint (rank 0's is the one that counts: only rank 0
    writes ``trainer_state.json`` and rotates); ``resume_candidates``: intact checkpoints of
    this config to resume from, best first (empty: a fresh start); ``last_checkpoint``: the
    newest intact checkpoint of this run (resumed from or saved), named in error messages;
    ``skipped_steps``: optimiser steps skipped for non-finite values so far
    (``on_nonfinite=skip``; restored on resume).
    """

    output_dir: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    resume_candidates: list[str] = field(default_factory=list)
    last_checkpoint: str | None = None
    skipped_steps: int = 0

    def adopt(self, path: str, state: dict[str, Any]) -> None:
        """Continue the run of checkpoint ``path`` (its run id and skipped-step count)."""
        if isinstance(state.get("run_id"), str):
            self.run_id = state["run_id"]
        self.skipped_steps = int(state.get("skipped_steps", 0) or 0)
        self.last_checkpoint = path

    def checkpoint_note(self) -> str:
        """``the last intact checkpoint is …`` (true: only checked checkpoints are recorded)."""
        if self.last_checkpoint is None:
            return "this run has saved no checkpoint yet"
        return f"the last intact checkpoint is {self.last_checkpoint}"


def is_checkpoint_name(name: str) -> bool:
    """``checkpoint-<step>``."""
    return _CHECKPOINT.match(name) is not None


def other_run_files(output_dir: str) -> list[str]:
    """Names in ``output_dir`` written by a run: ``checkpoint-<step>`` folders (complete or
    not), ``metrics.jsonl``, and non-empty ``final/`` / ``tensorboard/`` folders (a symbolic
    link is nobody's run file: it is replaced, not followed)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if os.path.islink(path):
            continue
        if is_checkpoint_name(name) and os.path.isdir(path):
            found.append(name)
        elif name == "metrics.jsonl" and os.path.isfile(path):
            found.append(name)
        elif name in ("final", "tensorboard") and os.path.isdir(path) and os.listdir(path):
            found.append(name)
    return found


# ---- file operations that never follow links or delete what the run did not write ---------

def set_aside(path: str) -> str:
    """Rename ``path`` to ``path.old`` (``.old2``, … if taken); returns the new path."""
    k, dest = 1, f"{path}.old"
    while os.path.lexists(dest):
        k += 1
        dest = f"{path}.old{k}"
    os.replace(path, dest)
    return dest


def remove_link_or_temp(path: str) -> None:
    """Remove a run's own temp folder ``path`` (a leftover of a killed save) — or, if ``path``
    is a symbolic link, the link only."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


# ---- failed writes ----------------------------------------------------------------------------

def _says_no_space(err: BaseException, path: str) -> bool:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    text = str(err)
    if any(s in text for s in ("No space left on device", "os error 28", "StorageFull")):
        return True  # safetensors (Rust) and other serializers report it in their message
    if isinstance(err, RuntimeError) and "write failed" in text:  # torch's C++ file writer
        with contextlib.suppress(OSError):
            d = path if os.path.isdir(path) else os.path.dirname(path) or "."
            return shutil.disk_usage(d).free < _LOW_SPACE
    return False


def as_write_error(err: BaseException, path: str) -> BaseException:
    """``err`` (raised while writing ``path``) as :class:`NoSpaceLeft` when the device is full;
    any other error unchanged."""
    if isinstance(err, NoSpaceLeft) or not _says_no_space(err, path):
        return err
    where = getattr(err, "filename", None) or path
    return NoSpaceLeft(f"no space left on device at {where}", str(where))


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Context of a write to ``path``: a full device becomes :class:`NoSpaceLeft`."""
    try:
        yield
    except Exception as err:
        new = as_write_error(err, path)
        if new is err:
            raise
        raise new from err


def torch_save(obj: Any, path: str) -> None:
    """``torch.save`` through a Python file, so that a full disk raises ``OSError(ENOSPC)``
    (torch's own C++ writer only says "file write failed"), reported as :class:`NoSpaceLeft`."""
    with writing(path), open(path, "wb") as f:
        torch.save(obj, f)


def agree(engine: Any, err: BaseException | None, what: str) -> None:
    """Collective (replaces a barrier): every rank raises if any rank failed ``what``.

    A rank with its own error raises it; the others raise :class:`CheckpointError` saying that
    another rank failed, so that no rank is left waiting in a later collective.
    """
    failed = err is not None
    if getattr(engine, "world_size", 1) > 1:
        flag = torch.tensor([float(failed)], device=engine.device)
        failed = bool(engine.all_reduce_sum(flag).item() > 0)
    if err is not None:
        raise err
    if failed:
        raise CheckpointError(f"another rank failed while writing {what}")
