"""``linear_logps``: per-token log-probs from hidden states and the LM head, fused.

    logp_t = log softmax(W h_t / T)[y_t] = z_t[y_t] - logsumexp(z_t),    z_t = W h_t / T

(the per-token terms of ``log π(y|x)`` in REBEL, arXiv 2404.16767, and DRO-REBEL,
arXiv 2509.19104; docs/design.md §1). The (tokens x vocabulary) logits are never materialised;
the backward accepts any upstream gradient g:

    dL/dh_t = (g_t / T) (W[y_t] - Σ_v p_tv W[v]),     dL/dW = Σ_t (g_t / T) (e_{y_t} - p_t) h_t^T

Registered as the torch custom ops ``drorebel::linear_logps_fwd`` / ``_bwd`` (with fake
kernels and an autograd formula), so it can be called from ``torch.compile(fullgraph=True)``.
Dispatch: ``impl="auto"`` runs the Triton kernels on CUDA tensors and the chunked PyTorch
path (``drorebel.ops.chunked``) on the CPU.

``softmax_cache`` (bytes, or ``"auto"``): the forward ops also return ``probs [R, V]``, the
softmax of the first R tokens that fit the budget (``[0, V]`` without a cache); autograd saves
it with the other inputs of the backward, which then skips the logit recompute for those rows.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from drorebel.kernels.softmax_cache import cache_dtype
from drorebel.ops.chunked import chunked_backward, chunked_forward, chunked_sequence_forward
from drorebel.ops.common import (
    IMPLS,
    cache_rows_for,
    check_softmax_cache,
    op_inputs,
    resolve_impl,
    validate_inputs,
)
from drorebel.ops.materialized import materialized_token_logps

__all__ = ["linear_logps", "sequence_logps_op", "IMPLS", "linear_logprobs"]

def _new_cache(hidden: Tensor, weight: Tensor, rows: int) -> Tensor:
    """The softmax cache ``[rows, V]`` (``[0, V]`` without one), filled by the forward."""
    return hidden.new_empty((rows, weight.shape[0]), dtype=cache_dtype(hidden.dtype))


@torch.library.custom_op("drorebel::linear_logps_fwd", mutates_args=())
def _linear_logps_fwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, temperature: float,
    impl: str, cache_rows: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, lse, probs) for hidden [N, H], weight [V, H], labels [N]; ``probs [R, V]``:
    the softmax of the first ``R = cache_rows`` rows (the backward reads it; R = 0: none)."""
    hidden, weight, labels = op_inputs(hidden, weight, labels, ignore_index)
    probs = _new_cache(hidden, weight, cache_rows)
    cache = probs if cache_rows else None
    if resolve_impl(impl, hidden) == "triton":
        from drorebel.kernels.linear_logps import linear_logps_forward

        logp, lse = linear_logps_forward(hidden, weight, labels, ignore_index, temperature,
                                         probs=cache)
    else:
        logp, lse = chunked_forward(hidden, weight, labels, ignore_index, temperature,
                                    probs=cache)
    return logp, lse, probs


@_linear_logps_fwd.register_fake
def _(hidden, weight, labels, ignore_index, temperature, impl, cache_rows=0):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logp, lse = (labels.new_empty(labels.shape, dtype=dtype) for _ in range(2))
    return logp, lse, _new_cache(hidden, weight, cache_rows)


