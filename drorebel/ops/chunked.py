"""Chunked PyTorch path of ``linear_logps`` (CPU default; also runs on CUDA).

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
zero (fully ignored) are skipped in the backward. One recompute of a chunk's logits feeds
both dH and dW.

Softmax cache (``softmax_cache`` of the ops, ``drorebel.kernels.softmax_cache``): the
forward also keeps ``P = exp(Z - lse)`` for the first R rows (R fitted to a byte budget),
and their backward chunks start from it, ``G_c = (onehot(y_c) - P_c) * g_c / T``: two GEMMs
instead of three. Only the cache itself, ``R x V`` values, is kept; R = 0 is the plain path.
"""

from __future__ import annotations

import torch

from drorebel.kernels.accum import addmm_acc
from drorebel.kernels.softmax_cache import cached_grad_logits

__all__ = ["active_chunks", "chunk_setup", "chunked_backward", "chunked_forward",
           "chunked_sequence_forward", "token_chunk_rows"]

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


def chunk_setup(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
    chunk_rows: int | None, live_buffers: int = 1,
) -> tuple[torch.dtype, int, torch.Tensor, torch.Tensor]:
    """``(compute dtype, token rows per chunk, valid [N], safe labels [N, 1])`` of a chunked pass.

    The rows are ``chunk_rows`` or what the memory budget allows for ``live_buffers`` fp
    ``[rows, V]`` tensors alive at once; ignored labels become 0 in ``safe`` (masked by ``valid``).
    """
    n, v = hidden.shape[0], weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    rows = chunk_rows or max(1, token_chunk_rows(n, v, torch.finfo(cdt).bits // 8,
                                                 device=hidden.device) // live_buffers)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    return cdt, rows, valid, safe


def _cached_chunk(z, probs, s, e):
    """Softmax-cache rows ``[s, e)``: ``probs[s:e] = softmax(z)`` (straight into the cache when
    it has the compute dtype) and ``lse = max(z) - log(max(p))`` (``max p = 1/Σ exp(z - max z)``),
    so ``exp`` runs once per logit, as in a materialised softmax."""
    m = z.amax(dim=1)
    if probs.dtype == z.dtype:
        p = torch.ops.aten._softmax.out(z, 1, False, out=probs[s:e])
    else:  # bf16 cache: softmax in fp32, rounded once
        p = torch.softmax(z, dim=1)
        probs[s:e] = p
    return m - p.amax(dim=1).log()


def _forward_chunks(hidden, weight, labels, ignore_index, temperature, chunk_rows, probs=None):
    """Yield ``(s, e, logp_c)`` per token chunk and fill the returned ``lse`` as it goes (and
    the softmax cache ``probs [R, V]``, when given: rows below R are chunked separately)."""
    n = hidden.shape[0]
    cdt, rows, valid, safe = chunk_setup(hidden, weight, labels, ignore_index, chunk_rows)
    w_mm = _mm_operand(weight)
    lse = torch.empty(n, dtype=cdt, device=hidden.device)
    r = 0 if probs is None else probs.shape[0]
    bounds = [(s, min(r, s + rows)) for s in range(0, r, rows)]
    bounds += [(s, min(n, s + rows)) for s in range(r, n, rows)]

    def chunks():
        for s, e in bounds:
            z = _logits(hidden[s:e], w_mm, temperature)
            lse[s:e] = _cached_chunk(z, probs, s, e) if s < r else torch.logsumexp(z, dim=1)
            picked = z.gather(1, safe[s:e]).squeeze(1)
            del z
            yield s, e, torch.where(valid[s:e], picked - lse[s:e], 0.0)

    return lse, chunks()


def chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, lse)`` for ``hidden [N, H]``, ``weight [V, H]``, ``labels [N]``.

    Both outputs are in the compute dtype (fp32; float64 for float64 inputs); ``logp`` is 0
    at ignored positions. ``probs [R, V]`` (optional, R <= N): filled with the softmax of the
    first R rows, the cache that :func:`chunked_backward` reads instead of recomputing.
    """
    lse, chunks = _forward_chunks(hidden, weight, labels, ignore_index, temperature, chunk_rows,
                                  probs)
    logp = torch.empty_like(lse)
    for s, e, logp_c in chunks:
        logp[s:e] = logp_c
    return logp, lse


def chunked_sequence_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    store_logp: bool = False,
    probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(seq_logps [num_seqs], lse [N], logp [N] or [0])``: each chunk's log-probs are added
    into their sequences (``seq_ids`` in ``[-1, num_seqs)``, -1 = none) by ``index_add_``, in
    token order, so the sums are deterministic; ``logp`` is kept only with ``store_logp``;
    ``probs``: the softmax cache, as for :func:`chunked_forward`."""
    lse, chunks = _forward_chunks(hidden, weight, labels, ignore_index, temperature, chunk_rows,
                                  probs)
    # slot num_seqs collects the tokens of no sequence and is dropped
    sums = lse.new_zeros(num_seqs + 1)
    slot = torch.where(seq_ids >= 0, seq_ids, num_seqs).long()
    logp = torch.empty_like(lse) if store_logp else lse.new_empty(0)
    for s, e, logp_c in chunks:
        sums.index_add_(0, slot[s:e], logp_c)
        if store_logp:
            logp[s:e] = logp_c
    return sums[:num_seqs], lse, logp


