"""``linear_logps_wgrad``: per-token log-probs and Wasserstein hidden-gradient norms, fused.

For ``z_t = W h_t / T``, ``p_t = softmax(z_t)`` (docs/design.md §1, Wasserstein-REBEL; DRO-REBEL
arXiv 2509.19104, REBEL arXiv 2404.16767):

    logp_t = z_t[y_t] − logsumexp(z_t)
    q_t    = ‖W[y_t] − μ_t‖²,   μ_t = Σ_v p_tv W[v]   (= ‖T·∇_{h_t} logp_t‖²)

Both outputs are differentiable in ``hidden`` and ``weight`` for any upstream gradients
``(g, g_q)``; the second-order terms of the Wasserstein penalty flow through ``q``. With
``d = W_y − μ`` and ``a_v = p_v (W_v − μ)·d`` (derivation in docs/wasserstein.md):

    dq/dh   = −(2/T) Σ_v a_v W_v
    dq/dW_v = 2 d ([v = y] − p_v) − (2/T) a_v h

Registered as torch custom ops ``drorebel::linear_wgrad_fwd`` / ``_bwd``. Dispatch:
``impl="auto"`` runs the Triton kernels (``drorebel.kernels.linear_wgrad``) on CUDA tensors and
the chunked PyTorch path (``drorebel.ops.wgrad_chunked``) on the CPU; ``"triton"`` forces the
kernels (on CPU tensors under ``TRITON_INTERPRET=1``), ``"torch"`` the chunked path.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from drorebel.ops.common import op_inputs, resolve_impl, validate_inputs
from drorebel.ops.wgrad_chunked import wgrad_chunked_backward, wgrad_chunked_forward

__all__ = ["linear_logps_wgrad", "linear_logprobs_wgrad"]


@torch.library.custom_op("drorebel::linear_wgrad_fwd", mutates_args=())
def _wgrad_fwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, temperature: float,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logp [N], q [N], lse [N], mu [N, H]) for hidden [N, H], weight [V, H], labels [N]."""
    hidden, weight, labels = op_inputs(hidden, weight, labels, ignore_index)
    if resolve_impl(impl, hidden) == "triton":
        from drorebel.kernels.linear_wgrad import linear_wgrad_forward

        return linear_wgrad_forward(hidden, weight, labels, ignore_index, temperature)
    return wgrad_chunked_forward(hidden, weight, labels, ignore_index, temperature)


@_wgrad_fwd.register_fake
def _(hidden, weight, labels, ignore_index, temperature, impl):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    vec = labels.new_empty(labels.shape, dtype=dtype)
    return vec, torch.empty_like(vec), torch.empty_like(vec), hidden.new_empty(
        hidden.shape, dtype=dtype)


@torch.library.custom_op("drorebel::linear_wgrad_bwd", mutates_args=())
def _wgrad_bwd(
    grad_logp: Tensor, grad_q: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor,
    lse: Tensor, mu: Tensor, ignore_index: int, temperature: float, impl: str, need_dh: bool,
    need_dw: bool,
) -> tuple[Tensor, Tensor]:
    """(dH, dW); a gradient that is not needed comes back as an empty tensor."""
    hidden, weight, labels = op_inputs(hidden, weight, labels)
    args = (grad_logp.contiguous(), grad_q.contiguous(), hidden, weight, labels,
            lse.contiguous(), mu.contiguous(), ignore_index, temperature, need_dh, need_dw)
    if resolve_impl(impl, hidden) == "triton":
        from drorebel.kernels.linear_wgrad import linear_wgrad_backward

        dh, dw = linear_wgrad_backward(*args)
    else:
        dh, dw = wgrad_chunked_backward(*args)
    return (hidden.new_empty(0) if dh is None else dh), (weight.new_empty(0) if dw is None else dw)


@_wgrad_bwd.register_fake
def _(grad_logp, grad_q, hidden, weight, labels, lse, mu, ignore_index, temperature, impl,
      need_dh, need_dw):
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_dw else weight.new_empty(0)
    return dh, dw


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, labels, ignore_index, temperature, impl = inputs
    _, _, lse, mu = output
    ctx.save_for_backward(hidden, weight, labels, lse, mu)
    ctx.config = (ignore_index, temperature, impl)
    ctx.mark_non_differentiable(lse, mu)


def _backward(ctx, grad_logp, grad_q, grad_lse, grad_mu):
    hidden, weight, labels, lse, mu = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if (grad_logp is None and grad_q is None) or not (need_dh or need_dw):
        return None, None, None, None, None, None
    zeros = lse.new_zeros(lse.shape)
    grad_logp = zeros if grad_logp is None else grad_logp
    grad_q = zeros if grad_q is None else grad_q
    dh, dw = _wgrad_bwd(grad_logp, grad_q, hidden, weight, labels, lse, mu, *ctx.config,
                        need_dh, need_dw)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None, None


_wgrad_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_logps_wgrad(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``(logp_t, q_t)`` per token without [N, V] logits (formulas in the module docstring).

    ``q_t = ‖W[y_t] − E_{p_t}[W]‖²`` gives the Wasserstein-REBEL hidden-state penalty
    ``‖∇_h ℓ_i‖² = (2Δ_i/(ηT))² Σ_{t∈a_i∪b_i} q_t`` (docs/design.md §1; arXiv 2509.19104).

    Args:
        hidden: [..., H] final hidden states (bf16/fp16/fp32; float64 too).
        weight: [V, H] LM head, same dtype and device.
        labels: token ids with ``hidden``'s leading shape, in [0, V) or ``ignore_index``.
        ignore_index: label of positions without a log-prob (both outputs are 0 there).
        temperature: T > 0.
        impl: "auto" (CUDA -> Triton, CPU -> chunked torch), "triton" (on CPU tensors this
            needs ``TRITON_INTERPRET=1``; bf16/fp16/fp32 only) or "torch" (chunked path).

    Returns:
        ``(logp, q)`` fp32 (float64 for float64 inputs), shaped like ``labels``, both
        differentiable in ``hidden`` and ``weight``.
    """
    if impl == "materialized":
        raise ValueError("impl='materialized': linear_logps_wgrad has the fused paths only "
                         "('auto', 'triton', 'torch')")
    validate_inputs(hidden, weight, labels, ignore_index, temperature, impl)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    logp, q, _, _ = _wgrad_fwd(h2, weight, labels.reshape(-1), int(ignore_index),
                               float(temperature), impl)
    return logp.view(labels.shape), q.view(labels.shape)


def linear_logprobs_wgrad(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                          temperature: float = 1.0, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Deprecated 0.1 spelling of :func:`linear_logps_wgrad` (same arguments); removed in 0.3."""
    warnings.warn("linear_logprobs_wgrad is deprecated; use drorebel.linear_logps_wgrad (same "
                  "arguments). It is removed in 0.3.", DeprecationWarning, stacklevel=2)
    return linear_logps_wgrad(hidden, weight, labels, ignore_index, temperature, impl)
