"""Forward Triton kernels of ``linear_logprobs_wgrad`` (Wasserstein hidden-state penalty).

Per token t, with ``z = W h / T`` and ``p = softmax(z)`` (DESIGN.md §1, DRO-REBEL arXiv
2509.19104):

    logp = z[y] - lse,    lse = logsumexp(z),    μ = Σ_v p_v W_v    (an H-vector)

``μ`` is the output accumulator of an attention-like pass over the vocabulary: queries h,
keys and values W. ``_wgrad_flash_fwd_kernel`` walks ``BLOCK_V`` vocabulary tiles once per
token block, keeping the running max ``m``, the rescaled sum ``s`` and the rescaled
accumulator ``acc = Σ_v e^{z_v - m} W_v`` (flash attention's online softmax); at the end
``μ = acc / s``. The accumulator of a program covers ``BLOCK_D`` columns of H (grid axis 0),
so a program's registers hold ``[BLOCK_N, BLOCK_D]`` whatever H is; every H-slice recomputes
the logit tile, which is why the launcher uses this one-pass kernel for small H only and the
vocabulary-chunked scheme for large H. With ``ACC_MU=False`` the same kernel is a plain
online-logsumexp pass over vocabulary splits (grid axis 0 = split) whose partials the launcher
merges into ``(logp, lse)``: the first pass of that scheme.

``_wgrad_probs_kernel`` writes ``P = exp(z - lse)`` for one vocabulary chunk (input dtype);
the launcher accumulates ``μ += P_c @ W_c`` with cuBLAS.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _wg_logit_tile(
    hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """fp32 tile ``h[offs_n] @ W[offs_v]^T`` ([BLOCK_N, BLOCK_V], unscaled logits)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = hidden_ptr + offs_n[:, None] * stride_hn + offs_k[None, :]
    w_ptrs = weight_ptr + offs_v[:, None] * stride_wv + offs_k[None, :]
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            h = tl.load(h_ptrs, mask=mask_n[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_v[:, None], other=0.0)
        else:
            mask_k = (k0 + offs_k) < H
            h = tl.load(h_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_v[:, None] & mask_k[None, :], other=0.0)
        if UPCAST_DOT:
            # the CPU interpreter multiplies raw bf16 bit patterns in tl.dot: go through fp32
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _wg_tile_coords(pid, N, V_CHUNK, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    GROUP_N: tl.constexpr):
    """Grouped program order: ``GROUP_N`` token blocks share one W tile while it is in L2."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_v = tl.cdiv(V_CHUNK, BLOCK_V)
    num_in_group = GROUP_N * num_pid_v
    first_n = (pid // num_in_group) * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % num_in_group) % group_size
    pid_v = (pid % num_in_group) // group_size
    return pid_n, pid_v


@triton.jit
def _wgrad_flash_fwd_kernel(
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
    if ACC_MU:
        v_begin = pid_a.to(tl.int64) * 0                 # 0 as an int64 tensor, like below
        v_end = v_begin + V
    else:
        tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), tl.num_programs(0))
        v_begin = pid_a.to(tl.int64) * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    # a block whose labels are all ignored (prompt, padding) skips the vocabulary loop
    any_valid = tl.max((labels != ignore_index).to(tl.int32), axis=0) > 0
    v_end = tl.where(any_valid, v_end, v_begin)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_label = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _wg_logit_tile(
            hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn, stride_wv,
            BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, UPCAST_DOT, DOT_PRECISION,
        ) * inv_temp
        z = tl.where(mask_v[None, :], z, float("-inf"))  # columns past V are not in the softmax
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)                        # rescales everything summed so far
        e = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        z_label += tl.sum(tl.where(offs_v[None, :] == labels[:, None], z, 0.0), axis=1)
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
        m = m_new

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
        # an empty split leaves (-inf, 0, 0): neutral in the launcher's combine
        base = part_ptr + pid_a.to(tl.int64) * N + offs_n
        stride_part = tl.num_programs(0).to(tl.int64) * N
        tl.store(base, m, mask=mask_n)
        tl.store(base + stride_part, s, mask=mask_n)
        tl.store(base + 2 * stride_part, z_label, mask=mask_n)


@triton.jit
def _wgrad_probs_kernel(
    hidden_ptr, weight_ptr, labels_ptr, lse_ptr,
    probs_ptr,              # [N, v_stop - v_start] output (input dtype), row stride stride_pn
    N, H, v_start, v_stop, stride_hn, stride_wv, stride_pn, inv_temp, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``P = exp(z - lse)`` for vocabulary rows [v_start, v_stop); 0 at ignored tokens."""
    pid_n, pid_v = _wg_tile_coords(tl.program_id(0), N, v_stop - v_start, BLOCK_N, BLOCK_V,
                                   GROUP_N)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)  # column in the chunk
    offs_v = v_start + offs_c
    mask_n = offs_n < N
    mask_v = offs_v < v_stop
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)
    valid = labels != ignore_index
    P = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        z = _wg_logit_tile(
            hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn, stride_wv,
            BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, UPCAST_DOT, DOT_PRECISION,
        ) * inv_temp
        P = tl.where(valid[:, None] & mask_v[None, :], tl.exp(z - lse[:, None]), 0.0)
    # the buffer is uninitialised: fully ignored blocks still store their zeros
    ptrs = probs_ptr + offs_n[:, None] * stride_pn + offs_c[None, :]
    tl.store(ptrs, P.to(probs_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])
