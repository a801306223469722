"""Wasserstein oracle: closed forms for a linear model and second-order gradients by FD."""

from __future__ import annotations

import math

import pytest
import torch

from drorebel.reference.wasserstein import (
    per_sample_grad_sq_norms,
    wasserstein_penalty,
    wasserstein_rebel_objective,
)

F64 = torch.float64


def _data(n: int = 7, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randn(n, generator=g, dtype=F64)
    theta = torch.randn(d, generator=g, dtype=F64)
    return x, y, theta


def _oracle(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, rho: float) -> torch.Tensor:
    z = x.clone().requires_grad_()
    losses = (z @ theta - y) ** 2
    return wasserstein_penalty(losses, z, rho)


def test_linear_model_closed_form() -> None:
    # ℓ_i = (x_i·θ − y_i)², ∇_x ℓ_i = 2(x_i·θ − y_i)θ → ‖∇‖² = 4 r_i² ‖θ‖²,
    # penalty = ρ·sqrt(mean 4 r² ‖θ‖²) = 2ρ‖θ‖·sqrt(mean r²)
    x, y, theta = _data()
    z = x.clone().requires_grad_()
    losses = (z @ theta - y) ** 2
    r = x @ theta - y
    sq = per_sample_grad_sq_norms(losses, z)
    torch.testing.assert_close(sq, 4 * r**2 * theta.dot(theta), rtol=1e-14, atol=0)
    pen = wasserstein_penalty(losses, z, 0.3)
    expected = 2 * 0.3 * theta.norm() * (r**2).mean().sqrt()
    assert abs(pen.item() - expected.item()) < 1e-13
    obj = wasserstein_rebel_objective(losses, z, 0.3)
    assert abs(obj.item() - (losses.mean() + expected).item()) < 1e-13


def test_second_order_gradient_by_finite_differences() -> None:
    x, y, theta0 = _data(seed=1)
    theta = theta0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(_oracle(theta, x, y, 0.7), theta)
    # closed-form gradient of 2ρ‖θ‖·sqrt(mean r²) (product rule: both factors depend on θ)
    r = x @ theta0 - y
    m = (r**2).mean()
    closed = (
        2
        * 0.7
        * (theta0 / theta0.norm() * m.sqrt() + theta0.norm() * (x.T @ r) / (len(r) * m.sqrt()))
    )
    torch.testing.assert_close(grad, closed, rtol=1e-12, atol=1e-13)
    h, fd = 1e-6, torch.zeros_like(theta0)
    for j in range(theta0.numel()):
        e = torch.zeros_like(theta0)
        e[j] = h
        fd[j] = (_oracle(theta0 + e, x, y, 0.7) - _oracle(theta0 - e, x, y, 0.7)).item() / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-7, atol=1e-8)
    # a stop-gradient through ∇_z ℓ (first-order only) would give a different answer
    assert (grad - 2 * 0.7 * theta0 / theta0.norm() * m.sqrt()).abs().max() > 1e-2


def test_sequence_of_inputs() -> None:
    # ℓ_i = (u_i·α + v_i·β − y_i)², z = (u, v): ‖∇‖² = 4 r_i² (‖α‖² + ‖β‖²)
    x, y, theta = _data(5, 4, seed=2)
    u, v = x[:, :2].clone().requires_grad_(), x[:, 2:].clone().requires_grad_()
    alpha, beta = theta[:2], theta[2:]
    losses = (u @ alpha + v @ beta - y) ** 2
    r = x @ theta - y
    sq = per_sample_grad_sq_norms(losses, (u, v))
    torch.testing.assert_close(
        sq, 4 * r**2 * (alpha.dot(alpha) + beta.dot(beta)), rtol=1e-14, atol=0
    )
    # 3-D z (per-token states) is reduced over all but the leading dim
    h = torch.randn(5, 3, 2, dtype=F64, requires_grad=True)
    losses = (h.sum(dim=(1, 2)) - y) ** 2
    sq = per_sample_grad_sq_norms(losses, h)
    torch.testing.assert_close(
        sq, 4 * (h.sum(dim=(1, 2)) - y).detach() ** 2 * 6, rtol=1e-14, atol=0
    )


def test_zero_gradient_is_finite() -> None:
    # θ = 0: every ∇_z ℓ_i = 0, the penalty is 0 and its gradient must not be NaN (safe sqrt)
    x, y, _ = _data()
    theta = torch.zeros(3, dtype=F64, requires_grad=True)
    pen = _oracle(theta, x, y, 1.0)
    (grad,) = torch.autograd.grad(pen, theta)
    assert pen.item() == 0.0 and torch.isfinite(grad).all()


def test_validation() -> None:
    x, y, theta = _data()
    with pytest.raises(ValueError, match="require grad"):
        per_sample_grad_sq_norms((x @ theta - y) ** 2, x)
    z = torch.randn(4, 3, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="leading dim"):
        per_sample_grad_sq_norms((z.sum() * torch.ones(7, dtype=F64)), z)
    z = x.clone().requires_grad_()
    with pytest.raises(ValueError, match="rho"):
        wasserstein_penalty((z @ theta - y) ** 2, z, -1.0)
    with pytest.raises(ValueError, match="rho"):
        wasserstein_penalty((z @ theta - y) ** 2, z, math.nan)
