"""Tests of the radius–coverage study (drorebel.experiments.radius_coverage)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from drorebel.cli import main
from drorebel.experiments.radius_coverage import solvers as sv
from drorebel.experiments.radius_coverage import study as rc
from drorebel.experiments.radius_coverage.data import Generator, radius
from drorebel.losses.dro import robust_objective

F64 = torch.float64


def _data(n=400, seeds=3, kind="skewed", d=4, seed=0):
    gen = Generator(d=d, kind=kind)
    z, y, eps = gen.sample(seeds, n, torch.Generator().manual_seed(seed))
    return gen, z, y, eps


# ---------------------------------------------------------------- generator and schedules


@pytest.mark.parametrize("kind", ["skewed", "symmetric"])
def test_noise_moments_closed_form_match_monte_carlo(kind):
    gen, z, y, eps = _data(n=200_000, seeds=2, kind=kind)
    m2, m4 = gen.noise_moments()
    assert (eps**2).mean().item() == pytest.approx(m2, rel=0.02)
    assert (eps**4).mean().item() == pytest.approx(m4, rel=0.08)
    torch.testing.assert_close(y, z @ gen.theta_star + eps)
    # hand value: E s² for s = 0.05 + 1.95 U is (2³ − 0.05³)/(3·1.95); E ε² = 2 E s²
    assert m2 == pytest.approx(2 * (2.0**3 - 0.05**3) / (3 * 1.95), rel=1e-12)


def test_skewed_generator_has_feature_aligned_third_moment_symmetric_has_none():
    _, z, _, eps = _data(n=200_000, seeds=2, kind="skewed")
    third = (eps.unsqueeze(-1) ** 3 * z).mean((0, 1))
    assert third[0] > 5.0 and third[1:].abs().max() < 1.0  # E[ε³z] ∝ e₁
    _, z, _, eps = _data(n=200_000, seeds=2, kind="symmetric")
    assert (eps.unsqueeze(-1) ** 3 * z).mean((0, 1)).abs().max() < 0.5


def test_radius_schedules_hand_values():
    assert radius("erm", 0.5, 4, 100) == 0.0
    assert radius("d_over_n", 0.5, 4, 100) == pytest.approx(0.02)
    assert radius("sqrt_d_over_n", 0.5, 4, 100) == pytest.approx(0.1)
    assert radius("fixed", 0.5, 4, 100) == radius("fixed", 0.5, 4, 10_000) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="radius constant"):
        radius("d_over_n", -0.1, 4, 100)
    with pytest.raises(ValueError, match="schedule"):
        radius("n_over_d", 0.1, 4, 100)


def test_default_constants_are_the_95_percent_calibration():
    gen = Generator(d=4)
    c = rc.default_constants(gen)
    assert c["chi2"] == c["kl"] == pytest.approx(1.6448536**2 / 8, rel=1e-6)
    m2, m4 = gen.noise_moments()
    assert c["wasserstein"] == pytest.approx(
        1.6448536 * math.sqrt(m4 - m2**2) / (4 * math.sqrt(m2))
    )


def test_loglog_slope_hand_value():
    n = [10, 100, 1000]
    assert rc.loglog_slope(n, [3 * k**-0.5 for k in n]) == pytest.approx(-0.5, abs=1e-12)
    assert rc.loglog_slope(n, [2.0, 2.0, 2.0]) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- objectives and derivatives


def test_wasserstein_closed_form_matches_autograd_reference():
    ref = pytest.importorskip("drorebel.reference.wasserstein")
    _, z, y, _ = _data(n=50, seeds=2)
    theta = torch.tensor([[0.3, -0.2, 0.9, 0.1], [1.0, 0.5, -0.4, 0.2]], dtype=F64)
    rho = 0.3
    ours = sv.wasserstein_objective(theta, z, y, rho)
    for s in range(2):
        zs = z[s].clone().requires_grad_(True)
        th = theta[s].clone().requires_grad_(True)
        losses = (zs @ th - y[s]) ** 2
        value = ref.wasserstein_rebel_objective(losses, zs, rho)
        assert value.item() == pytest.approx(ours[s].item(), rel=1e-12)
        (grad_ref,) = torch.autograd.grad(value, th)
        _, grad, _, _ = sv._wasserstein_derivatives(
            theta[s : s + 1], z[s : s + 1], y[s : s + 1], rho
        )
        torch.testing.assert_close(grad[0], grad_ref, rtol=1e-10, atol=1e-12)


def test_wasserstein_hessian_matches_autograd():
    _, z, y, _ = _data(n=60, seeds=1)
    theta = torch.tensor([[0.4, 0.6, -0.3, 0.2]], dtype=F64)
    _, _, hess, _ = sv._wasserstein_derivatives(theta, z, y, 0.7)
    auto = torch.autograd.functional.hessian(
        lambda th: sv.wasserstein_objective(th.unsqueeze(0), z, y, 0.7).sum(), theta[0]
    )
    torch.testing.assert_close(hess[0], auto, rtol=1e-10, atol=1e-10)


def _danskin_grad(theta, z, y, div, rho):
    """Independent Danskin gradient: autograd through robust_objective (weights detached)."""
    th = theta.clone().requires_grad_(True)
    value = robust_objective((z @ th - y) ** 2, div, rho=rho)
    return torch.autograd.grad(value, th)[0], value.item()


@pytest.mark.parametrize("div", ["chi2", "kl"])
@pytest.mark.parametrize("rho", [0.01, 0.3])
def test_dro_exact_hessian_matches_finite_differences(div, rho):
    _, z, y, _ = _data(n=300, seeds=1, seed=3)
    theta = torch.tensor([[0.6, 0.4, 0.5, 0.3]], dtype=F64)
    _, p, dual = sv._solve_rows((z @ theta[0] - y) ** 2, div, rho)
    _, hess, gn = sv.dro_derivatives(theta, z, y, div, p, dual)
    h = 1e-6
    fd = torch.stack(
        [
            (
                _danskin_grad(theta[0] + h * e, z[0], y[0], div, rho)[0]
                - _danskin_grad(theta[0] - h * e, z[0], y[0], div, rho)[0]
            )
            / (2 * h)
            for e in torch.eye(4, dtype=F64)
        ]
    )
    torch.testing.assert_close(hess[0], fd, rtol=2e-4, atol=2e-4)
    assert not torch.allclose(hess[0], gn[0], rtol=1e-2)  # the weights' motion matters


# ---------------------------------------------------------------- estimators


@pytest.mark.parametrize("div", ["chi2", "kl", "wasserstein"])
def test_fit_rho_zero_is_ols(div):
    _, z, y, _ = _data(n=100, seeds=2)
    result = sv.fit(z, y, div, 0.0)
    for s in range(2):
        expected = np.linalg.lstsq(z[s].numpy(), y[s].numpy(), rcond=None)[0]
        np.testing.assert_allclose(result.theta[s].numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("div,rho", [("chi2", 0.05), ("chi2", 1.0), ("kl", 0.05), ("kl", 1.0)])
def test_dro_fit_is_optimal(div, rho):
    _, z, y, _ = _data(n=500, seeds=3, seed=1)
    result = sv.fit(z, y, div, rho)
    assert bool(result.converged.all()) and result.iterations < 30
    for s in range(3):
        grad0, _ = _danskin_grad(sv.ols(z, y)[s], z[s], y[s], div, rho)
        grad, value = _danskin_grad(result.theta[s], z[s], y[s], div, rho)
        assert grad.norm() <= 1e-5 * grad0.norm()  # Danskin gradient ≈ 0 at θ̂
        for delta in 1e-4 * torch.randn(
            8, 4, dtype=F64, generator=torch.Generator().manual_seed(s)
        ):
            assert _danskin_grad(result.theta[s] + delta, z[s], y[s], div, rho)[1] >= value - 1e-12


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_wasserstein_fit_is_optimal_and_agrees_with_scipy(rho):
    _, z, y, _ = _data(n=400, seeds=2, seed=2)
    result = sv.fit(z, y, "wasserstein", rho)
    assert bool(result.converged.all())
    for s in range(2):
        zs, ys = z[s : s + 1], y[s : s + 1]
        _, grad, _, _ = sv._wasserstein_derivatives(result.theta[s : s + 1], zs, ys, rho)
        assert grad.norm() < 1e-7

        def f(t, zs=zs, ys=ys):
            return sv.wasserstein_objective(torch.from_numpy(t)[None], zs, ys, rho).item()

        ref = minimize(
            f,
            sv.ols(z, y)[s].numpy(),
            method="Nelder-Mead",
            options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 20000},
        )
        np.testing.assert_allclose(result.theta[s].numpy(), ref.x, atol=1e-6)


def test_chi2_fit_agrees_with_scipy():
    _, z, y, _ = _data(n=300, seeds=1, seed=4)
    result = sv.fit(z, y, "chi2", 0.2)

    def f(t):
        g, v = _danskin_grad(torch.from_numpy(t), z[0], y[0], "chi2", 0.2)
        return v, g.numpy()

    ref = minimize(f, np.zeros(4), jac=True, method="BFGS", options={"gtol": 1e-10})
    np.testing.assert_allclose(result.theta[0].numpy(), ref.x, atol=1e-6)


def test_robust_bias_shows_with_skewed_noise_only():
    """χ² estimator at a fixed radius and large n: biased along e₁ under the skewed generator,
    unbiased (up to sampling error) under symmetric noise."""
    shifts = {}
    for kind in ("skewed", "symmetric"):
        gen, z, y, _ = _data(n=20_000, seeds=2, kind=kind, seed=5)
        theta = sv.fit(z, y, "chi2", 0.05).theta
        shifts[kind] = (theta - sv.ols(z, y)).mean(0)
    assert shifts["skewed"][0] > 0.1
    assert shifts["symmetric"].abs().max() < 0.02


@pytest.mark.parametrize("div", ["chi2", "kl", "wasserstein"])
def test_robust_objective_at_truth_increases_with_radius(div):
    gen, z, y, eps = _data(n=200, seeds=4)
    values = [rc.robust_at_truth(div, rho, z, y, eps, gen.theta_star) for rho in (0.0, 0.01, 0.1)]
    torch.testing.assert_close(values[0], (eps**2).mean(-1))  # ρ = 0: the empirical risk
    assert bool((values[1] > values[0]).all()) and bool((values[2] > values[1]).all())


# ---------------------------------------------------------------- study and CLI


def test_erm_slope_is_parametric_on_fixed_seed():
    cfg = rc.StudyConfig(
        n_values=(50, 100, 200, 400, 800, 1600, 3200),
        seeds=30,
        divergences=("chi2",),
        schedules=("erm",),
        seed=7,
    )
    entry = rc.run_study(cfg, progress=False)["chi2"]["erm"]
    assert -0.6 < entry["slope"] < -0.4
    assert 0.0 <= entry["coverage"] <= 1.0
    assert entry["errors"] == sorted(entry["errors"], reverse=True)


def test_cli_writes_results_schema_and_png(tmp_path, capsys):
    out = tmp_path / "rc"
    argv = [
        "experiment",
        "radius-coverage",
        "--out",
        str(out),
        "--n-values",
        "30",
        "60",
        "120",
        "--seeds",
        "4",
        "--no-progress",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"chi2", "kl", "wasserstein"}
    for by_sched in results.values():
        assert set(by_sched) == {"erm", "d_over_n", "sqrt_d_over_n", "fixed"}
        for entry in by_sched.values():
            assert entry["n"] == [30, 60, 120] and len(entry["errors"]) == 3
            assert math.isfinite(entry["slope"]) and 0.0 <= entry["coverage"] <= 1.0
            assert all(0.0 <= c <= 1.0 for c in entry["coverage_by_n"])
    assert results["kl"]["fixed"]["radius"][0] == results["kl"]["fixed"]["radius"][-1] > 0
    assert (out / "radius_coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "meta.json").read_text())["generator"]["kind"] == "skewed"
    assert "| chi2 | sqrt_d_over_n |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--radius-constant", "-0.5"], "radius constant must be finite and >= 0"),
        (["--wasserstein-constant", "nan"], "radius constant must be finite and >= 0"),
        (["--seeds", "1"], "must be an integer >= 2"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(["experiment", "radius-coverage", "--out", str(tmp_path), *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_requires_out(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["experiment", "radius-coverage", "--quick"])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_study_config_rejects_negative_constant():
    with pytest.raises(ValueError, match="radius constant"):
        rc.run_study(rc.StudyConfig(constants={"chi2": -1.0}), progress=False)
