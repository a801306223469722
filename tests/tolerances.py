"""Per-dtype tolerances of the kernel tests, in one place (docs/design.md §3).

Criterion, elementwise, with ``truth`` a float64 materialised reference on the same
(already rounded) inputs and ``ref`` the same-dtype PyTorch reference:

    |ours - truth| <= |ref - truth| + rtol·|truth| + atol·max|truth|

``rtol`` allows one rounding of the result in a different place than PyTorch rounds it
(one ulp of the dtype); ``atol`` (relative to the tensor's largest entry) allows a
different summation order of the reductions over H, V or N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    """Slack on top of the same-dtype reference's own error."""

    rtol: float
    atol: float


TOL: dict[torch.dtype, Tol] = {
    torch.float64: Tol(rtol=1e-12, atol=1e-12),
    torch.float32: Tol(rtol=2.0**-20, atol=2.0**-18),
    torch.float16: Tol(rtol=2.0**-10, atol=2.0**-11),
    torch.bfloat16: Tol(rtol=2.0**-7, atol=2.0**-8),
}


def within(ours: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype):
    """(ok, worst excess) of the criterion above; NaN anywhere fails."""
    tol = TOL[dtype]
    truth = truth.double()
    err = (ours.double() - truth).abs()
    bound = (ref.double() - truth).abs() + tol.rtol * truth.abs()
    bound = bound + tol.atol * truth.abs().max().clamp_min(1e-30)
    excess = (err - bound).max().item() if err.numel() else 0.0
    ok = bool(torch.isfinite(ours).all()) and excess <= 0.0
    return ok, excess


def assert_within(name: str, ours, ref, truth, dtype) -> None:
    """Assert the criterion with a readable message naming the tensor."""
    ok, excess = within(ours, ref, truth, dtype)
    err = (ours.double() - truth.double()).abs().max().item() if ours.numel() else 0.0
    ref_err = (ref.double() - truth.double()).abs().max().item() if ref.numel() else 0.0
    assert ok, f"{name} ({dtype}): max err {err:.3e}, reference err {ref_err:.3e}, " \
               f"excess over bound {excess:.3e}"


def _value_and_grads(fn, hidden, weight, labels, grad, **kwargs):
    """(out, dH, dW) of ``fn(hidden, weight, labels, **kwargs)`` backpropagating ``grad``."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w, labels, **kwargs)
    out.backward(grad.to(out.dtype))
    return out.detach(), h.grad, w.grad


def check_against_truth(fn, hidden, weight, labels, grad, **kwargs) -> None:
    """docs/design.md §3 criterion for the output and both gradients of ``fn``.

    truth: the materialised reference in float64 on the (rounded) inputs; yardstick: the
    materialised reference in the inputs' dtype.
    """
    from drorebel.reference.logps import linear_logps_reference as reference

    dtype = hidden.dtype
    truth = _value_and_grads(reference, hidden.double(), weight.double(), labels, grad.double(),
                             **kwargs)
    ref = _value_and_grads(reference, hidden, weight, labels, grad, **kwargs)
    ours = _value_and_grads(fn, hidden, weight, labels, grad, **kwargs)
    assert ours[0].dtype == torch.float32 and ours[0].shape == labels.shape
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    for name, o, r, t in zip(("logp", "dH", "dW"), ours, ref, truth):
        assert_within(name, o, r, t, dtype)


def assert_compiled_grads_match(f, *tensors: torch.Tensor) -> None:
    """``torch.compile(f, fullgraph=True, backend="aot_eager")`` gives the eager gradients of
    the scalar ``f(*tensors)`` with respect to every tensor (the custom ops' autograd
    registration traced end to end)."""
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = [t.clone().requires_grad_() for t in tensors]
    comp = [t.clone().requires_grad_() for t in tensors]
    f(*eager).backward()
    compiled(*comp).backward()
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a.grad, b.grad)
