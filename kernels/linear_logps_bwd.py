"""Backward Triton kernels of the fused linear log-prob.

With ``z = W h / T``, ``p = softmax(z)`` and upstream gradient ``g`` per token (0 for ignored
tokens), the gradient of the logits is ``G = (onehot(y) - p) * g / T`` and

    dH = G @ W,      dW = G^T @ h.

Both kernels recompute a ``[BLOCK_N, BLOCK_V]`` logit tile from ``h`` and ``W`` (one pass over
the hidden size), turn it into a ``G`` tile with the ``lse`` saved by the forward, and then

* ``linear_logps_grad_logits_kernel`` stores the ``G`` tile (input dtype) into a buffer
  that covers one vocabulary chunk ``[N, V_c]``; the launcher feeds that chunk to two cuBLAS
  GEMMs (the default scheme on CUDA, see ``linear_logps.py``);
* ``linear_logps_bwd_kernel`` (Cut-Cross-Entropy style) keeps ``G`` in registers and loops
  over the hidden size again, ``tl.atomic_add``-ing ``G @ W_tile`` into an fp32 ``dH`` and
  ``G^T @ h_tile`` into an fp32 ``dW``. Passes over W: 2 per token block (recompute + the
  dH/dW loop); atomic traffic: ``N·H·ceil(V/BLOCK_V) + V·H·ceil(N/BLOCK_N)`` fp32 adds.

Grid order (both): 1-D grid, grouped like a GEMM (``tiles.chunk_tile``): ``GROUP_N`` token
blocks vary fastest and share one W tile in L2, then the next W tile, then the next group of
token blocks.
Token blocks whose upstream gradient is zero everywhere (ignored tokens) skip all work.
``SEQ_GRAD``: the upstream gradient is per sequence ([num_seqs], with an int32 sequence id per
token) and each token reads ``g[seq_t]`` (``_token_grad``): no [N] gradient tensor is built.
"""

from __future__ import annotations

import triton
import triton.language as tl

from drorebel.kernels.tiles import chunk_tile, logit_tile


@triton.jit
def _token_grad(grad_ptr, seq_ptr, labels_ptr, offs_n, mask_n, ignore_index,
                SEQ_GRAD: tl.constexpr):
    """fp32 upstream gradient g_t of a token block, 0 at ignored tokens.

    Per token (``SEQ_GRAD`` False): ``grad`` is [N] and the launcher already zeroed ignored
    tokens. Per sequence (``SEQ_GRAD``): ``grad`` is [num_seqs] and each token reads its
    sequence's entry, ``g_t = grad[seq_t]`` (0 when ``seq_t < 0`` or the label is ignored), so
    no [N] gradient tensor exists: the broadcast happens here, in registers.
    """
    if SEQ_GRAD:
        seq = tl.load(seq_ptr + offs_n, mask=mask_n, other=-1)
        labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)
        take = mask_n & (seq >= 0) & (labels != ignore_index)
        g = tl.load(grad_ptr + tl.where(take, seq, 0), mask=take, other=0.0)
    else:
        g = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0)
    return g


