"""Chunked PyTorch path of ``linear_logprobs`` (CPU default; also runs on CUDA).

Same maths and memory behaviour as the Triton kernels, written with torch ops over token
chunks (the Liger-kernel strategy):

    forward, per chunk c:   Z_c = h_c W^T / T (fp32),   lse_c = logsumexp(Z_c),
                            logp_c = Z_c[y_c] - lse_c
    backward, per chunk c:  G_c = (onehot(y_c) - exp(Z_c - lse_c)) * g_c / T,
                            dH_c = G_c W,   dW += G_c^T h_c  (fp32 accumulator)

Only ``lse`` is saved between the passes. A chunk holds ``rows x V`` compute-dtype values
within a byte budget (32 MB on the CPU, 256 MB on CUDA, where small GEMMs are inefficient;
Liger-kernel sizes its chunks similarly) and has strictly fewer than N rows whenever N
exceeds that, so no [N, V] tensor is ever created; chunks whose upstream gradient is all
zero (fully ignored) are skipped in the backward.
"""

from __future__ import annotations

import torch

__all__ = ["token_chunk_rows", "chunked_forward", "chunked_backward"]

DEFAULT_BUDGET_BYTES = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}


def token_chunk_rows(n: int, v: int, elt: int = 4, budget_bytes: int | None = None,
                     device: torch.device | str = "cpu") -> int:
    """Tokens per chunk: ``rows · V · elt <= budget_bytes`` (at least 1, at most N)."""
    if budget_bytes is None:
        budget_bytes = DEFAULT_BUDGET_BYTES.get(torch.device(device).type, 32 * 2**20)
    return max(1, min(n, budget_bytes // max(1, v * elt)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _cuda_mixed_mm(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and hasattr(
        torch.ops.aten.mm, "dtype"
    )


def _mm_operand(weight: torch.Tensor) -> torch.Tensor:
    """W as used by the logit matmul: native on CUDA (fp32-output GEMM), upcast elsewhere."""
    if _cuda_mixed_mm(weight, weight):
        return weight
    return weight.to(_compute_dtype(weight.dtype))


def _logits(h: torch.Tensor, w_mm: torch.Tensor, temperature: float) -> torch.Tensor:
    """``h @ w_mm^T / T`` in the compute dtype, a fresh [rows, V] tensor."""
    if w_mm.dtype != h.dtype:
        h = h.to(w_mm.dtype)
    if _cuda_mixed_mm(h, w_mm):
        z = torch.ops.aten.mm.dtype(h, w_mm.t(), torch.float32)
    else:
        z = h @ w_mm.t()
    if temperature != 1.0:
        z.div_(temperature)
    return z


def chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, lse)`` for ``hidden [N, H]``, ``weight [V, H]``, ``labels [N]``.

    Both outputs are in the compute dtype (fp32; float64 for float64 inputs); ``logp`` is 0
    at ignored positions.
    """
    n = hidden.shape[0]
    v = weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    rows = chunk_rows or token_chunk_rows(n, v, torch.finfo(cdt).bits // 8, device=hidden.device)
    w_mm = _mm_operand(weight)
    logp = torch.empty(n, dtype=cdt, device=hidden.device)
    lse = torch.empty(n, dtype=cdt, device=hidden.device)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        z = _logits(hidden[s:e], w_mm, temperature)
        lse[s:e] = torch.logsumexp(z, dim=1)
        picked = z.gather(1, safe[s:e]).squeeze(1)
        logp[s:e] = torch.where(valid[s:e], picked - lse[s:e], 0.0)
        del z
    return logp, lse


def _grad_logits(z, lse, safe, scale):
    """In place: ``z <- (onehot(y) - exp(z - lse)) * scale`` for a chunk; returns z."""
    p = z.sub_(lse.unsqueeze(1)).exp_()
    p.mul_(-scale.unsqueeze(1))
    return p.scatter_add_(1, safe, scale.unsqueeze(1))


def _accumulate_dw(dw32: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """``dw32 += g^T @ h`` with fp32 accumulation (mixed-dtype GEMM on CUDA)."""
    if g.dtype == dw32.dtype and h.dtype == dw32.dtype:
        dw32.addmm_(g.t(), h)
    elif dw32.is_cuda and hasattr(torch.ops.aten.addmm, "dtype_out"):
        torch.ops.aten.addmm.dtype_out(dw32, g.t(), h, dw32.dtype, out=dw32)
    else:
        dw32.addmm_(g.t().to(dw32.dtype), h.to(dw32.dtype))


def chunked_backward(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    need_dh: bool = True,
    need_dw: bool = True,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dH, dW)`` in the input dtypes for upstream ``grad [N]`` (None where not needed)."""
    n, h = hidden.shape
    v = weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    rows = chunk_rows or token_chunk_rows(n, v, torch.finfo(cdt).bits // 8, device=hidden.device)
    valid = labels != ignore_index
    scale = torch.where(valid, grad.to(cdt), 0.0) / temperature
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    w_mm = _mm_operand(weight)
    native = w_mm.dtype == hidden.dtype  # CUDA 16-bit: GEMM operands stay in the input dtype
    dh = torch.zeros_like(hidden) if need_dh else None
    dw32 = torch.zeros((v, h), dtype=cdt, device=weight.device) if need_dw else None
    starts = list(range(0, n, rows))
    # one host read for all chunks: which ones have a non-zero upstream gradient
    active = (scale != 0).reshape(-1).cumsum(0)[[min(n, s + rows) - 1 for s in starts]]
    counts = torch.diff(active, prepend=active.new_zeros(1)).tolist()
    for s, count in zip(starts, counts):
        if count == 0:
            continue
        e = min(n, s + rows)
        g = _grad_logits(_logits(hidden[s:e], w_mm, temperature), lse[s:e], safe[s:e],
                         scale[s:e])
        if native:
            g = g.to(hidden.dtype)
        if need_dh:
            dh[s:e] = g @ w_mm
        if need_dw:
            _accumulate_dw(dw32, g, hidden[s:e] if native else hidden[s:e].to(cdt))
        del g
    dw = dw32.to(weight.dtype) if need_dw else None
    return dh, dw
