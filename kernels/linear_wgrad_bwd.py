"""Backward Triton kernel of ``linear_logps_wgrad`` (exact gradients, derivation in
docs/wasserstein.md §2-§3).

Per token, with ``p = softmax(W h / T)``, ``μ = Σ_v p_v W_v``, ``d = W_y − μ`` and upstream
gradients ``g = ∂L/∂logp``, ``g_q = ∂L/∂q`` (``q = ‖d‖²``):

    m_v = [v = y] − p_v,        a_v = p_v (W_v − μ)·d = p_v (W_v·d − μ·d)
    G_v = (g/T) m_v − (2 g_q/T) a_v                      (logit-space gradient)
    dH  = G W,                  dW = Gᵀ H + mᵀ D,   D_t = 2 g_{q,t} d_t

``wgrad_bwd_tiles_kernel`` computes, for one (token block, vocabulary tile) of a vocabulary
chunk, the two dot products ``h·W_v`` and ``d·W_v`` in ONE loop over the hidden size (each W
tile is loaded once and feeds two ``tl.dot``), then the epilogue above, and stores ``G`` and
``m`` (input dtype) into the chunk buffer ``[2N, V_c]`` (G on top, m below). The launcher
finishes with cuBLAS: ``dH += G_c W_c`` and ``dW_c = [G_c; m_c]ᵀ [H; D]`` (one GEMM over 2N).
"""

from __future__ import annotations

import triton
import triton.language as tl

from drorebel.kernels.tiles import chunk_tile


@triton.jit
def _wg_dual_tile(
    hidden_ptr, d_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """fp32 tiles ``(h @ W_tileᵀ, d @ W_tileᵀ)``; ``d`` is row-major [N, H] (stride H)."""
    zh = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    zd = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = hidden_ptr + offs_n[:, None] * stride_hn + offs_k[None, :]
    d_ptrs = d_ptr + offs_n[:, None] * H + offs_k[None, :]
    w_ptrs = weight_ptr + offs_v[:, None] * stride_wv + offs_k[None, :]
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            h = tl.load(h_ptrs, mask=mask_n[:, None], other=0.0)
            d = tl.load(d_ptrs, mask=mask_n[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_v[:, None], other=0.0)
        else:
            mask_k = (k0 + offs_k) < H
            h = tl.load(h_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            d = tl.load(d_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_v[:, None] & mask_k[None, :], other=0.0)
        if UPCAST_DOT:
            h = h.to(tl.float32)
            d = d.to(tl.float32)
            w = w.to(tl.float32)
        wt = tl.trans(w)
        zh = tl.dot(h, wt, zh, input_precision=DOT_PRECISION)
        zd = tl.dot(d, wt, zd, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        d_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return zh, zd


@triton.jit
def wgrad_bwd_tiles_kernel(
    hidden_ptr, weight_ptr, labels_ptr, lse_ptr,
    d_ptr,                  # [N, H] d = W_y − μ in the input dtype (row-major)
    md_ptr,                 # [N] fp32 μ·d (with the same rounded d)
    gs_ptr, gqs_ptr,        # [N] fp32 g/T and 2 g_q/T, zero at ignored tokens
    g_out_ptr, m_out_ptr,   # chunk buffers [N, v_stop - v_start], row stride stride_on
    N, H, v_start, v_stop, stride_hn, stride_wv, stride_on, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    STORE_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """G and m tiles of vocabulary rows [v_start, v_stop) for all N tokens."""
    offs_n, offs_c, offs_v, mask_n, mask_v = chunk_tile(N, v_start, v_stop, BLOCK_N, BLOCK_V,
                                                        GROUP_N)
    gs = tl.load(gs_ptr + offs_n, mask=mask_n, other=0.0)
    gqs = tl.load(gqs_ptr + offs_n, mask=mask_n, other=0.0)
    # rows with g = g_q = 0 (ignored tokens: lse and μ are placeholders) give exact zeros
    live = (gs != 0.0) | (gqs != 0.0)
    G = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    M = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if tl.max(live.to(tl.int32), axis=0) > 0:
        labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        md = tl.load(md_ptr + offs_n, mask=mask_n, other=0.0)
        zh, zd = _wg_dual_tile(
            hidden_ptr, d_ptr, weight_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn,
            stride_wv, BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, UPCAST_DOT, DOT_PRECISION,
        )
        p = tl.exp(zh * inv_temp - lse[:, None])
        keep = live[:, None] & mask_v[None, :]
        M = tl.where(keep, (offs_v[None, :] == labels[:, None]).to(tl.float32) - p, 0.0)
        a = p * (zd - md[:, None])                       # a_v = p_v (W_v − μ)·d
        G = tl.where(keep, gs[:, None] * M - gqs[:, None] * a, 0.0)
    out = offs_n[:, None] * stride_on + offs_c[None, :]
    mask = mask_n[:, None] & mask_v[None, :]
    tl.store(g_out_ptr + out, G.to(g_out_ptr.dtype.element_ty), mask=mask)
    if STORE_M:
        tl.store(m_out_ptr + out, M.to(m_out_ptr.dtype.element_ty), mask=mask)
