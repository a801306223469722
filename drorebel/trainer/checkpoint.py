"""Atomic, rotated checkpoints: model, optimizer, scheduler, RNG states and the data position.

Layout ``<output_dir>/checkpoint-<step>/``: ``model.safetensors``, ``optimizer.pt``,
``scheduler.pt`` (one process / DDP; DeepSpeed: its own ``deepspeed/`` folder of ZeRO shards),
``rng-<rank>.pt`` for every rank, optional ``extra-<rank>.pt`` (the caller's state) and
``trainer_state.json`` (written last, by rank 0). Everything is first
written to ``.tmp-checkpoint-<step>`` and renamed when complete, so a run killed while saving
leaves the previous checkpoint as the latest complete one. Loading uses safetensors and
``torch.load(weights_only=True)`` only (DeepSpeed's shards too: the engine's checkpoint loader
is switched to ``weights_only`` with an allow-list, see ``engine._weights_only_loads``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from typing import Any

import numpy as np
import torch

from drorebel.trainer.errors import CheckpointError

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
# test hook: SIGKILL this process half-way through writing the checkpoint of this step
_KILL_ENV = "DROREBEL_TEST_KILL_DURING_SAVE"




def save_checkpoint(output_dir: str, step: int, engine: Any, fingerprint: str, keep: int,
                    extra_state: dict | None = None) -> str:
    """Write ``checkpoint-<step>`` atomically, then delete all but the ``keep`` newest.

    Collective under DDP/DeepSpeed: every rank calls it. ``engine.save_state`` writes the model,
    optimizer and scheduler (DeepSpeed: every rank its ZeRO shards); every rank writes its RNG
    states (``rng-<rank>.pt``) and ``extra_state`` (``extra-<rank>.pt``, tensors and plain
    containers only: it is read back with ``weights_only=True``); rank 0 writes
    ``trainer_state.json`` last and renames the temp folder.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if engine.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    engine.barrier()
    engine.save_state(tmp)
    if os.environ.get(_KILL_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save(_rng_state(), os.path.join(tmp, f"rng-{engine.rank}.pt"))
    if extra_state is not None:
        torch.save(extra_state, os.path.join(tmp, f"extra-{engine.rank}.pt"))
    engine.barrier()
    if engine.rank == 0:
        state = {"step": step, "fingerprint": fingerprint, "world_size": engine.world_size,
                 "backend": engine.backend}
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _rotate(output_dir, keep)
    engine.barrier()
    return final


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in ``output_dir`` (None if there is none)."""
    steps = _complete_steps(output_dir)
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


def load_checkpoint(path: str, engine: Any, fingerprint: str) -> tuple[int, dict | None]:
    """Restore everything from ``path``; refuse a checkpoint of another run.

    Returns ``(step, extra_state)`` (this rank's ``extra_state``, None if none was saved). A
    DeepSpeed checkpoint needs the same backend and number of ranks; RNG states of a rank
    that did not exist when saving are left as seeded.
    """
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.exists(state_file):
        raise CheckpointError(f"{path!r} is not a complete checkpoint (no trainer_state.json)")
    with open(state_file) as f:
        state = json.load(f)
    if state["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"checkpoint {path!r} belongs to another run/config (fingerprint "
            f"{state['fingerprint']} != {fingerprint}); refusing to resume")
    saved = (state.get("backend", "plain"), state.get("world_size", 1))
    if "deepspeed" in (saved[0], engine.backend) and saved != (engine.backend, engine.world_size):
        raise CheckpointError(
            f"checkpoint {path!r} was written by {saved[0]} on {saved[1]} rank(s); this run is "
            f"{engine.backend} on {engine.world_size}: resume with the same launch")
    engine.load_state(path)
    rng = os.path.join(path, f"rng-{engine.rank}.pt")
    if os.path.exists(rng):
        _set_rng_state(_load(path, os.path.basename(rng)))
    extra = os.path.join(path, f"extra-{engine.rank}.pt")
    return int(state["step"]), (_load(path, os.path.basename(extra))
                                if os.path.exists(extra) else None)


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
        if m and os.path.exists(os.path.join(output_dir, name, "trainer_state.json")):
            steps.append(int(m.group(1)))
    return sorted(steps)


def _rotate(output_dir: str, keep: int) -> None:
    for step in _complete_steps(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(output_dir, f"checkpoint-{step}"), ignore_errors=True)
