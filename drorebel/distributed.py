"""torch.distributed helpers for data-parallel losses: gather, all-reduce, rank slices.

A utility below every layer (kernels → ops → losses → trainer, docs/design.md §2): it imports
nothing from drorebel, so the losses, the trainer and the test oracles of
``drorebel.reference`` can all use it.

Why the losses need them: DRO-REBEL (Sahu & Wells, arXiv 2509.19104) defines the worst-case
weights (and the Wasserstein penalty's mean) over the whole batch of n pairs. Under data
parallelism every rank holds a slice of that batch, so each rank all-gathers the *detached*
per-pair statistics (:func:`gather_rows`), solves the dual identically, keeps its own slice of
the global weights (:func:`local_slice`) and back-propagates ``world_size · Σ_{i local} p_i ℓ_i``:
DDP's gradient *averaging* (division by ``world_size``) then yields exactly
``Σ_{i global} p_i ∇ℓ_i``, the single-process gradient on the union batch (Danskin: ``p`` is held
fixed). :func:`dp_global_sum` gives a global sum whose gradient DDP averaging turns into the
exact one.

All helpers degrade to the single-process behaviour when ``torch.distributed`` is unavailable or
uninitialised, when the group has one rank, or when ``global_batch=False`` (weights over the local
batch only). Local batches must have equal sizes. Checking that costs one all-gather of the sizes
and a host synchronisation per call, so it is opt-in: ``set_check_sizes(True)``, the environment
variable ``DROREBEL_DP_CHECK_SIZES=1``, or ``gather_rows(..., check_sizes=True)`` (the tests turn
it on). Unchecked, unequal sizes make the collective fail or hang inside the backend.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "data_parallel_info",
    "set_check_sizes",
    "check_equal_local_sizes",
    "gather_rows",
    "all_reduce_sum",
    "local_slice",
    "dp_global_sum",
]


def data_parallel_info(group: object | None = None, global_batch: bool = True) -> tuple[int, int]:
    """``(world_size, rank)`` of the data-parallel ``group``, or ``(1, 0)`` when not distributed.

    ``(1, 0)`` is returned when ``global_batch`` is False, when ``torch.distributed`` is not
    available or not initialised, or when the group has a single rank.
    """
    if not global_batch or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    world = dist.get_world_size(group)
    if world <= 1:
        return 1, 0
    return world, dist.get_rank(group)


_CHECK_SIZES = os.environ.get("DROREBEL_DP_CHECK_SIZES", "0") == "1"


def set_check_sizes(enabled: bool) -> bool:
    """Process-wide default of ``gather_rows``'s equal-size check; returns the previous one."""
    global _CHECK_SIZES
    previous, _CHECK_SIZES = _CHECK_SIZES, bool(enabled)
    return previous


def check_equal_local_sizes(
    n_local: int, device: torch.device, group: object | None = None
) -> None:
    """Raise ``ValueError`` on every rank unless all ranks hold ``n_local`` pairs.

    Costs one all-gather of an int64 scalar and one host synchronisation. Every rank must call it
    (it is a collective).
    """
    world, _ = data_parallel_info(group)
    if world == 1:
        return
    mine = torch.tensor([n_local], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    counts = [int(s.item()) for s in sizes]
    if len(set(counts)) != 1:
        raise ValueError(
            f"data-parallel DRO weights need equal local batch sizes on every rank, got {counts} "
            "(pad or drop the last batch, or pass global_batch=False for per-rank weights)"
        )


def gather_rows(
    local: torch.Tensor, group: object | None = None, check_sizes: bool | None = None
) -> torch.Tensor:
    """All-gather the *detached* ``local`` along dim 0 in rank order: ``[world·n, ...]``.

    Returns ``local.detach()`` when not distributed. ``check_sizes`` (default: the process-wide
    setting, off unless enabled, see the module docstring) first verifies that every rank holds
    the same number of rows, at the cost of one extra collective and a host sync.
    """
    world, _ = data_parallel_info(group)
    local = local.detach()
    if world == 1:
        return local
    if _CHECK_SIZES if check_sizes is None else check_sizes:
        check_equal_local_sizes(local.shape[0], local.device, group)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def all_reduce_sum(x: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """Sum of the *detached* ``x`` over the ranks (``x.detach()`` when not distributed)."""
    world, _ = data_parallel_info(group)
    if world == 1:
        return x.detach()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
    return y


def local_slice(
    global_rows: torch.Tensor, n_local: int, group: object | None = None
) -> torch.Tensor:
    """This rank's rows ``[rank·n_local, (rank+1)·n_local)`` of a gathered tensor."""
    _, rank = data_parallel_info(group)
    return global_rows[rank * n_local : (rank + 1) * n_local]


def dp_global_sum(local: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """``Σ_ranks local`` as a value, with a gradient that DDP averaging turns into the exact one.

    Returns ``S + world·(local − local.detach())`` with ``S`` the all-reduced detached sum: its
    value is the global sum and its gradient on each rank is ``world·∇local``, so the averaged
    gradient is ``Σ_ranks ∇local`` = the gradient of the global sum. Identity when not distributed.
    """
    world, _ = data_parallel_info(group)
    if world == 1:
        return local
    return all_reduce_sum(local, group) + world * (local - local.detach())