def active_chunks(live: torch.Tensor, rows: int) -> list[tuple[int, int]]:
    """Token chunks ``[s, e)`` of ``rows`` rows holding at least one ``live`` token (non-zero
    upstream gradient), found with ONE host read: chunk counts from a cumulative sum. Fully
    ignored chunks (prompt, padding) are skipped by the chunked backward passes."""
    n = live.shape[0]
    starts = list(range(0, n, rows))
    active = live.reshape(-1).cumsum(0)[[min(n, s + rows) - 1 for s in starts]]
    counts = torch.diff(active, prepend=active.new_zeros(1)).tolist()
    return [(s, min(n, s + rows)) for s, count in zip(starts, counts) if count != 0]


def _grad_logits(z, lse, safe, scale):
    """In place: ``z <- (onehot(y) - exp(z - lse)) * scale`` for a chunk; returns z."""
    p = z.sub_(lse.unsqueeze(1)).exp_()
    p.mul_(-scale.unsqueeze(1))
    return p.scatter_add_(1, safe, scale.unsqueeze(1))


def _cached_gemms(p, scale, labels, h, w, dh, dw32) -> None:
    """dH and dW of cached rows straight from ``P`` (no [rows, V] temporary):

        dH_t = s_t (W[y_t] - (P W)_t),      dW += Σ_t s_t e_{y_t} h_t^T - P^T (s ⊙ h)

    (the same as ``G = (onehot - P) s`` fed to the two GEMMs; ``s = g / T``, 0 at ignored
    tokens, whose ``labels`` entry is any valid id). ``dh``: the rows' slice of dH or None;
    ``dw32``: the compute-dtype accumulator or None."""
    s = scale.unsqueeze(1)
    if dh is not None:
        dh.copy_((w[labels] - p @ w).mul_(s))
    if dw32 is not None:
        sh = h * s
        addmm_acc(dw32, p.t(), -sh)
        dw32.index_add_(0, labels, sh)


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
    probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dH, dW)`` in the input dtypes for upstream ``grad [N]`` (None where not needed).

    Each chunk's logit gradient ``G_c`` feeds both GEMMs (dH and dW) from one recompute. The
    first ``R = probs.shape[0]`` rows (softmax cache of the forward, optional) build ``G_c``
    from the cache instead: two GEMMs per chunk instead of three.
    """
    h = hidden.shape[1]
    v = weight.shape[0]
    cdt, rows, valid, safe = chunk_setup(hidden, weight, labels, ignore_index, chunk_rows)
    scale = torch.where(valid, grad.to(cdt), 0.0) / temperature
    w_mm = _mm_operand(weight)
    native = w_mm.dtype == hidden.dtype  # CUDA 16-bit: GEMM operands stay in the input dtype
    dh = torch.zeros_like(hidden) if need_dh else None
    dw32 = torch.zeros((v, h), dtype=cdt, device=weight.device) if need_dw else None

    def gemms(g, s, e):  # dH rows and the dW accumulation of one chunk's logit gradient
        if native:
            g = g.to(hidden.dtype)
        if need_dh:
            dh[s:e] = g @ w_mm
        if need_dw:
            addmm_acc(dw32, g.t(), hidden[s:e] if native else hidden[s:e].to(cdt))

    live = scale != 0
    r = 0 if probs is None else probs.shape[0]
    if r and native:  # CUDA 16-bit: G_c in the input dtype, as a materialised backward has it
        buf = torch.empty((min(rows, r), v), dtype=cdt, device=hidden.device)
        for s, e in active_chunks(live[:r], rows):
            gemms(cached_grad_logits(buf[:e - s], probs[s:e], labels[s:e], scale[s:e]), s, e)
        del buf
    elif r:
        for s, e in active_chunks(live[:r], rows):
            _cached_gemms(probs[s:e].to(cdt), scale[s:e], safe[s:e, 0], hidden[s:e].to(cdt),
                          w_mm, dh[s:e] if need_dh else None, dw32)
    for s, e in active_chunks(live[r:], rows):
        s, e = s + r, e + r
        g = _grad_logits(_logits(hidden[s:e], w_mm, temperature), lse[s:e], safe[s:e],
                         scale[s:e])
        gemms(g, s, e)
        del g
    dw = dw32.to(weight.dtype) if need_dw else None
    return dh, dw
