"""Exact χ² / KL worst-case weights: hand-worked values, SLSQP on the primal, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from drorebel.losses.dro import dro_solve, dro_weights, robust_objective

F64 = torch.float64


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# --------------------------------------------------------------------------- hand-worked values


def test_chi2_two_points_hand() -> None:
    # n = 2, ℓ = (3, 1), ρ = 1/4: w = n·p = 1 ± a, D = ½·mean((w−1)²) = ½a² = ρ
    # → a = sqrt(2ρ) = 1/√2,
    # p = (1 ± 1/√2)/2 = (0.853553.., 0.146446..); objective 3p1 + p2 = 2 + 1/√2.
    # Dual: k = 2, S1 = 4, S2 = 10, c² = 1.5, η = 4/2 − sqrt(2·(2·10 − 16)/(1.5·2 − 2))/2 = 2 − √2.
    p, eta = dro_solve(_t([3.0, 1.0]), "chi2", rho=0.25)
    a = 1 / math.sqrt(2)
    torch.testing.assert_close(p, _t([(1 + a) / 2, (1 - a) / 2]), rtol=0, atol=1e-14)
    torch.testing.assert_close(eta, torch.tensor(2 - math.sqrt(2), dtype=F64), rtol=0, atol=1e-14)
    value = robust_objective(_t([3.0, 1.0]), "chi2", rho=0.25)
    assert abs(value.item() - (2 + a)) < 1e-13


def test_chi2_three_points_hand() -> None:
    # ℓ = (4, 1, 1): by symmetry p = (q, (1−q)/2, (1−q)/2), D = ¼(3q − 1)².
    # ρ = 1/4 → q = 2/3, p = (2/3, 1/6, 1/6), value 8/3 + 1/3 = 3; η*: (4−η)/(1−η) = 4 → η* = 0
    # (dual: k = 3, S1 = 6, S2 = 18, c² = 1.5: η = 2 − sqrt(3·18/1.5)/3 = 0).
    p, eta = dro_solve(_t([4.0, 1.0, 1.0]), "chi2", rho=0.25)
    torch.testing.assert_close(p, _t([2 / 3, 1 / 6, 1 / 6]), rtol=0, atol=1e-14)
    assert abs(eta.item()) < 1e-14
    # ρ = 3/4 → 3q − 1 = √3, value 4q + (1 − q) = 1 + 3q = 2 + √3
    p, _ = dro_solve(_t([4.0, 1.0, 1.0]), "chi2", rho=0.75)
    assert abs((p * _t([4.0, 1.0, 1.0])).sum().item() - (2 + math.sqrt(3))) < 1e-13


def test_chi2_inactive_tail_hand() -> None:
    # ℓ = (3, 2, 0), ρ = ½ (c² = 2): k = 2 piece: S1 = 5, S2 = 13, 2·13 − 25 = 1, c²k − n = 1,
    # η = 5/2 − sqrt(3·1/1)/2 = 2.5 − √3/2 ∈ [0, 2): the last loss gets weight 0,
    # p = (½ + 1/(2√3), ½ − 1/(2√3), 0) and D = ½·mean((3p − 1)²) = ½·(3/3) = ½.
    p, eta = dro_solve(_t([3.0, 2.0, 0.0]), "chi2", rho=0.5)
    s = 1 / (2 * math.sqrt(3))
    torch.testing.assert_close(p, _t([0.5 + s, 0.5 - s, 0.0]), rtol=0, atol=1e-14)
    assert abs(eta.item() - (2.5 - math.sqrt(3) / 2)) < 1e-14


def test_kl_fixed_tau_hand() -> None:
    # p = softmax(ℓ/τ): ℓ = (log 2, 0), τ = 1 → (2, 1)/3; a shift by 1e8 changes nothing.
    ell = _t([math.log(2.0), 0.0])
    p, tau = dro_solve(ell, "kl", tau=1.0)
    torch.testing.assert_close(p, _t([2 / 3, 1 / 3]), rtol=0, atol=1e-15)
    assert tau.item() == 1.0
    p2, _ = dro_solve(ell * 2 + 1e8, "kl", tau=2.0)  # (2ℓ + c)/2 = ℓ + c/2
    torch.testing.assert_close(p2, p, rtol=0, atol=1e-8)


def test_kl_radius_hand() -> None:
    # ℓ = (1, 0): p = (q, 1 − q) = softmax(ℓ/τ) → q/(1−q) = e^{1/τ}. For q = 0.8:
    # ρ = 0.8·log 1.6 + 0.2·log 0.4 = 0.19274.., τ* = 1/log 4.
    rho = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    p, tau = dro_solve(_t([1.0, 0.0]), "kl", rho=rho)
    torch.testing.assert_close(p, _t([0.8, 0.2]), rtol=0, atol=1e-12)
    assert abs(tau.item() - 1 / math.log(4.0)) < 1e-11


# --------------------------------------------------------------------------- primal via SLSQP


def _divergence(p: np.ndarray, div: str) -> float:
    n = p.size
    if div == "chi2":
        return 0.5 * float(np.mean((n * p - 1) ** 2))
    q = np.clip(p, 1e-300, None)
    return float(np.sum(p * np.log(n * q)))


def _divergence_grad(p: np.ndarray, div: str) -> np.ndarray:
    n = p.size
    if div == "chi2":
        return n * p - 1
    return np.log(n * np.clip(p, 1e-300, None)) + 1


def _primal(ell: np.ndarray, div: str, rho: float) -> float:
    """max_p Σ p ℓ s.t. p ∈ simplex, D(p) ≤ ρ; a few SLSQP starts."""
    n = ell.size
    cons = [
        {"type": "eq", "fun": lambda p: p.sum() - 1.0},
        {
            "type": "ineq",
            "fun": lambda p: rho - _divergence(p, div),
            "jac": lambda p: -_divergence_grad(p, div),
        },
    ]
    best = -math.inf
    for seed in range(3):
        p0 = np.full(n, 1.0 / n) if seed == 0 else np.random.default_rng(seed).dirichlet(np.ones(n))
        res = minimize(
            lambda p: -p @ ell,
            p0,
            jac=lambda p: -ell,
            method="SLSQP",
            bounds=[(0.0 if div == "chi2" else 1e-18, 1.0)] * n,
            constraints=cons,
            options={"ftol": 1e-15, "maxiter": 500},
        )
        if _divergence(res.x, div) <= rho + 1e-9 and abs(res.x.sum() - 1) < 1e-9:
            best = max(best, float(-res.fun))
    return best


def _saturation(ell: np.ndarray, div: str) -> float:
    n, t = ell.size, int(np.sum(ell == ell.max()))
    return (n / t - 1) / 2 if div == "chi2" else math.log(n / t)


def _cases() -> list[tuple[str, np.ndarray, float]]:
    rng = np.random.default_rng(1234)
    cases = []
    for i in range(16):
        n = int(rng.integers(2, 10))
        ell = rng.exponential(size=n) * 10 ** rng.uniform(-2, 3)
        if i % 4 == 0:  # ties, including at the maximum
            ell[1] = ell[0]
            ell[-1] = ell.max()
        for div in ("chi2", "kl"):
            sat = _saturation(ell, div)
            for rho in (0.02 * sat, 0.3 * sat, 0.9 * sat, 1.5 * sat + 0.1):
                cases.append((div, ell.copy(), float(rho)))
    cases.append(("chi2", np.array([2.5]), 0.3))
    cases.append(("kl", np.array([2.5]), 0.3))
    return cases


@pytest.mark.parametrize("div", ["chi2", "kl"])
def test_matches_slsqp_primal(div: str) -> None:
    for d, ell, rho in _cases():
        if d != div:
            continue
        p, _ = dro_solve(torch.tensor(ell, dtype=F64), div, rho=rho)
        pn = p.numpy()
        ours, ref = float(pn @ ell), _primal(ell, div, rho)
        assert abs(pn.sum() - 1) < 1e-12 and pn.min() >= 0
        assert _divergence(pn, div) <= rho * (1 + 1e-9) + 1e-12, (ell, rho)  # feasible
        assert abs(ours - ref) <= 1e-6 * abs(ref), (ell, rho, ours, ref)
        sat = _saturation(ell, div)
        if rho < sat:  # the constraint is active below the saturation point
            assert abs(_divergence(pn, div) - rho) <= 1e-8 * max(rho, 1e-3), (ell, rho)
        else:  # all mass split evenly on the tied maxima
            top = ell == ell.max()
            np.testing.assert_allclose(pn, top / top.sum(), atol=1e-12)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize(("div", "kw"), [("chi2", {"rho": 0.0}), ("kl", {"rho": 0.0})])
def test_zero_radius_is_uniform(div: str, kw: dict) -> None:
    p, dual = dro_solve(_t([5.0, 1.0, 0.5, 3.0]), div, **kw)
    torch.testing.assert_close(p, torch.full((4,), 0.25, dtype=F64), rtol=0, atol=0)
    assert math.isinf(dual.item())


def test_none_and_single_pair() -> None:
    p, dual = dro_solve(_t([5.0, 1.0]), "none")
    assert p.tolist() == [0.5, 0.5] and math.isnan(dual.item())
    for div, kw in (("chi2", {"rho": 0.7}), ("kl", {"rho": 0.7}), ("kl", {"tau": 0.1})):
        assert dro_solve(_t([7.0]), div, **kw)[0].tolist() == [1.0]


@pytest.mark.parametrize("div", ["chi2", "kl"])
def test_saturation_point_and_ties(div: str) -> None:
    ell = _t([1.0, 4.0, 2.0, 4.0, 0.0])  # two tied maxima out of five
    sat = _saturation(ell.numpy(), div)  # χ²: (5/2 − 1)/2 = 0.75, KL: log 2.5
    for rho in (sat, sat + 1.0, math.inf):
        p, _ = dro_solve(ell, div, rho=rho)
        torch.testing.assert_close(p, _t([0, 0.5, 0, 0.5, 0]), rtol=0, atol=1e-12)
    p, _ = dro_solve(ell, div, rho=0.9 * sat)  # just below: the others keep some mass
    assert p[2] > 0 and abs(p[1].item() - p[3].item()) < 1e-15
    # n = 3 without ties: χ² saturates exactly at ρ = (n−1)/2 = 1
    if div == "chi2":
        assert dro_solve(_t([1.0, 3.0, 2.0]), div, rho=1.0)[0].tolist() == [0.0, 1.0, 0.0]
        assert dro_solve(_t([1.0, 3.0, 2.0]), div, rho=0.99)[0][2] > 0


@pytest.mark.parametrize("div", ["chi2", "kl"])
def test_all_equal_losses(div: str) -> None:
    p, _ = dro_solve(torch.full((6,), 3.5, dtype=F64), div, rho=0.4)
    torch.testing.assert_close(p, torch.full((6,), 1 / 6, dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("div", "kw"), [("chi2", {"rho": 0.3}), ("kl", {"rho": 0.3}), ("kl", {"tau": 0.5})]
)
def test_huge_losses_and_bf16(div: str, kw: dict) -> None:
    big = torch.tensor([1e8, 3.0, 5e7, 9.9e7, 0.0, 1e8 - 512.0], dtype=torch.float32)
    p, dual = dro_solve(big, div, **kw)
    assert p.dtype == torch.float32 and torch.isfinite(p).all() and torch.isfinite(dual)
    assert abs(p.sum().item() - 1) < 1e-6
    ref, _ = dro_solve(big.double(), div, **kw)
    torch.testing.assert_close(p.double(), ref, rtol=0, atol=1e-6)
    low = big.to(torch.bfloat16)
    pb, _ = dro_solve(low, div, **kw)
    assert pb.dtype == torch.float32 and torch.isfinite(pb).all()
    torch.testing.assert_close(
        pb.double(), dro_solve(low.double(), div, **kw)[0], atol=1e-6, rtol=0
    )


def test_validation_errors() -> None:
    ell = _t([1.0, 2.0])
    bad = [
        ({"divergence": "wasserstein"}, "divergence"),
        ({"divergence": "chi2"}, "rho"),
        ({"divergence": "chi2", "rho": -0.1}, "rho"),
        ({"divergence": "chi2", "rho": math.nan}, "rho"),
        ({"divergence": "chi2", "rho": 0.1, "tau": 1.0}, "tau"),
        ({"divergence": "kl"}, "exactly one"),
        ({"divergence": "kl", "rho": 0.1, "tau": 1.0}, "exactly one"),
        ({"divergence": "kl", "tau": 0.0}, "tau"),
        ({"divergence": "kl", "tau": -1.0}, "tau"),
        ({"divergence": "kl", "rho": math.nan}, "rho"),
    ]
    for kwargs, word in bad:
        with pytest.raises(ValueError, match=word):
            dro_weights(ell, **kwargs)
    with pytest.raises(ValueError, match="1-D"):
        dro_weights(ell.reshape(1, 2), "chi2", rho=0.1)
    with pytest.raises(ValueError, match="at least one"):
        dro_weights(ell[:0], "chi2", rho=0.1)


def test_weights_are_detached() -> None:
    ell = _t([1.0, 2.0, 3.0]).requires_grad_()
    for div, kw in (("none", {}), ("chi2", {"rho": 0.2}), ("kl", {"rho": 0.2}), ("kl", {"tau": 1})):
        w = dro_weights(ell * 2, div, **kw)
        assert not w.requires_grad


@pytest.mark.parametrize(
    ("div", "kw"), [("chi2", {"rho": 0.3}), ("kl", {"rho": 0.3}), ("kl", {"tau": 0.7})]
)
def test_compiles_fullgraph_without_host_sync(div: str, kw: dict) -> None:
    # fullgraph=True fails on any graph break: .item(), data-dependent Python control flow, ...
    torch._dynamo.reset()
    fn = torch.compile(lambda x: dro_solve(x, div, **kw), fullgraph=True, backend="eager")
    x = torch.tensor([0.3, 2.0, 1.1, 2.0, 0.0, 5.0])
    p, dual = fn(x)
    p_ref, dual_ref = dro_solve(x, div, **kw)
    torch.testing.assert_close(p, p_ref)
    torch.testing.assert_close(dual, dual_ref)


def test_vmap_over_rows_matches_loop() -> None:
    # the radius-coverage experiment solves many batches at once with torch.vmap
    rows = torch.rand(4, 7, generator=torch.Generator().manual_seed(0), dtype=F64)
    rows[1] = 1.0  # all tied
    rows[2, 3] = rows[2].max()  # tie at the maximum
    for div, kw in (("chi2", {"rho": 0.3}), ("chi2", {"rho": 5.0}), ("kl", {"rho": 0.3})):
        p = torch.vmap(lambda r, div=div, kw=kw: dro_solve(r, div, **kw)[0])(rows)
        loop = torch.stack([dro_solve(r, div, **kw)[0] for r in rows])
        torch.testing.assert_close(p, loop, rtol=0, atol=0)
