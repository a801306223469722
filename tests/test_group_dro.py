"""Group-level DRO weights (``groups=`` of dro_solve / dro_weights / robust_objective /
rebel_loss): a χ²/KL ball over the groups' distribution around their empirical shares, checked
by hand and against an SLSQP solve of the primal over the groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from drorebel.losses.dro import dro_solve, dro_weights, group_means, robust_objective
from drorebel.losses.rebel import rebel_loss

F64 = torch.float64


def _group_primal(L: np.ndarray, pi: np.ndarray, div: str, rho: float) -> float:
    """``max_q Σ q_g L_g`` s.t. ``q`` in the simplex and ``D(q‖π) ≤ ρ`` (χ²: ½Σ(q−π)²/π;
    KL: Σ q log(q/π)), by SLSQP from several starts."""
    def d(q):
        if div == "chi2":
            return 0.5 * np.sum((q - pi) ** 2 / pi)
        q = np.clip(q, 1e-300, None)
        return float(np.sum(q * np.log(q / pi)))

    best = -math.inf
    for seed in range(4):
        q0 = pi.copy() if seed == 0 else np.random.default_rng(seed).dirichlet(np.ones(L.size))
        res = minimize(lambda q: -q @ L, q0, jac=lambda q: -L, method="SLSQP",
                       bounds=[(0.0 if div == "chi2" else 1e-18, 1.0)] * L.size,
                       constraints=[{"type": "eq", "fun": lambda q: q.sum() - 1.0},
                                    {"type": "ineq", "fun": lambda q: rho - d(q)}],
                       options={"ftol": 1e-15, "maxiter": 500})
        if d(res.x) <= rho + 1e-9 and abs(res.x.sum() - 1) < 1e-9:
            best = max(best, float(-res.fun))
    return best


def test_two_groups_by_hand() -> None:
    # L = (2, 4), π = (½, ½); q = (½ − δ, ½ + δ) has ½Σ(q − π)²/π = 2δ²: ρ = 0.02 → δ = 0.1
    losses = torch.tensor([1.0, 3.0, 2.0, 6.0], dtype=F64)
    groups = torch.tensor([7, 7, -1, -1])
    p, _ = dro_solve(losses, "chi2", rho=0.02, groups=groups)
    torch.testing.assert_close(p, torch.tensor([0.2, 0.2, 0.3, 0.3], dtype=F64))
    assert float(p @ losses) == pytest.approx(0.4 * 2 + 0.6 * 4)
    torch.testing.assert_close(group_means(losses, groups),
                               torch.tensor([2.0, 2.0, 4.0, 4.0], dtype=F64))
    # KL with a fixed temperature: q ∝ π·exp(L/τ)
    p, _ = dro_solve(losses, "kl", tau=2.0, groups=groups)
    q1 = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(p, torch.tensor([(1 - q1) / 2] * 2 + [q1 / 2] * 2, dtype=F64))


@pytest.mark.parametrize("div", ["chi2", "kl"])
def test_matches_primal_over_groups_with_unequal_sizes(div: str) -> None:
    rng = np.random.default_rng(7)
    for _ in range(12):
        n = int(rng.integers(3, 12))
        ids = rng.integers(0, int(rng.integers(2, 5)), size=n)
        ell = rng.exponential(size=n) * 10 ** rng.uniform(-1, 2)
        uniq, counts = np.unique(ids, return_counts=True)
        L = np.array([ell[ids == g].mean() for g in uniq])
        pi = counts / n
        for rho in (0.01, 0.1, 0.5):
            p, _ = dro_solve(torch.tensor(ell), div, rho=rho, groups=torch.tensor(ids))
            p = p.numpy()
            q = np.array([p[ids == g].sum() for g in uniq])
            # equal weights within a group, p_i = q_g / n_g
            for g, qg, ng in zip(uniq, q, counts):
                np.testing.assert_allclose(p[ids == g], qg / ng, rtol=1e-12, atol=1e-15)
            ref = _group_primal(L, pi, div, rho)
            assert float(p @ ell) == pytest.approx(ref, rel=1e-6), (ids, ell, rho)
            assert float(q @ L) == pytest.approx(float(p @ ell), rel=1e-12)


def test_zero_radius_is_rebel_and_singleton_groups_are_per_pair() -> None:
    losses = torch.tensor([0.3, 2.0, 1.1, 5.0, 0.2], dtype=F64)
    groups = torch.tensor([0, 1, 0, 1, 1])
    p, _ = dro_solve(losses, "chi2", rho=0.0, groups=groups)
    torch.testing.assert_close(p, torch.full_like(losses, 0.2))
    for div in ("chi2", "kl"):
        alone, _ = dro_solve(losses, div, rho=0.2, groups=torch.arange(5))
        torch.testing.assert_close(alone, dro_solve(losses, div, rho=0.2)[0])
    # one group: the mean, whatever the radius
    p, _ = dro_solve(losses, "kl", rho=3.0, groups=torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(p, torch.full_like(losses, 0.2))


def test_objective_gradient_and_rebel_loss_use_group_weights() -> None:
    losses = torch.tensor([1.0, 3.0, 2.0, 6.0], dtype=F64, requires_grad=True)
    groups = torch.tensor([0, 0, 1, 1])
    obj = robust_objective(losses, "chi2", rho=0.02, groups=groups)
    obj.backward()
    torch.testing.assert_close(losses.grad, torch.tensor([0.2, 0.2, 0.3, 0.3], dtype=F64))
    torch.testing.assert_close(dro_weights(losses, "chi2", rho=0.02, groups=groups),
                               torch.tensor([0.2, 0.2, 0.3, 0.3], dtype=F64))
    # rebel_loss: at π = π_ref the residual is −(r_a − r_b), the loss the squared reward gap
    z = torch.zeros(4, dtype=F64)
    gaps = torch.tensor([1.0, 3.0, 2.0, 6.0], dtype=F64).sqrt()
    out = rebel_loss(z, z, z, z, gaps, z, eta=1.0, divergence="chi2", rho=0.02, groups=groups)
    assert out.loss.item() == pytest.approx(3.2)
    torch.testing.assert_close(out.weights, torch.tensor([0.2, 0.2, 0.3, 0.3], dtype=F64))


def test_group_validation_errors() -> None:
    losses = torch.ones(3)
    with pytest.raises(ValueError, match="integer tensor of group ids"):
        dro_solve(losses, "chi2", rho=0.1, groups=torch.zeros(3))
    with pytest.raises(ValueError, match=r"one id per pair \(\[3\]\)"):
        dro_solve(losses, "chi2", rho=0.1, groups=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="groups must be a torch.Tensor"):
        dro_weights(losses, "kl", rho=0.1, groups=[0, 1, 2])


def test_group_weights_compile_fullgraph() -> None:
    losses = torch.tensor([1.0, 3.0, 2.0, 6.0])
    groups = torch.tensor([0, 0, 1, 1])

    def f(x, g):
        return dro_solve(x, "chi2", rho=0.02, groups=g, validate=False)[0]

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(losses, groups), f(losses, groups))
