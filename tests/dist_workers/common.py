"""Shared torchrun boilerplate of the data-parallel test workers (gloo, CPU).

A worker is launched as
``python -m torch.distributed.run --standalone --nproc_per_node 2 WORKER.py OUT.json``; it calls
``run(body)`` with ``body(world, rank) -> dict``, and rank 0 writes the returned report to
``OUT.json``. The collectives below are what the workers compare with: ``avg`` is the gradient
averaging of DDP/ZeRO, ``gather`` re-assembles per-rank slices of the union batch, ``max_all``
takes the largest error over all ranks. Imported as ``common`` (the worker's own directory is
the first entry of ``sys.path`` when it runs as a script).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist


def run(body: Callable[[int, int], dict], check_sizes: bool = True) -> None:
    """init gloo -> ``report = body(world, rank)`` -> rank 0 writes it to argv[1] -> teardown.

    ``check_sizes``: the equal-local-size check of ``drorebel.distributed`` (off by
    default in the library: it costs a collective and a host sync per call; on in tests).
    """
    from drorebel.distributed import set_check_sizes

    set_check_sizes(check_sizes)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    report = body(world, rank)
    if rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(report, fh, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    finish()


def finish(code: int = 0) -> None:
    """Leave without interpreter finalization (outputs are written and closed by now).

    A rank whose work is done can still abort at exit, SIGABRT with "terminate called without
    an active exception": a C++ background thread (gloo's workers hold tensors with Python
    references) wants the GIL while Python finalizes, and destroying the process group first
    did not prevent it (seen once in 20 launches on a loaded 2-core machine). ``drorebel``
    commands leave the same way after a distributed run (``drorebel.cli.run``).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank_slice(batch: dict[str, torch.Tensor], rank: int, n_local: int,
               shared: Iterable[str] = (), dim: int = 0) -> dict[str, torch.Tensor]:
    """This rank's ``n_local`` rows (along ``dim``) of every tensor but the ``shared`` ones."""
    keep = set(shared)
    lo = rank * n_local
    return {k: (v if k in keep else v.narrow(dim, lo, n_local)) for k, v in batch.items()}


def avg(t: torch.Tensor, world: int) -> torch.Tensor:
    """Mean over ranks of a detached copy (DDP's gradient averaging)."""
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / world


def gather(t: torch.Tensor, world: int, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` (rank order)."""
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def max_all(t: torch.Tensor) -> float:
    """max |t| over all ranks."""
    m = t.detach().abs().max().clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return m.item()
