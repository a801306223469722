"""Atomic, rotated checkpoints: model, optimizer, scheduler, RNG states and the data position.

Layout ``<output_dir>/checkpoint-<step>/``: ``model.safetensors`` (LoRA: the adapter,
``adapter_config.json`` + ``adapter_model.safetensors``), ``optimizer.pt``,
``scheduler.pt`` (one process / DDP; DeepSpeed: its own ``deepspeed/`` folder of ZeRO shards),
``rng-<rank>.pt`` for every rank, optional ``extra-<rank>.pt`` (the caller's state) and
``trainer_state.json`` (written last, by rank 0: step, config fingerprint, run id, backend,
world size, skipped steps). Everything is first written to ``.tmp-checkpoint-<step>`` and
renamed when complete, so a run killed — or out of disk space — while saving leaves the
previous checkpoint as the latest complete one (a full disk removes the temp folder and is a
one-line :class:`~drorebel.trainer.run_dir.NoSpaceLeft`). Rotation deletes only checkpoints of
the run that saves (its run id); a folder already at the name of the new checkpoint is
replaced only if this run wrote it, otherwise renamed aside (see
:mod:`drorebel.trainer.run_dir`), and a symbolic link there is removed, never followed.

Loading uses safetensors and ``torch.load(weights_only=True)`` only (DeepSpeed's shards too:
the engine's checkpoint loader is switched to ``weights_only`` with an allow-list, see
``engine._weights_only_loads``). :func:`checkpoint_problem` tells cheaply whether a checkpoint
is intact; :func:`resume_candidates` uses it so that ``resume=auto`` falls back to the newest
intact checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import struct
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from drorebel.trainer.errors import CheckpointError
from drorebel.trainer.run_dir import (
    CheckpointNotFound,
    agree,
    is_checkpoint_name,
    remove_link_or_temp,
    set_aside,
    torch_save,
    writing,
)

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "save_final", "checkpoint_problem", "read_state", "resume_candidates",
           "is_checkpoint_name", "torch_save"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
# test hook: SIGKILL this process half-way through writing the checkpoint of this step
_KILL_ENV = "DROREBEL_TEST_KILL_DURING_SAVE"
_SMALL = 2**20  # torch files up to this size are fully loaded when checked


def save_checkpoint(output_dir: str, step: int, engine: Any, fingerprint: str, keep: int,
                    extra_state: dict | None = None, run_id: str | None = None,
                    info: dict | None = None) -> str:
    """Write ``checkpoint-<step>`` atomically, then delete all but the ``keep`` newest of this
    run (``run_id``; None: a run of its own that rotates nothing written by another).

    Collective under DDP/DeepSpeed: every rank calls it. ``engine.save_state`` writes the model,
    optimizer and scheduler (DeepSpeed: every rank its ZeRO shards); every rank writes its RNG
    states (``rng-<rank>.pt``) and ``extra_state`` (``extra-<rank>.pt``, tensors and plain
    containers only: it is read back with ``weights_only=True``); rank 0 writes
    ``trainer_state.json`` (plus ``info``) last and renames the temp folder. If any rank fails
    to write (e.g. a full disk), every rank raises, the temp folder is removed and the previous
    checkpoints are untouched.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")

    def prepare() -> None:
        if engine.rank == 0:
            remove_link_or_temp(tmp)  # a leftover of a killed save, or a planted link
            with writing(tmp):
                os.makedirs(tmp)

    def write() -> None:
        engine.save_state(tmp)
        if os.environ.get(_KILL_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        torch_save(_rng_state(), os.path.join(tmp, f"rng-{engine.rank}.pt"))
        if extra_state is not None:
            torch_save(extra_state, os.path.join(tmp, f"extra-{engine.rank}.pt"))

    def commit() -> None:
        if engine.rank != 0:
            return
        state = {"step": step, "fingerprint": fingerprint, "world_size": engine.world_size,
                 "backend": engine.backend, "run_id": run_id, **(info or {})}
        _write_json(os.path.join(tmp, "trainer_state.json"), state)
        _put_in_place(tmp, final, run_id)
        _rotate(output_dir, keep, run_id)

    for phase, what in ((prepare, tmp), (write, tmp), (commit, final)):
        _together(engine, phase, what, tmp)
    return final


def save_final(output_dir: str, engine: Any, tokenizer: Any, step: int, fingerprint: str,
               run_id: str | None = None) -> str:
    """``output_dir/final`` (``save_pretrained``), written to ``.tmp-final`` then renamed.

    A ``final`` written by this run is replaced; one of another run is renamed to ``final.old``;
    a symbolic link there is removed (its target is never written). ``trainer_state.json`` in
    the folder names the step, fingerprint and run. Collective, like :func:`save_checkpoint`.
    """
    final = os.path.join(output_dir, "final")
    tmp = os.path.join(output_dir, ".tmp-final")

    def prepare() -> None:
        if engine.rank == 0:
            remove_link_or_temp(tmp)

    def write() -> None:
        engine.save_pretrained(tmp, tokenizer)

    def commit() -> None:
        if engine.rank == 0:
            _write_json(os.path.join(tmp, "trainer_state.json"),
                        {"step": step, "fingerprint": fingerprint, "run_id": run_id})
            _put_in_place(tmp, final, run_id)

    for phase, what in ((prepare, tmp), (write, tmp), (commit, final)):
        _together(engine, phase, what, tmp)
    return final


def _together(engine: Any, phase: Callable[[], None], what: str, tmp: str) -> None:
    """Run one phase of a save on every rank; if any rank fails, all raise (rank 0 first
    removes the temp folder). A full disk is :class:`NoSpaceLeft` on the rank that hit it."""
    err: BaseException | None = None
    try:
        with writing(what):
            phase()
    except Exception as e:  # noqa: BLE001 - re-raised by agree() on this rank
        err = e
    try:
        agree(engine, err, what)
    except BaseException:
        if engine.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: str, obj: dict) -> None:
    with writing(path), open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _put_in_place(tmp: str, dest: str, run_id: str | None) -> None:
    """Rename the complete ``tmp`` to ``dest``. What is at ``dest``: a link is removed (not
    followed); a folder of this run is replaced; anything else is renamed aside."""
    if os.path.islink(dest):
        os.unlink(dest)
    elif os.path.lexists(dest):
        if run_id is not None and os.path.isdir(dest) and _run_id_of(dest) == run_id:
            old = os.path.join(os.path.dirname(dest), f".replaced-{os.path.basename(dest)}")
            remove_link_or_temp(old)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
            return
        set_aside(dest)
    os.replace(tmp, dest)


