"""The softmax cache of ``linear_logps``: pure-torch helpers shared by the chunked CPU path
(``drorebel.ops.chunked``) and the Triton launchers (``linear_logps.py``).

A recompute backward does four N·H·V GEMMs (forward logits, backward logits, dH, dW), one
more than materialised logits. With a cache, the forward keeps ``P = softmax(z)`` for the
first ``R`` token rows (``R`` fitted to a byte budget) and the backward builds their logit
gradient from it without a GEMM:

    G_t = (onehot(y_t) - P_t) * g_t / T            (0 where g_t = 0: ignored tokens)
    dH = G @ W,   dW = G^T @ h

so those rows cost three GEMMs, like materialised logits. Rows ``>= R`` take the recompute
path. ``P`` is stored in bf16 for bf16 inputs and in the compute dtype (fp32; float64 for
float64) otherwise.

The Triton forward writes ``e = exp(z - m_j)`` for each vocabulary tile ``j`` (``m_j``: the
running max of the online logsumexp when the tile was seen) and ``m_j`` itself at the
granularity of ``CACHE_GRANULE`` vocabulary columns; :func:`rescale_cache` then turns ``e``
into ``P = e · exp(m_j - lse)`` once ``lse`` is known (an elementwise pass, no GEMM).

No triton import: the CPU paths use this module without Triton.
"""

from __future__ import annotations

import torch

__all__ = ["CACHE_GRANULE", "cache_dtype", "cache_rows", "cached_grad_logits", "rescale_cache"]

# vocabulary columns per stored running max of the Triton forward; divides every BLOCK_V
CACHE_GRANULE = 64
# fp32 elements of the rescale factors per step of rescale_cache (64 MiB): few launches
_FACTOR_ELEMENTS = 2**24


def cache_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the cached probabilities for inputs of ``dtype``: bf16 stays bf16 (what a
    materialised bf16 backward keeps), everything else the compute dtype (fp32/float64)."""
    if dtype == torch.bfloat16:
        return dtype
    return torch.promote_types(dtype, torch.float32)


def cache_rows(budget_bytes: int, n: int, v: int, dtype: torch.dtype) -> int:
    """Token rows whose ``[rows, V]`` probabilities fit ``budget_bytes`` (0 <= rows <= N)."""
    if budget_bytes <= 0 or n == 0 or v == 0:
        return 0
    elt = torch.empty((), dtype=cache_dtype(dtype)).element_size()
    return int(min(n, budget_bytes // (v * elt)))


def rescale_cache(probs: torch.Tensor, tile_max: torch.Tensor, lse: torch.Tensor) -> None:
    """In place ``probs[r, c] *= exp(tile_max[r, c // CACHE_GRANULE] - lse[r])``.

    ``probs [R, V]`` holds ``exp(z - m_j)`` as written by the Triton forward, ``tile_max
    [R, ceil(V / CACHE_GRANULE)]`` the ``m_j``; the factors are <= 1 (``m_j <= lse``).
    Rows of fully ignored token blocks were never written (the launcher zeroed the cache
    first): they stay 0.
    """
    r, v = probs.shape
    if r == 0:
        return
    full = v // CACHE_GRANULE * CACHE_GRANULE
    step = max(1, _FACTOR_ELEMENTS // tile_max.shape[1])
    for r0 in range(0, r, step):
        r1 = min(r, r0 + step)
        factor = torch.exp(tile_max[r0:r1] - lse[r0:r1, None])      # [rows, granules] fp32
        if full:
            body = probs[r0:r1, :full].unflatten(1, (full // CACHE_GRANULE, CACHE_GRANULE))
            body.mul_(factor[:, : full // CACHE_GRANULE, None])
        if full < v:  # the last, partial granule
            probs[r0:r1, full:].mul_(factor[:, -1:])


def cached_grad_logits(
    out: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
    v0: int = 0,
) -> torch.Tensor:
    """Write ``G = (onehot(y) - P) * scale`` for columns ``[v0, v0 + out.shape[1])`` into
    ``out [R, width]`` (any float dtype, e.g. a bf16 GEMM operand) and return it.

    ``probs [R, V]``: the cache; ``labels [R]`` (a label outside the columns, e.g. an ignored
    one, adds no one-hot term); ``scale [R] = g / T`` (fp32 or float64), 0 at ignored tokens.
    Every entry is computed in ``scale``'s dtype and rounded once into ``out``: ``-p·s``
    by one elementwise pass, then the label's entry ``(1 - p_y)·s`` (no cancellation in a
    16-bit ``out``).
    """
    width = out.shape[1]
    s = scale[:, None]
    p = probs[:, v0:v0 + width]
    g = torch.mul(p, -s, out=out)  # one pass, no [R, width] temporary
    # the label's column, for the labels inside [v0, v0 + width); others keep -p·s
    col = labels[:, None].long() - v0
    inside = (col >= 0) & (col < width)
    col = torch.where(inside, col, 0)
    label_g = torch.where(inside, (1.0 - p.gather(1, col).to(s.dtype)) * s,
                          g.gather(1, col).to(s.dtype))
    return g.scatter_(1, col, label_g.to(g.dtype))
