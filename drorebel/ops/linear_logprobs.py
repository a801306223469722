"""``linear_logprobs``: per-token log-probs from hidden states and the LM head, fused.

    logp_t = log softmax(W h_t / T)[y_t] = z_t[y_t] - logsumexp(z_t),    z_t = W h_t / T

(the per-token terms of ``log π(y|x)`` in REBEL, arXiv 2404.16767, and DRO-REBEL,
arXiv 2509.19104; DESIGN.md §1). The (tokens x vocabulary) logits are never materialised;
the backward accepts any upstream gradient g:

    dL/dh_t = (g_t / T) (W[y_t] - Σ_v p_tv W[v]),     dL/dW = Σ_t (g_t / T) (e_{y_t} - p_t) h_t^T

Registered as the torch custom ops ``drorebel::linear_logprobs_fwd`` / ``_bwd`` (with fake
kernels and an autograd formula), so it can be called from ``torch.compile(fullgraph=True)``.
Dispatch: ``impl="auto"`` runs the Triton kernels on CUDA tensors and the chunked PyTorch
path (``drorebel.ops.chunked``) on the CPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from drorebel.ops.chunked import chunked_backward, chunked_forward

__all__ = ["linear_logprobs", "IMPLS"]

IMPLS = ("auto", "triton", "torch")
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _resolve(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def _check_label_values(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Labels must lie in [0, V) unless they equal ``ignore_index`` (no host sync on CUDA)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if labels.is_cuda:
        torch._assert_async(
            ~bad.any(), f"labels: values must lie in [0, {vocab}) or equal ignore_index"
        )
    elif bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels: values must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"found {first}"
        )


def _rowmajor(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("drorebel::linear_logprobs_fwd", mutates_args=())
def _linear_logprobs_fwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, temperature: float,
    impl: str,
) -> tuple[Tensor, Tensor]:
    """(logp, lse) for hidden [N, H], weight [V, H], labels [N]."""
    _check_label_values(labels, weight.shape[0], ignore_index)
    hidden, weight, labels = _rowmajor(hidden), _rowmajor(weight), labels.contiguous()
    if _resolve(impl, hidden.device) == "triton":
        from drorebel.kernels.linear_logprobs import linear_logprobs_forward

        return linear_logprobs_forward(hidden, weight, labels, ignore_index, temperature)
    return chunked_forward(hidden, weight, labels, ignore_index, temperature)


@_linear_logprobs_fwd.register_fake
def _(hidden, weight, labels, ignore_index, temperature, impl):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    return labels.new_empty(labels.shape, dtype=dtype), labels.new_empty(labels.shape, dtype=dtype)


@torch.library.custom_op("drorebel::linear_logprobs_bwd", mutates_args=())
def _linear_logprobs_bwd(
    grad: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, lse: Tensor,
    ignore_index: int, temperature: float, impl: str, need_dh: bool, need_dw: bool,
) -> tuple[Tensor, Tensor]:
    """(dH, dW); a gradient that is not needed comes back as an empty tensor."""
    hidden, weight, labels = _rowmajor(hidden), _rowmajor(weight), labels.contiguous()
    grad, lse = grad.contiguous(), lse.contiguous()
    if _resolve(impl, hidden.device) == "triton":
        from drorebel.kernels.linear_logprobs import linear_logprobs_backward

        dh, dw = linear_logprobs_backward(grad, hidden, weight, labels, lse, ignore_index,
                                          temperature, need_dh, need_dw)
    else:
        dh, dw = chunked_backward(grad, hidden, weight, labels, lse, ignore_index, temperature,
                                  need_dh, need_dw)
    return (hidden.new_empty(0) if dh is None else dh), (weight.new_empty(0) if dw is None else dw)


@_linear_logprobs_bwd.register_fake
def _(grad, hidden, weight, labels, lse, ignore_index, temperature, impl, need_dh, need_dw):
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_dw else weight.new_empty(0)
    return dh, dw


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, labels, ignore_index, temperature, impl = inputs
    _, lse = output
    ctx.save_for_backward(hidden, weight, labels, lse)
    ctx.config = (ignore_index, temperature, impl)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp: Tensor | None, grad_lse: Tensor | None):
    hidden, weight, labels, lse = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_logp is None or not (need_dh or need_dw):
        return None, None, None, None, None, None
    dh, dw = _linear_logprobs_bwd(grad_logp, hidden, weight, labels, lse, *ctx.config,
                                  need_dh, need_dw)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None, None


_linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def _validate(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
              temperature: float, impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl: must be one of {IMPLS}, got {impl!r}")
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden: expected [..., H] with H = weight.shape[1] = {weight.shape[1]}, "
                         f"got shape {tuple(hidden.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden without its "
                         f"last dim), got {tuple(labels.shape)}")
    allowed = _KERNEL_DTYPES + ((torch.float64,) if _resolve(impl, hidden.device) == "torch"
                                else ())
    if hidden.dtype not in allowed:
        raise TypeError(f"hidden: dtype must be one of {allowed} for impl={impl!r}, "
                        f"got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} must equal hidden's dtype {hidden.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels: dtype must be int64 or int32, got {labels.dtype}")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(f"hidden, weight, labels: must share one device, got {hidden.device}, "
                         f"{weight.device}, {labels.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    impl: str = "auto",
) -> Tensor:
    """Per-token ``log softmax(weight @ h / temperature)[label]`` without [N, V] logits.

    Formula (DESIGN.md §1; REBEL arXiv 2404.16767, DRO-REBEL arXiv 2509.19104):
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
        impl: "auto" (CUDA -> Triton, CPU -> chunked torch), "triton" (Triton kernels; on CPU
            tensors this needs ``TRITON_INTERPRET=1``), "torch" (chunked PyTorch path).

    Returns:
        fp32 log-probs with ``labels``' shape (float64 for float64 inputs).
    """
    _validate(hidden, weight, labels, ignore_index, temperature, impl)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    logp, _ = _linear_logprobs_fwd(h2, weight, labels.reshape(-1), int(ignore_index),
                                   float(temperature), impl)
    return logp.view(labels.shape)
