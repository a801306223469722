"""DPO, KLDPO and WDPO baselines: hand values, TRL metric names, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from drorebel.losses.dpo import KLDPO_WEIGHT_CLAMP, dpo_loss, dpo_losses, kldpo_loss, wdpo_loss

F64 = torch.float64
TRL_KEYS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
}


def _t(values: list[float], grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=grad)


def test_dpo_hand_value_metrics_and_gradient() -> None:
    # β = 0.1; pair 1: π_c − ref_c = 1, π_r − ref_r = −1 → margin 0.2, ℓ = log(1 + e^{−0.2})
    # pair 2: π_c − ref_c = −0.5, π_r − ref_r = 0.5 → margin −0.1, ℓ = log(1 + e^{0.1})
    pc, pr = _t([-1.0, -2.5], grad=True), _t([-3.0, -1.5], grad=True)
    out = dpo_loss(pc, pr, _t([-2.0, -2.0]), _t([-2.0, -2.0]), beta=0.1)
    l1, l2 = math.log1p(math.exp(-0.2)), math.log1p(math.exp(0.1))
    assert abs(out.loss.item() - (l1 + l2) / 2) < 1e-15
    m = out.metrics
    assert TRL_KEYS <= set(m)
    assert abs(m["rewards/chosen"].item() - (0.1 - 0.05) / 2) < 1e-15
    assert abs(m["rewards/rejected"].item() - (-0.1 + 0.05) / 2) < 1e-15
    assert abs(m["rewards/margins"].item() - (0.2 - 0.1) / 2) < 1e-15
    assert m["rewards/accuracies"].item() == 0.5
    assert m["logps/chosen"].item() == -1.75 and m["logps/rejected"].item() == -2.25
    out.loss.backward()
    # ∂ℓ/∂π_c = −β·σ(−margin), mean over 2 pairs
    sig = lambda v: 1 / (1 + math.exp(-v))
    expected = [-0.1 * sig(-0.2) / 2, -0.1 * sig(0.1) / 2]
    torch.testing.assert_close(pc.grad, _t(expected), rtol=1e-14, atol=0)
    torch.testing.assert_close(pr.grad, -_t(expected), rtol=1e-14, atol=0)


def test_dpo_extreme_margins_are_finite() -> None:
    out = dpo_loss(_t([0.0, -1e4]), _t([-1e4, 0.0]), _t([0.0, 0.0]), _t([0.0, 0.0]), beta=1.0)
    # ℓ ≈ 0 for a margin of +1e4 and ≈ 1e4 for −1e4 (logsigmoid: no overflow)
    assert abs(out.loss.item() - 5e3) < 1e-9


def test_kldpo_weights_and_gradient() -> None:
    pc = _t([-1.0, -2.0, -3.0, -0.5], grad=True)
    pr, zeros = _t([-2.0, -1.0, -1.0, -4.0]), _t([0.0] * 4)
    ell, _, _ = dpo_losses(pc, pr, zeros, zeros, beta=1.0)
    d = ell.detach()
    tau = 0.5
    p = torch.exp((d - d.mean()) / tau).clamp(max=KLDPO_WEIGHT_CLAMP)
    assert p.max().item() == KLDPO_WEIGHT_CLAMP  # the clamp is active in this example
    out = kldpo_loss(pc, pr, zeros, zeros, beta=1.0, tau=tau)
    assert abs(out.loss.item() - (p * d).mean().item()) < 1e-14
    torch.testing.assert_close(out.weights, p / 4, rtol=1e-15, atol=0)
    out.loss.backward()
    # p detached: ∂L/∂π_c,i = p_i/n · ∂ℓ_i/∂π_c,i = −(p_i/n)·σ(−margin_i)
    margin = (pc - pr).detach()
    torch.testing.assert_close(pc.grad, -(p / 4) * torch.sigmoid(-margin), rtol=1e-14, atol=0)
    assert TRL_KEYS <= set(out.metrics)
    assert out.metrics["dro/weight_max"].item() == KLDPO_WEIGHT_CLAMP
    with pytest.raises(ValueError, match="tau"):
        kldpo_loss(pc, pr, zeros, zeros, beta=1.0, tau=0.0)


def test_kldpo_large_tau_is_dpo() -> None:
    pc, pr, zeros = _t([-1.0, -2.0, -3.0]), _t([-2.0, -1.0, -1.0]), _t([0.0] * 3)
    a = kldpo_loss(pc, pr, zeros, zeros, beta=0.3, tau=1e12).loss
    b = dpo_loss(pc, pr, zeros, zeros, beta=0.3).loss
    assert abs(a.item() - b.item()) < 1e-11


def _wdpo_closed(theta: torch.Tensor, zc: torch.Tensor, zr: torch.Tensor, beta: float, rho: float):
    # log-linear policy: π_c = z_c·θ, π_r = z_r·θ, refs 0. margin m = β(z_c − z_r)·θ,
    # ℓ = −log σ(m), ∇_{z_c} ℓ = −β σ(−m) θ, ∇_{z_r} ℓ = +β σ(−m) θ → ‖∇ℓ‖² = 2β²σ(−m)²‖θ‖²
    m = beta * (zc - zr) @ theta
    ell = -torch.nn.functional.logsigmoid(m)
    return (ell + rho * 2 * beta**2 * torch.sigmoid(-m) ** 2 * theta.dot(theta)).mean()


def _wdpo_oracle(
    theta: torch.Tensor, zc0: torch.Tensor, zr0: torch.Tensor, beta: float, rho: float
):
    zc, zr = zc0.clone().requires_grad_(), zr0.clone().requires_grad_()
    zeros = torch.zeros(zc.shape[0], dtype=F64)
    return wdpo_loss(zc @ theta, zr @ theta, zeros, zeros, beta=beta, rho=rho, z=(zc, zr))


def test_wdpo_closed_form_and_second_order_gradient() -> None:
    g = torch.Generator().manual_seed(5)
    zc, zr = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    theta0 = torch.randn(3, generator=g, dtype=F64)
    theta = theta0.clone().requires_grad_()
    out = _wdpo_oracle(theta, zc, zr, 0.5, 0.8)
    closed = _wdpo_closed(theta0, zc, zr, 0.5, 0.8)
    assert abs(out.loss.item() - closed.item()) < 1e-14
    assert out.metrics["wdpo/penalty"].item() > 0 and TRL_KEYS <= set(out.metrics)
    (grad,) = torch.autograd.grad(out.loss, theta)
    h, fd = 1e-6, torch.zeros(3, dtype=F64)
    for j in range(3):
        e = torch.zeros(3, dtype=F64)
        e[j] = h
        up = _wdpo_closed(theta0 + e, zc, zr, 0.5, 0.8)
        down = _wdpo_closed(theta0 - e, zc, zr, 0.5, 0.8)
        fd[j] = (up - down).item() / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-7, atol=1e-9)
    # ρ = 0 is DPO
    dpo = dpo_loss(
        zc @ theta0, zr @ theta0, torch.zeros(6, dtype=F64), torch.zeros(6, dtype=F64), 0.5
    )
    assert abs(_wdpo_oracle(theta0, zc, zr, 0.5, 0.0).loss.item() - dpo.loss.item()) < 1e-15


def test_shape_and_beta_validation() -> None:
    a, b = _t([0.0, 1.0]), _t([0.0])
    with pytest.raises(ValueError, match="rejected_logps"):
        dpo_loss(a, b, a, a, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(a, a, a, a, beta=0.0)


def test_bf16_inputs_give_fp32() -> None:
    x = torch.tensor([-10.0, -12.0], dtype=torch.bfloat16)
    out = dpo_loss(x, x - 1, x, x, beta=0.1)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
