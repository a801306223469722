"""Forward Triton kernel of the fused linear log-prob: ``logp = (W h / T)[y] - logsumexp(W h / T)``.

One program owns ``BLOCK_N`` tokens and one contiguous range of the vocabulary (a *split*;
one split covers all of V when the launcher asks for a single split). It walks its range in
``BLOCK_V`` tiles; each logit tile is a small GEMM over the hidden size in ``BLOCK_K`` steps
(``tl.dot`` with fp32 accumulation) followed by an online-logsumexp update (running max ``m``
and rescaled sum ``s``, as in flash attention). The label's logit is picked out of the tile
that contains it. Nothing of size tokens x vocabulary is ever written.

Grid: axis 0 = vocabulary split (fastest), axis 1 = token block. Programs that run at the
same time therefore cover a few token blocks x all splits: the hidden rows of those blocks
stay in L2 while each split's W tiles are shared by every token block in flight (a grouped
GEMM order). See ``linear_logps.py`` for how the number of splits is chosen. With splits,
each program stores its partial (max, rescaled sum, label logit) and
``linear_logps_combine_kernel`` merges them.

Epilogue (``_epilogue``, shared by the one-split forward and the combine kernel): store ``lse``;
``logp = z[y] - lse`` is stored (``STORE_LOGP``) and/or added into its sequence's fp32 sum
(``SEQ_SUM``, ``_seq_sum``: one atomic per block lying in one sequence, else one per token).

Softmax cache (``CACHE_P``, off by default: the kernel then compiles to what it was without
it): for the token rows below ``cache_rows`` every tile also stores ``e = exp(z - m)`` (``m``:
the running max after that tile, so ``e <= 1``) into ``cache [R, V]`` and ``m`` itself, once per
``CACHE_GRANULE`` columns, into ``tile_max [R, ceil(V / CACHE_GRANULE)]``. The launcher then
rescales ``e`` by ``exp(m - lse)`` into the probabilities (``drorebel.kernels.softmax_cache``);
the backward of those rows starts from them instead of recomputing the logits.

The logit tile, split range, online-logsumexp step and partial store are the shared
``@triton.jit`` helpers of ``drorebel.kernels.tiles`` (also used by ``linear_wgrad_fwd.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from drorebel.kernels.tiles import logit_tile, online_lse_step, split_range, store_partials

# vocabulary columns per stored running max (drorebel.kernels.softmax_cache.CACHE_GRANULE);
# it divides every BLOCK_V of the configs
CACHE_GRANULE: tl.constexpr = tl.constexpr(64)


@triton.jit
def _load_labels(labels_ptr, seq_ptr, offs_n, mask_n, ignore_index, SEQ_SUM: tl.constexpr):
    """int64 labels of a token block; with SEQ_SUM, tokens of no sequence (id < 0) are ignored."""
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index).to(tl.int64)
    if SEQ_SUM:
        seq = tl.load(seq_ptr + offs_n, mask=mask_n, other=-1)
        labels = tl.where(seq >= 0, labels, ignore_index)
    return labels


@triton.jit
def _seq_sum(logp, seq, valid, seqsum_ptr):
    """``seqsum[seq_t] += logp_t`` over the valid tokens of a block, in fp32 atomics.

    Blocks of padded or packed batches are runs of one or two sequences: a block that lies in
    one sequence reduces in registers and issues ONE atomic; a block that straddles sequences
    issues one atomic per token (addresses repeat, the hardware serialises them).
    """
    lo = tl.min(tl.where(valid, seq, 2147483647), axis=0)
    hi = tl.max(tl.where(valid, seq, -1), axis=0)
    if lo == hi:
        tl.atomic_add(seqsum_ptr + lo, tl.sum(tl.where(valid, logp, 0.0), axis=0), sem="relaxed")
    elif lo < hi:
        tl.atomic_add(seqsum_ptr + seq, logp, mask=valid, sem="relaxed")


@triton.jit
def _store_cache_tile(cache_ptr, tmax_ptr, e, m, v0, offs_n, offs_v, mask_v, V, cache_rows,
                      stride_cn, stride_tn, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Softmax cache of one tile: ``e = exp(z - m)`` (cache dtype) for the rows below
    ``cache_rows``, and the running max ``m`` once per CACHE_GRANULE columns of the tile."""
    rows = offs_n < cache_rows
    tl.store(cache_ptr + offs_n[:, None] * stride_cn + offs_v[None, :],
             e.to(cache_ptr.dtype.element_ty), mask=rows[:, None] & mask_v[None, :])
    offs_g = v0 // CACHE_GRANULE + tl.arange(0, BLOCK_V // CACHE_GRANULE)
    granules = tl.cdiv(V, CACHE_GRANULE)
    tile_max = m[:, None] + tl.zeros((BLOCK_N, BLOCK_V // CACHE_GRANULE), dtype=tl.float32)
    tl.store(tmax_ptr + offs_n[:, None] * stride_tn + offs_g[None, :], tile_max,
             mask=rows[:, None] & (offs_g < granules)[None, :])


@triton.jit
def _epilogue(lse, z_label, labels, offs_n, mask_n, ignore_index, lse_ptr, logp_ptr, seq_ptr,
              seqsum_ptr, SEQ_SUM: tl.constexpr, STORE_LOGP: tl.constexpr):
    """Store ``lse``; ``logp = z[y] - lse`` goes to memory (STORE_LOGP) and/or straight into its
    sequence's sum (SEQ_SUM), so per-token log-probs need not round-trip through memory."""
    valid = labels != ignore_index
    logp = tl.where(valid, z_label - lse, 0.0)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    if STORE_LOGP:
        tl.store(logp_ptr + offs_n, logp, mask=mask_n)
    if SEQ_SUM:
        seq = tl.load(seq_ptr + offs_n, mask=mask_n, other=-1)
        _seq_sum(logp, seq, valid & mask_n, seqsum_ptr)


@triton.jit
def linear_logps_fwd_kernel(
    hidden_ptr, weight_ptr, labels_ptr,
    logp_ptr, lse_ptr,      # [N] fp32 outputs, written when SPLIT_V is False
    part_ptr,               # [3, S, N] fp32 partials (max, sum, label logit) when SPLIT_V
    seq_ptr, seqsum_ptr,    # SEQ_SUM: int32 sequence id per token (-1: none), fp32 [num_seqs]
    cache_ptr, tmax_ptr,    # CACHE_P: [R, V] exp(z - m) (bf16 or fp32), fp32 [R, V/granule] m
    N, V, H, stride_hn, stride_wv, inv_temp, ignore_index, cache_rows, stride_cn, stride_tn,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_V: tl.constexpr, SEQ_SUM: tl.constexpr, STORE_LOGP: tl.constexpr,
    CACHE_P: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-logsumexp forward over one (vocabulary split, token block)."""
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_splits = tl.num_programs(0)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = _load_labels(labels_ptr, seq_ptr, offs_n, mask_n, ignore_index, SEQ_SUM)

    v_begin, v_end = split_range(pid_s, num_splits, V, labels, ignore_index, BLOCK_V)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_label = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = logit_tile(
            hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn, stride_wv,
            BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, UPCAST_DOT, DOT_PRECISION,
        ) * inv_temp
        # the label's logit lies in exactly one tile of one split
        m, s, z_label, _, e = online_lse_step(z, offs_v, mask_v, labels, m, s, z_label)
        if CACHE_P:
            _store_cache_tile(cache_ptr, tmax_ptr, e, m, v0, offs_n, offs_v, mask_v, V,
                              cache_rows, stride_cn, stride_tn, BLOCK_N, BLOCK_V)

    if SPLIT_V:
        # (a token with every split empty is an ignored token: the combine zeroes it)
        store_partials(part_ptr, pid_s, num_splits, N, offs_n, mask_n, m, s, z_label)
    else:
        # an ignored block never entered the loop (s = 0): store lse = 0, never used
        lse = tl.where(s > 0, m + tl.log(s), 0.0)
        _epilogue(lse, z_label, labels, offs_n, mask_n, ignore_index, lse_ptr, logp_ptr,
                  seq_ptr, seqsum_ptr, SEQ_SUM, STORE_LOGP)


@triton.jit
def linear_logps_combine_kernel(
    part_ptr,               # [3, S, N] fp32 partials of the split forward
    labels_ptr, logp_ptr, lse_ptr, seq_ptr, seqsum_ptr,
    N, S, stride_part, ignore_index,     # stride_part = S·N
    BLOCK_N: tl.constexpr, SEQ_SUM: tl.constexpr, STORE_LOGP: tl.constexpr,
):
    """Merge the S split partials of a token block: ``lse = M + log Σ_j s_j e^{m_j - M}``,
    ``z[y] = Σ_j z_j`` (one split holds the label), then the same epilogue as one split."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = _load_labels(labels_ptr, seq_ptr, offs_n, mask_n, ignore_index, SEQ_SUM)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_label = tl.zeros((BLOCK_N,), dtype=tl.float32)
    base = part_ptr + offs_n
    for _ in range(0, S):
        m_j = tl.load(base, mask=mask_n, other=float("-inf"))
        s_j = tl.load(base + stride_part, mask=mask_n, other=0.0)
        z_label += tl.load(base + 2 * stride_part, mask=mask_n, other=0.0)
        m_new = tl.maximum(m, m_j)
        # empty splits carry m = -inf: shift by 0 instead, so that -inf - -inf never appears
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + s_j * tl.exp(m_j - shift)
        m = m_new
        base += N
    lse = tl.where(s > 0, m + tl.log(s), 0.0)
    _epilogue(lse, z_label, labels, offs_n, mask_n, ignore_index, lse_ptr, logp_ptr,
              seq_ptr, seqsum_ptr, SEQ_SUM, STORE_LOGP)