@triton.jit
def _grad_logits_tile(
    hidden_ptr, weight_ptr, labels_ptr, lse_ptr, grad_ptr, seq_ptr, offs_n, offs_v, mask_n,
    mask_v, H, stride_hn, stride_wv, inv_temp, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    SEQ_GRAD: tl.constexpr, EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """fp32 ``G = (onehot(y) - exp(z - lse)) * g / T`` on one tile; zero where ``g == 0``.

    Returns ``(G, active)`` where ``active`` says whether any token of the block has g != 0;
    inactive blocks skip the logit recomputation (G is then all zeros).
    """
    g = _token_grad(grad_ptr, seq_ptr, labels_ptr, offs_n, mask_n, ignore_index, SEQ_GRAD)
    active = tl.max(tl.abs(g), axis=0) > 0.0
    G = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if active:
        labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        z = logit_tile(
            hidden_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn, stride_wv,
            BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, UPCAST_DOT, DOT_PRECISION,
        ) * inv_temp
        p = tl.exp(z - lse[:, None])
        onehot = (offs_v[None, :] == labels[:, None]).to(tl.float32)
        scale = g * inv_temp
        # rows with g == 0 (ignored tokens: their lse is a placeholder) must give exact zeros
        G = tl.where((scale != 0.0)[:, None] & mask_v[None, :], (onehot - p) * scale[:, None], 0.0)
    return G, active


@triton.jit
def linear_logps_grad_logits_kernel(
    hidden_ptr, weight_ptr, labels_ptr, lse_ptr, grad_ptr,
    seq_ptr,                # SEQ_GRAD: int32 sequence id per token, grad is per sequence
    glogits_ptr,            # [N, v_stop - v_start] output, input dtype
    N, H, v_start, v_stop, stride_hn, stride_wv, stride_gn, inv_temp, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    SEQ_GRAD: tl.constexpr, EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Write the logit gradient of vocabulary rows [v_start, v_stop) for all N tokens."""
    offs_n, offs_c, offs_v, mask_n, mask_v = chunk_tile(N, v_start, v_stop, BLOCK_N, BLOCK_V,
                                                        GROUP_N)
    G, active = _grad_logits_tile(
        hidden_ptr, weight_ptr, labels_ptr, lse_ptr, grad_ptr, seq_ptr, offs_n, offs_v, mask_n,
        mask_v, H, stride_hn, stride_wv, inv_temp, ignore_index,
        BLOCK_N, BLOCK_V, BLOCK_K, SEQ_GRAD, EVEN_K, UPCAST_DOT, DOT_PRECISION,
    )
    # the buffer is uninitialised: inactive blocks still store their zeros
    ptrs = glogits_ptr + offs_n[:, None] * stride_gn + offs_c[None, :]
    tl.store(ptrs, G.to(glogits_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


@triton.jit
def linear_logps_bwd_kernel(
    hidden_ptr, weight_ptr, labels_ptr, lse_ptr, grad_ptr,
    seq_ptr,                # SEQ_GRAD: int32 sequence id per token, grad is per sequence
    dh_ptr, dw_ptr,         # fp32 accumulators [N, H] and [V, H], zero on entry
    N, V, H, stride_hn, stride_wv, inv_temp, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    SEQ_GRAD: tl.constexpr, EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """CCE-style tile backward: dH += G @ W_tile, dW += G^T @ h_tile with fp32 atomics."""
    offs_n, _, offs_v, mask_n, mask_v = chunk_tile(N, 0, V, BLOCK_N, BLOCK_V, GROUP_N)
    G, active = _grad_logits_tile(
        hidden_ptr, weight_ptr, labels_ptr, lse_ptr, grad_ptr, seq_ptr, offs_n, offs_v, mask_n,
        mask_v, H, stride_hn, stride_wv, inv_temp, ignore_index,
        BLOCK_N, BLOCK_V, BLOCK_K, SEQ_GRAD, EVEN_K, UPCAST_DOT, DOT_PRECISION,
    )
    if active:
        # round G to the input dtype (tensor-core operand), as a materialised backward does
        Gq = G.to(hidden_ptr.dtype.element_ty)
        if UPCAST_DOT:
            Gq = Gq.to(tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, H, BLOCK_K):
            cols = k0 + offs_k
            mask_k = cols < H
            w = tl.load(weight_ptr + offs_v[:, None] * stride_wv + cols[None, :],
                        mask=mask_v[:, None] & mask_k[None, :], other=0.0)
            h = tl.load(hidden_ptr + offs_n[:, None] * stride_hn + cols[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if UPCAST_DOT:
                w = w.to(tl.float32)
                h = h.to(tl.float32)
            dh = tl.dot(Gq, w, input_precision=DOT_PRECISION)             # [BLOCK_N, BLOCK_K]
            dw = tl.dot(tl.trans(Gq), h, input_precision=DOT_PRECISION)   # [BLOCK_V, BLOCK_K]
            tl.atomic_add(dh_ptr + offs_n[:, None] * H + cols[None, :], dh,
                          mask=mask_n[:, None] & mask_k[None, :], sem="relaxed")
            tl.atomic_add(dw_ptr + offs_v[:, None] * H + cols[None, :], dw,
                          mask=mask_v[:, None] & mask_k[None, :], sem="relaxed")