@torch.library.custom_op("drorebel::linear_logps_bwd", mutates_args=())
def _linear_logps_bwd(
    grad: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, lse: Tensor,
    ignore_index: int, temperature: float, impl: str, need_dh: bool, need_dw: bool,
    probs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(dH, dW); a gradient that is not needed comes back as an empty tensor. ``probs``:
    the forward's softmax cache of the first rows (None or [0, V]: recompute every row)."""
    hidden, weight, labels = op_inputs(hidden, weight, labels)
    grad, lse = grad.contiguous(), lse.contiguous()
    cache = probs if probs is not None and probs.shape[0] > 0 else None
    if resolve_impl(impl, hidden) == "triton":
        from drorebel.kernels.linear_logps import linear_logps_backward

        dh, dw = linear_logps_backward(grad, hidden, weight, labels, lse, ignore_index,
                                          temperature, need_dh, need_dw, probs=cache)
    else:
        dh, dw = chunked_backward(grad, hidden, weight, labels, lse, ignore_index, temperature,
                                  need_dh, need_dw, probs=cache)
    return (hidden.new_empty(0) if dh is None else dh), (weight.new_empty(0) if dw is None else dw)


@_linear_logps_bwd.register_fake
def _(grad, hidden, weight, labels, lse, ignore_index, temperature, impl, need_dh, need_dw,
      probs=None):
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_dw else weight.new_empty(0)
    return dh, dw


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, labels, ignore_index, temperature, impl = inputs[:6]
    _, lse, probs = output
    # the softmax cache is saved with the rest (autograd owns it until the backward ran)
    ctx.save_for_backward(hidden, weight, labels, lse, probs)
    ctx.config = (ignore_index, temperature, impl)
    ctx.mark_non_differentiable(lse, probs)
    ctx.set_materialize_grads(False)  # no zero [R, V] gradient for the cache output


def _backward(ctx, grad_logp: Tensor | None, grad_lse: Tensor | None, grad_probs=None):
    hidden, weight, labels, lse, probs = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    none = (None,) * 7
    if grad_logp is None or not (need_dh or need_dw):
        return none
    dh, dw = _linear_logps_bwd(grad_logp, hidden, weight, labels, lse, *ctx.config,
                                  need_dh, need_dw, probs)
    return (dh if need_dh else None), (dw if need_dw else None), *none[2:]


_linear_logps_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- per-sequence variant: sums in the forward epilogue, [S] gradient read by the bwd kernels


def _seq_labels(labels: Tensor, seq_ids: Tensor, ignore_index: int) -> Tensor:
    """Labels with the tokens of no sequence (id < 0) turned into ``ignore_index``."""
    return torch.where(seq_ids >= 0, labels, torch.full_like(labels, ignore_index))


@torch.library.custom_op("drorebel::sequence_logps_fwd", mutates_args=())
def _sequence_logps_fwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, seq_ids: Tensor, num_seqs: int,
    ignore_index: int, temperature: float, impl: str, store_logp: bool, cache_rows: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(seq_logps [S], lse [N], logp [N] or [0], probs [R, V]) for hidden [N, H], seq_ids
    int32 [N]; ``probs``: the softmax cache of the first ``R = cache_rows`` rows."""
    hidden, weight, labels = op_inputs(hidden, weight, labels, ignore_index)
    seq_ids = seq_ids.contiguous()
    probs = _new_cache(hidden, weight, cache_rows)
    cache = probs if cache_rows else None
    if resolve_impl(impl, hidden) == "triton":
        from drorebel.kernels.linear_logps import sequence_logps_forward

        out = sequence_logps_forward(hidden, weight, labels, seq_ids, num_seqs, ignore_index,
                                        temperature, store_logp=store_logp, probs=cache)
    else:
        out = chunked_sequence_forward(hidden, weight, _seq_labels(labels, seq_ids, ignore_index),
                                       seq_ids, num_seqs, ignore_index, temperature,
                                       store_logp=store_logp, probs=cache)
    return (*out, probs)


@_sequence_logps_fwd.register_fake
def _(hidden, weight, labels, seq_ids, num_seqs, ignore_index, temperature, impl, store_logp,
      cache_rows=0):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    n = labels.shape[0]
    return (labels.new_empty(num_seqs, dtype=dtype), labels.new_empty(n, dtype=dtype),
            labels.new_empty(n if store_logp else 0, dtype=dtype),
            _new_cache(hidden, weight, cache_rows))


@torch.library.custom_op("drorebel::sequence_logps_bwd", mutates_args=())
def _sequence_logps_bwd(
    grad_seq: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, seq_ids: Tensor,
    lse: Tensor, ignore_index: int, temperature: float, impl: str, need_dh: bool,
    need_dw: bool, probs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(dH, dW) for a gradient per sequence ``grad_seq [S]`` (empty where not needed);
    ``probs``: the forward's softmax cache, as for ``linear_logps_bwd``."""
    hidden, weight, labels = op_inputs(hidden, weight, labels)
    seq_ids, lse = seq_ids.contiguous(), lse.contiguous()
    cache = probs if probs is not None and probs.shape[0] > 0 else None
    if resolve_impl(impl, hidden) == "triton":
        from drorebel.kernels.linear_logps import sequence_logps_backward

        dh, dw = sequence_logps_backward(grad_seq.contiguous(), hidden, weight, labels,
                                            seq_ids, lse, ignore_index, temperature, need_dh,
                                            need_dw, probs=cache)
    else:
        # CPU twin: the chunked backward takes a per-token gradient, g_t = grad_seq[seq_t]
        g = _broadcast_seq_grad(grad_seq, seq_ids)
        dh, dw = chunked_backward(g, hidden, weight, _seq_labels(labels, seq_ids, ignore_index),
                                  lse, ignore_index, temperature, need_dh, need_dw, probs=cache)
    return (hidden.new_empty(0) if dh is None else dh), (weight.new_empty(0) if dw is None else dw)


@_sequence_logps_bwd.register_fake
def _(grad_seq, hidden, weight, labels, seq_ids, lse, ignore_index, temperature, impl, need_dh,
      need_dw, probs=None):
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_dw else weight.new_empty(0)
    return dh, dw


def _broadcast_seq_grad(grad_seq: Tensor, seq_ids: Tensor) -> Tensor:
    """``g_t = grad_seq[seq_t]`` (0 for ``seq_t < 0``), an [N] tensor."""
    padded = torch.cat([grad_seq, grad_seq.new_zeros(1)])  # slot S: tokens of no sequence
    slot = torch.where(seq_ids >= 0, seq_ids, grad_seq.shape[0]).long()
    return padded[slot]


def _seq_setup_context(ctx, inputs, output) -> None:
    hidden, weight, labels, seq_ids, _, ignore_index, temperature, impl, store_logp = inputs[:9]
    ctx.save_for_backward(hidden, weight, labels, seq_ids, output[1], output[3])
    ctx.config = (ignore_index, temperature, impl)
    ctx.store_logp = store_logp
    ctx.mark_non_differentiable(output[1], output[3])
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None


def _seq_backward(ctx, grad_seq: Tensor | None, _grad_lse, grad_logp: Tensor | None,
                  _grad_probs=None):
    hidden, weight, labels, seq_ids, lse, probs = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    none = (None,) * 10
    if not ctx.store_logp:
        grad_logp = None  # the [0] placeholder output (compiled graphs pass zeros, not None)
    if (grad_seq is None and grad_logp is None) or not (need_dh or need_dw):
        return none
    if grad_logp is None:
        # the common case: only the sequence sums are used; the kernels broadcast grad_seq
        dh, dw = _sequence_logps_bwd(grad_seq, hidden, weight, labels, seq_ids, lse,
                                        *ctx.config, need_dh, need_dw, probs)
    else:
        # the per-token output is used too: one per-token gradient g_t + grad_seq[seq_t]
        g = grad_logp.to(lse.dtype)
        if grad_seq is not None:
            g = g + _broadcast_seq_grad(grad_seq.to(lse.dtype), seq_ids)
        ignore_index = ctx.config[0]
        dh, dw = _linear_logps_bwd(g, hidden, weight, _seq_labels(labels, seq_ids, ignore_index),
                                      lse, *ctx.config, need_dh, need_dw, probs)
    return (dh if need_dh else None), (dw if need_dw else None), *none[2:]


_sequence_logps_fwd.register_autograd(_seq_backward, setup_context=_seq_setup_context)


def linear_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    impl: str = "auto",
    softmax_cache: int | str = 0,
) -> Tensor:
    """Per-token ``log softmax(weight @ h / temperature)[label]`` without [N, V] logits.

    Formula (docs/design.md §1; REBEL arXiv 2404.16767, DRO-REBEL arXiv 2509.19104):
    ``logp_t = z_t[y_t] - logsumexp(z_t)`` with ``z_t = W h_t / T``; 0 where
    ``y_t == ignore_index``. Differentiable in ``hidden`` and ``weight`` for any upstream
    gradient (ignored positions get none).

    Args:
        hidden: [N, H] or [B, T, H] (any leading shape) final hidden states;
            bf16, fp16 or fp32 (float64 too with ``impl="torch"``).
        weight: [V, H] LM head, same dtype and device as ``hidden``.
        labels: int64/int32 token ids with ``hidden``'s leading shape; values in [0, V) or
            ``ignore_index``.
        ignore_index: label marking positions without a log-prob (prompt, padding).
        temperature: sampling temperature T > 0.
        impl: "auto" (CUDA -> Triton, CPU and float64 -> chunked torch), "triton" (Triton
            kernels; on CPU tensors this needs ``TRITON_INTERPRET=1``), "torch" (chunked
            PyTorch path) or "materialized" (full [N, V] logits: the baseline).
        softmax_cache: byte budget of the softmax cache (0: none, the default; ``"auto"``: a
            quarter of the free device memory, or of the available RAM capped at 4 GiB on
            the CPU). The forward keeps ``softmax(z_t)`` of the first tokens that fit (bf16
            for bf16 inputs, else fp32), and their backward skips the logit recompute: three
            N·H·V GEMMs instead of four. Ignored with ``impl="materialized"`` and when no
            gradient is needed.

    Returns:
        fp32 log-probs with ``labels``' shape (float64 for float64 inputs).
    """
    validate_inputs(hidden, weight, labels, ignore_index, temperature, impl)
    check_softmax_cache(softmax_cache)
    if impl == "materialized":
        return materialized_token_logps(hidden, weight, labels, ignore_index=int(ignore_index),
                                        temperature=float(temperature))
    h2 = hidden.reshape(-1, hidden.shape[-1])
    rows = cache_rows_for(softmax_cache, h2, weight)
    logp, _, _ = _linear_logps_fwd(h2, weight, labels.reshape(-1), int(ignore_index),
                                      float(temperature), impl, rows)
    return logp.view(labels.shape)


