"""Forward Triton kernels of ``linear_logps_wgrad`` (Wasserstein hidden-state penalty).

Per token t, with ``z = W h / T`` and ``p = softmax(z)`` (docs/design.md §1, DRO-REBEL arXiv
2509.19104):

    logp = z[y] - lse,    lse = logsumexp(z),    μ = Σ_v p_v W_v    (an H-vector)

``μ`` is the output accumulator of an attention-like pass over the vocabulary: queries h,
keys and values W. ``wgrad_flash_fwd_kernel`` walks ``BLOCK_V`` vocabulary tiles once per
token block, keeping the running max ``m``, the rescaled sum ``s`` and the rescaled
accumulator ``acc = Σ_v e^{z_v - m} W_v`` (flash attention's online softmax); at the end
``μ = acc / s``. The accumulator of a program covers ``BLOCK_D`` columns of H (grid axis 0),
so a program's registers hold ``[BLOCK_N, BLOCK_D]`` whatever H is; every H-slice recomputes
the logit tile, which is why the launcher uses this one-pass kernel for small H only and the
vocabulary-chunked scheme for large H. With ``ACC_MU=False`` the same kernel is a plain
online-logsumexp pass over vocabulary splits (grid axis 0 = split) whose partials the launcher
merges into ``(logp, lse)``: the first pass of that scheme.

``wgrad_probs_kernel`` writes ``P = exp(z - lse)`` for one vocabulary chunk (input dtype);
the launcher accumulates ``μ += P_c @ W_c`` with cuBLAS. The logit tile, the online-logsumexp
step, the split range/partials and the chunk-tile order are the ``@triton.jit`` helpers of
``drorebel.kernels.tiles``, shared with the ``linear_logps`` kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl

from drorebel.kernels.tiles import (
    chunk_tile,
    logit_tile,
    online_lse_step,
    split_range,
    store_partials,
)


@triton.jit
def wgrad_flash_fwd_kernel(
    hidden_ptr, weight_ptr, labels_ptr,
    logp_ptr, lse_ptr,      # [N] fp32 (ACC_MU), written by the programs of H-slice 0
    mu_ptr,                 # [N, H] fp32 (ACC_MU)
    part_ptr,               # [3, S, N] fp32 partials (max, sum, label logit) (not ACC_MU)
    N, V, H, stride_hn, stride_wv, inv_temp, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC_MU: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax pass over the vocabulary.

    ``ACC_MU``: grid axis 0 = H-slice; logp, lse and μ[:, slice] over the whole vocabulary.
    Otherwise: grid axis 0 = vocabulary split (a contiguous range of whole tiles, the last
    one possibly empty); the split's (max, rescaled sum, label logit) go to ``part_ptr``.
    """
    pid_a = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index).to(tl.int64)
    offs_d = pid_a.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < H
    if ACC_MU:  # one split: the whole vocabulary
        v_begin, v_end = split_range(pid_a * 0, 1, V, labels, ignore_index, BLOCK_V)
    else:
        v_begin, v_end = split_range(pid_a, tl.num_programs(0), V, labels, ignore_index,
                                     BLOCK_V)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_label = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = logit_tile(
            hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn, stride_wv,
            BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, UPCAST_DOT, DOT_PRECISION,
        ) * inv_temp
        m, s, z_label, alpha, e = online_lse_step(z, offs_v, mask_v, labels, m, s, z_label)
        if ACC_MU:
            # acc <- acc·α + e @ W[tile, d-slice]: the flash-attention output update
            w = tl.load(weight_ptr + offs_v[:, None] * stride_wv + offs_d[None, :],
                        mask=mask_v[:, None] & mask_d[None, :], other=0.0)
            eq = e.to(weight_ptr.dtype.element_ty)       # tensor-core operand, like P in FA2
            if UPCAST_DOT:
                eq = eq.to(tl.float32)
                w = w.to(tl.float32)
            acc = acc * alpha[:, None]
            acc = tl.dot(eq, w, acc, input_precision=DOT_PRECISION)

    if ACC_MU:
        ok = s > 0  # false only for rows of a skipped (fully ignored) block
        mu = acc / tl.where(ok, s, 1.0)[:, None]
        tl.store(mu_ptr + offs_n[:, None] * H + offs_d[None, :], mu,
                 mask=mask_n[:, None] & mask_d[None, :])
        if pid_a == 0:
            lse = tl.where(ok, m + tl.log(tl.where(ok, s, 1.0)), 0.0)
            logp = tl.where(labels != ignore_index, z_label - lse, 0.0)
            tl.store(lse_ptr + offs_n, lse, mask=mask_n)
            tl.store(logp_ptr + offs_n, logp, mask=mask_n)
    else:
        store_partials(part_ptr, pid_a, tl.num_programs(0), N, offs_n, mask_n, m, s, z_label)


@triton.jit
def wgrad_probs_kernel(
    hidden_ptr, weight_ptr, labels_ptr, lse_ptr,
    probs_ptr,              # [N, v_stop - v_start] output (input dtype), row stride stride_pn
    N, H, v_start, v_stop, stride_hn, stride_wv, stride_pn, inv_temp, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``P = exp(z - lse)`` for vocabulary rows [v_start, v_stop); 0 at ignored tokens."""
    offs_n, offs_c, offs_v, mask_n, mask_v = chunk_tile(N, v_start, v_stop, BLOCK_N, BLOCK_V,
                                                        GROUP_N)
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)
    valid = labels != ignore_index
    P = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        z = logit_tile(
            hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn, stride_wv,
            BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, UPCAST_DOT, DOT_PRECISION,
        ) * inv_temp
        P = tl.where(valid[:, None] & mask_v[None, :], tl.exp(z - lse[:, None]), 0.0)
    # the buffer is uninitialised: fully ignored blocks still store their zeros
    ptrs = probs_ptr + offs_n[:, None] * stride_pn + offs_c[None, :]
    tl.store(ptrs, P.to(probs_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])
