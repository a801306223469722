"""``@triton.jit`` building blocks shared by the log-prob and ``linear_logps_wgrad`` kernels.

* :func:`logit_tile`: one ``[BLOCK_N, BLOCK_V]`` tile of unscaled logits ``h W^T`` (a small
  GEMM over the hidden size in ``BLOCK_K`` steps, ``tl.dot`` with fp32 accumulation);
* :func:`split_range`: the vocabulary range of one split of the forward grid;
* :func:`online_lse_step`: one tile of the online logsumexp (running max ``m`` and rescaled
  sum ``s``, as in flash attention), picking out the label's logit;
* :func:`store_partials`: a split's ``(max, rescaled sum, label logit)`` for the combine;
* :func:`tile_coords` / :func:`chunk_tile`: the grouped (GEMM-like) program order over
  (token block, vocabulary block) tiles of a vocabulary chunk.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["chunk_tile", "logit_tile", "online_lse_step", "split_range", "store_partials",
           "tile_coords"]


@triton.jit
def logit_tile(
    hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """fp32 tile ``h[offs_n] @ W[offs_v]^T`` of shape [BLOCK_N, BLOCK_V] (unscaled logits)."""
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
def split_range(pid_s, num_splits, V, labels, ignore_index, BLOCK_V: tl.constexpr):
    """Vocabulary range ``[v_begin, v_end)`` of split ``pid_s`` of ``num_splits``, in whole
    ``BLOCK_V`` tiles (the last split may be empty); empty when every label is ignored."""
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), num_splits)
    v_begin = pid_s.to(tl.int64) * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    # a block whose labels are all ignored (prompt, padding) skips the vocabulary loop
    any_valid = tl.max((labels != ignore_index).to(tl.int32), axis=0) > 0
    return v_begin, tl.where(any_valid, v_end, v_begin)


@triton.jit
def online_lse_step(z, offs_v, mask_v, labels, m, s, z_label):
    """One logit tile ``z`` of the online logsumexp (flash-attention update).

    Columns past V are masked to -inf; returns ``(m', s', z_label', α, e)`` with the running
    max ``m' = max(m, max_v z_v)``, ``α = e^{m - m'}`` (rescales everything summed so far),
    ``e = e^{z - m'}`` (the tile's weights), ``s' = α s + Σ_v e_v`` and the label's logit added
    into ``z_label`` when it lies in this tile (ignored labels never match).
    """
    z = tl.where(mask_v[None, :], z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(z - m_new[:, None])
    s = s * alpha + tl.sum(e, axis=1)
    z_label += tl.sum(tl.where(offs_v[None, :] == labels[:, None], z, 0.0), axis=1)
    return m_new, s, z_label, alpha, e


@triton.jit
def store_partials(part_ptr, pid_s, num_splits, N, offs_n, mask_n, m, s, z_label):
    """Store a split's (max, rescaled sum, label logit) into ``part [3, num_splits, N]``; an
    empty split stores (-inf, 0, 0), neutral in the combine."""
    base = part_ptr + pid_s.to(tl.int64) * N + offs_n
    stride_part = num_splits.to(tl.int64) * N
    tl.store(base, m, mask=mask_n)
    tl.store(base + stride_part, s, mask=mask_n)
    tl.store(base + 2 * stride_part, z_label, mask=mask_n)


@triton.jit
def tile_coords(pid, N, V_CHUNK, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                GROUP_N: tl.constexpr):
    """Grouped program order: (token block, vocab block) of the flat program id ``pid``.

    ``GROUP_N`` token blocks vary fastest and share one W tile in L2, then the next W tile,
    then the next group of token blocks.
    """
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_v = tl.cdiv(V_CHUNK, BLOCK_V)
    num_in_group = GROUP_N * num_pid_v
    first_n = (pid // num_in_group) * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % num_in_group) % group_size
    pid_v = (pid % num_in_group) // group_size
    return pid_n, pid_v


@triton.jit
def chunk_tile(N, v_start, v_stop, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               GROUP_N: tl.constexpr):
    """``(offs_n, offs_c, offs_v, mask_n, mask_v)`` of this program's tile of the vocabulary
    chunk ``[v_start, v_stop)`` (``offs_c``: column in the chunk, ``offs_v = v_start + offs_c``),
    in the grouped order of :func:`tile_coords`."""
    pid_n, pid_v = tile_coords(tl.program_id(0), N, v_stop - v_start, BLOCK_N, BLOCK_V, GROUP_N)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_v = v_start + offs_c
    return offs_n, offs_c, offs_v, offs_n < N, offs_v < v_stop
