"""Chunked PyTorch path of ``linear_logps_wgrad`` (CPU default; also runs on CUDA).

Per token t (``z = W h / T``, ``p = softmax(z)``, docs/design.md §1 Wasserstein-REBEL):

    logp_t = z[y] - lse,    μ_t = Σ_v p_v W_v,    d_t = W_y - μ_t,    q_t = ‖d_t‖²

``q_t`` is the squared norm of ``T·∇_{h_t} logp_t``, the per-token piece of the Wasserstein
penalty on the final hidden states. Backward for upstream ``(g, g_q)`` per token, with
``a_v = p_v (W_v − μ)·d`` (see docs/wasserstein.md for the derivation):

    G   = (g/T)(onehot(y) − p) − (2 g_q / T) a               [rows, V] logit-space gradient
    dH  = G W
    dW += Gᵀ H + (onehot(y) − p)ᵀ (2 g_q d)

μ is self-normalised, ``(p W) / Σ_v p_v``: with large logits q amplifies the rounding of
``Σ_v p_v = 1`` (docs/wasserstein.md §6). Saved between the passes: ``lse [N]`` and
``μ [N, H]``. Every ``[rows, V]`` tensor lives in one token chunk sized by
:func:`drorebel.ops.chunked.token_chunk_rows`; no ``[N, V]`` buffer exists.
"""

from __future__ import annotations

import torch

from drorebel.kernels.accum import addmm_acc
from drorebel.ops.chunked import active_chunks, chunk_setup

__all__ = ["wgrad_chunked_forward", "wgrad_chunked_backward"]


def _prep(hidden, weight, labels, ignore_index, chunk_rows):
    """:func:`chunk_setup` budgeting for the ~3 ``[rows, V]`` tensors the backward holds at
    once, plus W upcast to the compute dtype."""
    cdt, rows, valid, safe = chunk_setup(hidden, weight, labels, ignore_index, chunk_rows,
                                         live_buffers=3)
    return cdt, rows, weight.to(cdt), valid, safe


def _probs(h: torch.Tensor, w: torch.Tensor, temperature: float):
    """``(p, z, lse)`` of a chunk: softmax of ``h wᵀ / T`` (fresh [rows, V] tensors)."""
    z = h @ w.t()
    if temperature != 1.0:
        z.div_(temperature)
    lse = torch.logsumexp(z, dim=1)
    p = (z - lse.unsqueeze(1)).exp_()
    return p, z, lse


def wgrad_chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp [N], q [N], lse [N], mu [N, H])`` in the compute dtype; 0 at ignored tokens."""
    n = hidden.shape[0]
    cdt, rows, w, valid, safe = _prep(hidden, weight, labels, ignore_index, chunk_rows)
    logp = torch.zeros(n, dtype=cdt, device=hidden.device)
    q = torch.zeros(n, dtype=cdt, device=hidden.device)
    lse = torch.zeros(n, dtype=cdt, device=hidden.device)
    mu = torch.zeros((n, w.shape[1]), dtype=cdt, device=hidden.device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        p, z, lse_c = _probs(hidden[s:e].to(cdt), w, temperature)
        lse[s:e] = lse_c
        # self-normalised: Σ_v p_v = 1 up to rounding, which q = ‖W_y − μ‖² amplifies when the
        # logits are large (μ is then a convex combination of W's rows, as in the kernels)
        mu[s:e] = (p @ w).div_(p.sum(1, keepdim=True))
        ok = valid[s:e]
        logp[s:e] = torch.where(ok, z.gather(1, safe[s:e]).squeeze(1) - lse_c, 0.0)
        d = w[safe[s:e, 0]] - mu[s:e]
        q[s:e] = torch.where(ok, (d * d).sum(1), 0.0)
        del p, z
    return logp, q, lse, mu


def wgrad_chunked_backward(
    grad_logp: torch.Tensor,
    grad_q: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    mu: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    need_dh: bool = True,
    need_dw: bool = True,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dH, dW)`` in the input dtypes for upstream ``grad_logp, grad_q [N]``."""
    n, hdim = hidden.shape
    cdt, rows, w, valid, safe = _prep(hidden, weight, labels, ignore_index, chunk_rows)
    g = torch.where(valid, grad_logp.to(cdt), 0.0) / temperature
    gq = torch.where(valid, grad_q.to(cdt), 0.0)
    dh = torch.zeros((n, hdim), dtype=cdt, device=hidden.device) if need_dh else None
    dw = torch.zeros_like(w) if need_dw else None
    # fully ignored chunks (prompt, padding) or zero upstream gradient are skipped
    for s, e in active_chunks((g != 0) | (gq != 0), rows):
        g_c, gq_c = g[s:e], gq[s:e]
        h = hidden[s:e].to(cdt)
        z = h @ w.t()
        if temperature != 1.0:
            z.div_(temperature)
        m = z.sub_(lse[s:e].unsqueeze(1)).exp_().neg_()      # m = -p
        m.scatter_add_(1, safe[s:e], torch.ones_like(g_c).unsqueeze(1))  # m = onehot - p
        d = w[safe[s:e, 0]] - mu[s:e]
        # (W_v − μ)·d for every v of the chunk: one [rows, V] GEMM
        wd = d @ w.t()
        wd.sub_((mu[s:e] * d).sum(1, keepdim=True))
        # a_v = p_v (W_v − μ)·d with p = onehot − m: −m_v·wd_v, plus wd_y = ‖d‖² at the label
        a = wd.mul_(m).neg_()
        a.scatter_add_(1, safe[s:e], (d * d).sum(1, keepdim=True))
        gl = a.mul_((-2.0 / temperature) * gq_c.unsqueeze(1)).add_(m * g_c.unsqueeze(1))
        if need_dh:
            dh[s:e] = gl @ w
        if need_dw:
            addmm_acc(dw, gl.t(), h)
            addmm_acc(dw, m.t(), d * (2.0 * gq_c).unsqueeze(1))
        del z, m, wd, a, gl
    return (dh.to(hidden.dtype) if need_dh else None), (dw.to(weight.dtype) if need_dw else None)