def sequence_logps_op(
    hidden: Tensor, weight: Tensor, labels: Tensor, seq_ids: Tensor, num_seqs: int,
    ignore_index: int = -100, temperature: float = 1.0, impl: str = "auto",
    return_token_logps: bool = False, softmax_cache: int | str = 0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Flat-layout core of ``drorebel.ops.sequence.linear_sequence_logps``.

    ``out[s] = Σ_{t: seq_ids[t] = s, y_t != ignore} log softmax(W h_t / T)[y_t]`` for
    ``hidden [N, H]``, ``labels [N]``, ``seq_ids`` int32 [N] in ``[-1, num_seqs)`` (already
    validated by the caller). Returns ``out`` (and the per-token log-probs, 0 at ignored
    tokens and tokens of no sequence, with ``return_token_logps``). ``softmax_cache``: as for
    :func:`linear_logps`.
    """
    rows = cache_rows_for(check_softmax_cache(softmax_cache), hidden, weight)
    sums, _, logp, _ = _sequence_logps_fwd(hidden, weight, labels, seq_ids, int(num_seqs),
                                              int(ignore_index), float(temperature), impl,
                                              bool(return_token_logps), rows)
    return (sums, logp) if return_token_logps else sums


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                    temperature: float = 1.0, impl: str = "auto",
                    softmax_cache: int | str = 0) -> Tensor:
    """Deprecated 0.1 spelling of :func:`linear_logps` (same arguments); removed in 0.3."""
    warnings.warn("linear_logprobs is deprecated; use drorebel.linear_logps (same arguments). "
                  "It is removed in 0.3.", DeprecationWarning, stacklevel=2)
    return linear_logps(hidden, weight, labels, ignore_index, temperature, impl, softmax_cache)