def _run_id_of(path: str) -> str | None:
    state, _ = _state(path)
    return state.get("run_id") if state is not None else None


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint (it has ``trainer_state.json``) with the highest step in
    ``output_dir`` (None if there is none). Whether it is intact: :func:`checkpoint_problem`."""
    steps = _complete_steps(output_dir)
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


def read_state(path: str) -> dict[str, Any]:
    """``trainer_state.json`` of checkpoint ``path``; :class:`CheckpointError` (one line) if it is
    missing, empty, not JSON, or has no integer ``step`` / string ``fingerprint``."""
    state, why = _state(path)
    if state is None:
        raise CheckpointError(f"checkpoint {path!r}: {why}")
    return state


def _state(path: str) -> tuple[dict[str, Any] | None, str]:
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_file):
        return None, "no trainer_state.json (not a complete checkpoint)"
    try:
        with open(state_file, "rb") as f:
            raw = f.read()
        if not raw.strip():
            return None, "trainer_state.json is empty"
        state = json.loads(raw)
    except (OSError, ValueError) as err:
        return None, f"trainer_state.json is unreadable ({type(err).__name__})"
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) \
            or not isinstance(state.get("fingerprint"), str):
        return None, "trainer_state.json has no step/fingerprint"
    return state, ""


def checkpoint_problem(path: str) -> str | None:
    """Why checkpoint ``path`` cannot be resumed from (None: intact), checked cheaply:
    ``trainer_state.json`` parses and names the step; ``model.safetensors``' header parses and
    the file has the size it announces; the torch files (``optimizer.pt``, ``scheduler.pt``,
    ``rng-*.pt``, ``extra-*.pt``, DeepSpeed's shards) are complete zip archives, and ours up to
    1 MiB load with ``weights_only=True``. Tensor values are not read (see
    :meth:`Engine.state_finite` after loading)."""
    state, why = _state(path)
    if state is None:
        return why
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    if m and int(m.group(1)) != state["step"]:
        return f"trainer_state.json says step {state['step']}"
    if state.get("backend", "plain") == "deepspeed":
        ds = os.path.join(path, "deepspeed")
        files = sorted(os.listdir(ds)) if os.path.isdir(ds) else []
        if not files:
            return "the deepspeed/ folder is missing or empty"
        for name in files:
            if name.endswith(".pt"):
                why = _torch_file_problem(os.path.join(ds, name), load=False)
                if why:
                    return f"deepspeed/{name} {why}"
    else:
        # a LoRA run's checkpoint holds the adapter (peft's files) instead of the whole model
        weights = "adapter_model.safetensors" if os.path.isfile(
            os.path.join(path, "adapter_config.json")) else "model.safetensors"
        why = _safetensors_problem(os.path.join(path, weights))
        if why:
            return f"{weights} {why}"
        for name in ("optimizer.pt", "scheduler.pt"):
            why = _torch_file_problem(os.path.join(path, name))
            if why:
                return f"{name} {why}"
    for name in sorted(os.listdir(path)):
        if name.startswith(("rng-", "extra-")) and name.endswith(".pt"):
            why = _torch_file_problem(os.path.join(path, name))
            if why:
                return f"{name} {why}"
    return None


def _safetensors_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return "is missing"
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                return f"is truncated ({size} bytes; its header alone claims {n + 8})"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return f"has an unreadable header ({type(err).__name__})"
    if 8 + n + end != size:
        return f"is truncated ({size} of {8 + n + end} bytes)"
    return None


def _torch_file_problem(path: str, load: bool = True) -> str | None:
    """Why a ``torch.save`` file is unusable (None: fine). ``load``: also unpickle it with
    ``weights_only=True`` when small (not DeepSpeed's shards: they need its allow-list)."""
    if not os.path.isfile(path):
        return "is missing"
    size = os.path.getsize(path)
    if size == 0:
        return "is empty"
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"is truncated ({size} bytes)"
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"is truncated or not a torch file ({size} bytes)"
    if load and size <= _SMALL:
        try:
            torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:  # noqa: BLE001 - any failure: not loadable
            return f"does not load ({type(err).__name__})"
    return None


def resume_candidates(resume: str, output_dir: str, fingerprint: str, log: bool = True
                      ) -> list[str]:
    """The checkpoints to resume from, best first (empty: a fresh start).

    ``resume="auto"``: the intact checkpoints of this config (``fingerprint``) in
    ``output_dir``, newest first; every newer checkpoint passed over is printed (``log``) with
    the reason. No checkpoint at all: ``[]``. Checkpoints but none intact, or only other
    configs': :class:`CheckpointError`. A path: ``[path]`` if it exists and is intact, else a
    one-line :class:`CheckpointError` (:class:`~drorebel.trainer.run_dir.CheckpointNotFound`).
    """
    if resume != "auto":
        if not os.path.isdir(resume):
            raise CheckpointNotFound(f"resume: checkpoint {resume!r} does not exist")
        why = checkpoint_problem(resume)
        if why:
            raise CheckpointError(f"resume: checkpoint {resume!r} is damaged: {why}")
        _check_fingerprint(resume, read_state(resume), fingerprint)
        return [resume]
    steps = _complete_steps(output_dir)
    good: list[str] = []
    other: tuple[str, str] | None = None
    broken: list[str] = []
    for step in reversed(steps):
        path = os.path.join(output_dir, f"checkpoint-{step}")
        why = checkpoint_problem(path)
        if why is None and read_state(path)["fingerprint"] != fingerprint:
            other = other or (path, read_state(path)["fingerprint"])
            why = "written by another run/config"
        if why is None:
            good.append(path)
        elif not good:  # only the ones newer than the checkpoint resumed from matter
            broken.append(f"{os.path.basename(path)}: {why}")
            if log:
                print(f"[drorebel] resume=auto: skipping {path} ({why})")
    if good or not steps:
        return good
    if other is not None:
        raise CheckpointError(
            f"checkpoint {other[0]!r} belongs to another run/config (fingerprint {other[1]} != "
            f"{fingerprint}) and no checkpoint of this config is intact; refusing to resume")
    raise CheckpointError(f"resume=auto: no intact checkpoint in {output_dir!r} "
                          f"({'; '.join(broken)})")


def load_checkpoint(path: str, engine: Any, fingerprint: str) -> tuple[int, dict | None]:
    """Restore everything from ``path``; refuse a damaged checkpoint or one of another run.

    Returns ``(step, extra_state)`` (this rank's ``extra_state``, None if none was saved). A
    DeepSpeed checkpoint needs the same backend and number of ranks; RNG states of a rank
    that did not exist when saving are left as seeded.
    """
    state = read_state(path)
    _check_fingerprint(path, state, fingerprint)
    saved = (state.get("backend", "plain"), state.get("world_size", 1))
    if "deepspeed" in (saved[0], engine.backend) and saved != (engine.backend, engine.world_size):
        raise CheckpointError(
            f"checkpoint {path!r} was written by {saved[0]} on {saved[1]} rank(s); this run is "
            f"{engine.backend} on {engine.world_size}: resume with the same launch")
    try:
        engine.load_state(path)
        rng = os.path.join(path, f"rng-{engine.rank}.pt")
        if os.path.exists(rng):
            _set_rng_state(_load(path, os.path.basename(rng)))
        extra = os.path.join(path, f"extra-{engine.rank}.pt")
        extra_state = _load(path, os.path.basename(extra)) if os.path.exists(extra) else None
    except (OSError, RuntimeError, ValueError, EOFError, KeyError) as err:
        if isinstance(err, CheckpointError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path!r} could not be loaded: {first}") from err
    return int(state["step"]), extra_state


def _check_fingerprint(path: str, state: dict, fingerprint: str) -> None:
    if state["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"checkpoint {path!r} belongs to another run/config (fingerprint "
            f"{state['fingerprint']} != {fingerprint}); refusing to resume")


def _load(path: str, name: str) -> Any:
    return torch.load(os.path.join(path, name), weights_only=True, map_location="cpu")


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002 (the global state is what users seed)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np_state = (n[0], n[1].numpy().astype(np.uint32), *n[2:])
    np.random.set_state(np_state)  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _complete_steps(output_dir: str) -> list[int]:
    if not os.path.isdir(output_dir):
        return []
    steps = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and not os.path.islink(path) and os.path.exists(
                os.path.join(path, "trainer_state.json")):
            steps.append(int(m.group(1)))
    return sorted(steps)


def _rotate(output_dir: str, keep: int, run_id: str | None) -> None:
    """Delete all but the ``keep`` newest complete checkpoints of run ``run_id`` (none if
    ``keep`` is 0 or the run has no id); other runs' checkpoints are never deleted."""
    if keep <= 0 or run_id is None:
        return
    mine = [s for s in _complete_steps(output_dir)
            if _run_id_of(os.path.join(output_dir, f"checkpoint-{s}")) == run_id]
    for step in mine[:-keep]:
        shutil.rmtree(os.path.join(output_dir, f"checkpoint-{step}"), ignore_errors=True)
