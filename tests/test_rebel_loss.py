"""REBEL residuals and the (DRO-)REBEL loss: hand values, metrics, Danskin gradient, dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from drorebel.losses.dro import dro_solve, robust_objective
from drorebel.losses.rebel import rebel_loss, rebel_residuals

F64 = torch.float64
MODES = [("none", {}), ("chi2", {"rho": 0.4}), ("kl", {"rho": 0.3}), ("kl", {"tau": 0.8})]


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def test_residual_hand_value() -> None:
    # Δ = (1/η)[(π_a − ref_a) − (π_b − ref_b)] − (r_a − r_b)
    #   = (1/0.5)[(−1 + 1.5) − (−2 + 1.5)] − (1 − 0.2) = 2·1 − 0.8 = 1.2
    d = rebel_residuals(_t([-1.0]), _t([-2.0]), _t([-1.5]), _t([-1.5]), _t([1.0]), _t([0.2]), 0.5)
    assert abs(d.item() - 1.2) < 1e-15
    with pytest.raises(ValueError, match="eta"):
        rebel_residuals(_t([0.0]), _t([0.0]), _t([0.0]), _t([0.0]), _t([0.0]), _t([0.0]), 0.0)


def _batch(n: int = 5, seed: int = 0, dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mk = lambda scale: (torch.randn(n, generator=g, dtype=F64) * scale).to(dtype)
    return {
        "policy_logps_a": mk(3.0) - 20,
        "policy_logps_b": mk(3.0) - 20,
        "ref_logps_a": mk(3.0) - 20,
        "ref_logps_b": mk(3.0) - 20,
        "rewards_a": mk(1.0),
        "rewards_b": mk(1.0),
    }


def test_rebel_none_hand_value_and_gradient() -> None:
    # two pairs, η = 1: Δ_1 = (0 − 1) − (1 − 0) = −2, Δ_2 = (2 − 0) − (0 − 1) = 3
    pa = _t([0.0, 2.0]).requires_grad_()
    pb = _t([1.0, 0.0]).requires_grad_()
    out = rebel_loss(pa, pb, _t([0, 0]), _t([0, 0]), _t([1, 0]), _t([0, 1]), eta=1.0)
    assert abs(out.loss.item() - (4 + 9) / 2) < 1e-15  # mean Δ² = 6.5
    out.loss.backward()
    # ∂L/∂π_a,i = (1/n)·2Δ_i/η = (−2, 3), ∂L/∂π_b,i = −(−2, 3)
    assert pa.grad.tolist() == [-2.0, 3.0] and pb.grad.tolist() == [2.0, -3.0]
    m = out.metrics
    assert m["rebel/loss_mean"].item() == 6.5 and m["dro/robust_objective"].item() == 6.5
    assert m["rebel/residual_mean"].item() == 0.5 and m["rebel/residual_abs_max"].item() == 3.0
    assert m["dro/ess"].item() == 2.0 and m["dro/weight_max"].item() == 0.5
    assert m["logps/a"].item() == 1.0 and m["logps/b"].item() == 0.5
    # implicit margins (π_a − π_b)/η = (−1, 2); reward diffs (1, −1): signs agree for neither pair
    assert m["rewards/margins"].item() == 0.5 and m["rewards/accuracies"].item() == 0.0
    assert "dro/eta_star" not in m and "dro/tau_star" not in m


@pytest.mark.parametrize(("div", "kw"), MODES)
def test_loss_value_weights_and_metrics(div: str, kw: dict) -> None:
    b = _batch()
    out = rebel_loss(**b, eta=0.7, divergence=div, **kw)
    ell = rebel_residuals(**b, eta=0.7) ** 2
    p, dual = dro_solve(ell, div, **kw)
    torch.testing.assert_close(out.weights, p, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, (p * ell).sum(), rtol=1e-15, atol=0)
    torch.testing.assert_close(out.metrics["dro/robust_objective"], out.loss.detach())
    assert abs(out.metrics["dro/ess"].item() - 1 / (p * p).sum().item()) < 1e-12
    assert abs(out.metrics["dro/weight_max"].item() - p.max().item()) < 1e-15
    key = {"chi2": "dro/eta_star", "kl": "dro/tau_star"}.get(div)
    if key is not None:
        assert out.metrics[key].item() == dual.item()
    for v in out.metrics.values():
        assert v.dim() == 0 and not v.requires_grad
    if div != "none":  # robust: the weighted loss exceeds the plain mean
        assert out.loss.item() > ell.mean().item()


@pytest.mark.parametrize(("div", "kw"), MODES[1:])
def test_danskin_gradient_matches_finite_differences(div: str, kw: dict) -> None:
    # θ → log-probs through a small nonlinear map; compare ∇ of Σ p.detach()·ℓ with central
    # differences of the robust objective sup_Q E_Q ℓ(θ) (float64).
    g = torch.Generator().manual_seed(3)
    feats_a, feats_b = (
        torch.randn(6, 4, generator=g, dtype=F64),
        torch.randn(6, 4, generator=g, dtype=F64),
    )
    b = _batch(6, seed=4)
    theta = torch.randn(4, generator=g, dtype=F64, requires_grad=True)

    def losses(th: torch.Tensor) -> torch.Tensor:
        la, lb = torch.tanh(feats_a @ th) * 3, torch.tanh(feats_b @ th) * 3
        return (
            rebel_residuals(
                la, lb, b["ref_logps_a"], b["ref_logps_b"], b["rewards_a"], b["rewards_b"], 0.5
            )
            ** 2
        )

    la, lb = torch.tanh(feats_a @ theta) * 3, torch.tanh(feats_b @ theta) * 3
    out = rebel_loss(
        la,
        lb,
        b["ref_logps_a"],
        b["ref_logps_b"],
        b["rewards_a"],
        b["rewards_b"],
        eta=0.5,
        divergence=div,
        **kw,
    )
    (grad,) = torch.autograd.grad(out.loss, theta)
    h, fd = 1e-6, torch.zeros(4, dtype=F64)
    for j in range(4):
        e = torch.zeros(4, dtype=F64)
        e[j] = h
        with torch.no_grad():
            up = robust_objective(losses(theta + e), div, **kw)
            down = robust_objective(losses(theta - e), div, **kw)
        fd[j] = (up - down) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-7)
    # and not the plain-mean gradient (the test would notice uniform weights)
    (plain,) = torch.autograd.grad(losses(theta).mean(), theta)
    assert (plain - grad).abs().max() > 1e-3


def test_bf16_and_huge_residuals() -> None:
    b = _batch(8, dtype=torch.bfloat16)
    b["rewards_a"] = b["rewards_a"] * 1e4  # ℓ up to ~1e8
    for div, kw in MODES:
        out = rebel_loss(**b, eta=0.1, divergence=div, **kw)
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        assert all(torch.isfinite(v) or k == "dro/eta_star" for k, v in out.metrics.items())
        assert abs(out.weights.sum().item() - 1) < 1e-5


def test_input_validation() -> None:
    b = _batch(3)
    with pytest.raises(ValueError, match="rewards_b"):
        rebel_loss(**{**b, "rewards_b": torch.zeros(4, dtype=F64)}, eta=1.0)
    with pytest.raises(ValueError, match="policy_logps_a"):
        rebel_loss(**{**b, "policy_logps_a": torch.zeros(3, 1, dtype=F64)}, eta=1.0)
    with pytest.raises(ValueError, match="eta"):
        rebel_loss(**b, eta=-1.0)
    with pytest.raises(ValueError, match="rho"):
        rebel_loss(**b, eta=1.0, divergence="chi2")
    with pytest.raises(ValueError, match="divergence"):
        rebel_loss(**b, eta=1.0, divergence="tv", rho=0.1)


def test_zero_radius_equals_rebel() -> None:
    b = _batch(7, seed=9)
    base = rebel_loss(**b, eta=0.3)
    for div in ("chi2", "kl"):
        out = rebel_loss(**b, eta=0.3, divergence=div, rho=0.0)
        torch.testing.assert_close(out.loss, base.loss, rtol=1e-15, atol=0)
    assert math.isinf(rebel_loss(**b, eta=0.3, divergence="chi2", rho=0.0).metrics["dro/eta_star"])
