"""Per-token values -> per-sequence sums: ``log π(y|x) = Σ_t log π(y_t | x, y_<t)``.

The sequence log-prob of REBEL (arXiv 2404.16767) and DRO-REBEL (arXiv 2509.19104) sums
the per-token log-probs over the response tokens only (DESIGN.md §1). Two layouts:

* padded: ``token_logps [B, T]`` -> ``[B]``, summing where ``labels != ignore_index``;
* packed: ``token_logps [total]`` with ``cu_seqlens [S+1]`` (sequence i is
  ``cu_seqlens[i]:cu_seqlens[i+1]``) -> ``[S]``, one ``index_add`` (no Python loop).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sequence_logps"]


def _masked(token_logps: Tensor, labels: Tensor | None, ignore_index: int) -> Tensor:
    if labels is None:
        return token_logps
    if labels.shape != token_logps.shape:
        raise ValueError(f"labels: expected shape {tuple(token_logps.shape)}, "
                         f"got {tuple(labels.shape)}")
    # where (not a product) so that a non-finite value at a masked position cannot leak
    return torch.where(labels != ignore_index, token_logps, torch.zeros_like(token_logps))


def _segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """Sequence index of each packed position; positions outside [cu[0], cu[S]) get S."""
    num_seqs = cu_seqlens.numel() - 1
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    seg = torch.searchsorted(cu_seqlens, positions, right=True) - 1
    outside = (seg < 0) | (seg >= num_seqs)
    return torch.where(outside, torch.full_like(seg, num_seqs), seg).long()


def sequence_logps(
    token_logps: Tensor,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Sum per-token log-probs per sequence: ``out_i = Σ_{t in seq i, y_t != ignore} logp_t``.

    Args:
        token_logps: [B, T] (padded) or [total] (packed, with ``cu_seqlens``) values.
        labels: optional ids of the same shape; positions equal to ``ignore_index`` add 0.
        ignore_index: masked label value.
        cu_seqlens: int32/int64 [S+1] non-decreasing offsets of packed sequences; positions
            outside ``[cu_seqlens[0], cu_seqlens[-1])`` belong to no sequence.

    Returns:
        [B] (padded) or [S] (packed) sums, differentiable w.r.t. ``token_logps``.
    """
    values = _masked(token_logps, labels, ignore_index)
    if cu_seqlens is None:
        if values.dim() < 1:
            raise ValueError("token_logps: expected [B, T] (or [T]), got a scalar")
        return values.sum(dim=-1)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected a 1-D [S+1] tensor, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens: dtype must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != values.device:
        raise ValueError(f"cu_seqlens: device {cu_seqlens.device} != token_logps' {values.device}")
    flat = values.reshape(-1)
    num_seqs = cu_seqlens.numel() - 1
    seg = _segment_ids(cu_seqlens, flat.numel())
    out = flat.new_zeros(num_seqs + 1).index_add(0, seg, flat)
    return out[:num_seqs]
