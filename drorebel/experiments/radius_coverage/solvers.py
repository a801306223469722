"""Robust estimators of the linear-reward, log-linear-policy REBEL step (radius–coverage study).

Setting (REBEL, arXiv 2404.16767 §5; DRO-REBEL, arXiv 2509.19104 §4): the policy is
``π_θ(y|x) ∝ exp(θ·ψ(x, y))`` and the reward is linear, ``r(x, y) = θ*·ψ(x, y) + noise``. With
η = 1 and the reference terms absorbed, one REBEL step regresses the relative reward on the
feature difference: for pair i, ``z_i = ψ(x_i, a_i) − ψ(x_i, b_i)``, ``y_i = r_a − r_b`` and

    ℓ_i(θ) = (z_i·θ − y_i)².

Robust estimators ``θ̂ = argmin_θ R_n(θ)``, all batched over seeds (leading dim ``S``, float64):

* χ² / KL: ``R_n(θ) = sup_{D(Q‖P̂_n) ≤ ρ} E_Q ℓ(θ) = Σ_i p_i(θ) ℓ_i(θ)`` with the worst-case
  weights of :func:`drorebel.losses.dro.dro_solve`. R_n is convex (a supremum of convex
  functions) and by Danskin ``∇R_n = Σ_i p_i ∇ℓ_i`` with p held fixed.
* Wasserstein (type 2, z perturbed): see :func:`wasserstein_objective`.

All three start at the OLS (ERM) solution and take damped Newton-type steps with an Armijo
backtracking line search on the exact objective, so every accepted step decreases R_n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drorebel.losses.dro import dro_solve

__all__ = [
    "FitResult",
    "fit",
    "fit_dro",
    "fit_wasserstein",
    "ols",
    "robust_value_and_weights",
    "wasserstein_objective",
]

ARMIJO = 1e-4  # sufficient-decrease constant of the line search
MAX_HALVINGS = 30  # line search gives up (seed marked stalled) after 2⁻³⁰
# stop when the Newton decrement gᵀH⁻¹g falls below DECREMENT_TOL · R: the suboptimality is then
# ≈ 5e-15 relative and θ is within ≈ 1e-7·sqrt(R/λ_min(H)) of the minimiser. The float64 noise of
# R itself grows with n (the χ² solver's prefix sums, Σ p_i ℓ_i), ≈ 1e-13 relative at n = 2e4:
# seeds at that floor end as stalled (see _line_search), after the rounding-tolerant Armijo test
DECREMENT_TOL = 1e-14
# an accepted step that lowers R by less than this (relative) is a stall at machine precision
STALL_RTOL = 1e-15
ROUNDING_EPS = 2.0**-52  # Armijo allowance: n·eps·|R|, the rounding level of a sum of n terms


@dataclass
class FitResult:
    """Solution of one batched fit: ``theta [S, d]``, iterations used, per-seed convergence."""

    theta: torch.Tensor
    iterations: int
    converged: torch.Tensor  # [S] bool: Newton decrement below tolerance (or stalled)


def ols(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least squares ``θ = (ZᵀZ)⁻¹Zᵀy`` per seed (REBEL's ERM step); ``z [S,n,d]``, ``y [S,n]``."""
    return torch.linalg.lstsq(z, y.unsqueeze(-1)).solution.squeeze(-1)


def _residuals(theta: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.einsum("snd,sd->sn", z, theta) - y


def robust_value_and_weights(
    losses: torch.Tensor, divergence: str, rho: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R [S], p [S,n])``: worst-case weights of each row and ``R = Σ_i p_i ℓ_i``.

    Rows are solved independently by the project solver :func:`~drorebel.losses.dro.dro_solve`;
    ``divergence`` is ``"chi2"`` or ``"kl"``.
    """
    value, p, _ = _solve_rows(losses, divergence, rho)
    return value, p


def _solve_rows(losses, divergence, rho):
    """``(R, p, dual)`` per row; dual is η* (χ²) or τ* (KL), see ``dro_solve``."""
    if rho == 0.0:
        p = torch.full_like(losses, 1.0 / losses.shape[-1])
        dual = torch.full_like(losses[..., 0], float("nan"))
    else:
        # one solve per row: the KL solver's [31, n] section grids stay cache-sized (a vmap over
        # all rows materialises [S, 31, n] and measured 5–10× slower at n = 2e4, S = 40)
        rows = [dro_solve(row, divergence, rho=rho) for row in losses]
        p = torch.stack([r[0] for r in rows])
        dual = torch.stack([r[1] for r in rows])
    return (p * losses).sum(-1), p, dual


def _outer_sum(weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``Σ_i weight_i z_i z_iᵀ`` per seed."""
    return torch.einsum("sn,snd,sne->sde", weight, z, z)


def _kl_hessian(z, r, p, tau, gn):
    """Exact ∇²R of the KL-ball objective ``R(θ) = min_τ τρ + τ log mean exp(ℓ/τ)``.

    With ``F(θ, τ)`` the dual function, ``∇²R = F_θθ − F_θτ F_τθ / F_ττ`` (partial minimisation):
    ``F_θθ = Σp∇²ℓ + Cov_p(∇ℓ)/τ``, ``F_θτ = −Cov_p(ℓ, ∇ℓ)/τ²``, ``F_ττ = Var_p(ℓ)/τ³``, so
    ``∇²R = Σp∇²ℓ + [Cov_p(∇ℓ) − Cov_p(ℓ,∇ℓ)Cov_p(ℓ,∇ℓ)ᵀ/Var_p(ℓ)]/τ`` (∇ℓ_i = 2r_i z_i).
    Rows with τ* ∉ (0, ∞) or ``Var_p(ℓ) = 0`` keep the Gauss–Newton matrix ``gn = Σp∇²ℓ``.
    """
    ell = r * r
    grad_l = 2.0 * r.unsqueeze(-1) * z
    gbar = torch.einsum("sn,snd->sd", p, grad_l)
    centred = ell - (p * ell).sum(-1, keepdim=True)
    cov_lg = torch.einsum("sn,snd->sd", p * centred, grad_l)
    var_l = (p * centred * centred).sum(-1)
    cov_g = _outer_sum(4.0 * p * ell, z) - gbar[:, :, None] * gbar[:, None, :]
    ok = torch.isfinite(tau) & (tau > 0) & (var_l > 0)
    safe_var = torch.where(ok, var_l, torch.ones_like(var_l))
    safe_tau = torch.where(ok, tau, torch.ones_like(tau))
    extra = cov_g - cov_lg[:, :, None] * cov_lg[:, None, :] / safe_var[:, None, None]
    return torch.where(ok[:, None, None], gn + extra / safe_tau[:, None, None], gn)


def _chi2_hessian(z, r, p, eta, gn):
    """Exact ∇²R of the χ²-ball objective ``R(θ) = min_η η + c·sqrt(mean (ℓ−η)_+²)``.

    With ``w = (ℓ−η*)_+``, ``W = Σw``, ``W₂ = Σw²``, ``q = W²/W₂``, k active pairs,
    ``A = Σ_act ∇ℓ∇ℓᵀ``, ``m = Σ_act ∇ℓ``, ``ḡ = Σp∇ℓ`` and the optimality ``c·W = sqrt(n·W₂)``:
    ``G_θθ = Σp∇²ℓ + (A − qḡḡᵀ)/W``, ``G_θη = (qḡ − m)/W``, ``G_ηη = (k − q)/W`` and
    ``∇²R = G_θθ − G_θη G_θηᵀ/G_ηη``. ``G_ηη > 0`` unless all active w are equal
    (Cauchy–Schwarz); such rows (and saturated ones) keep the Gauss–Newton matrix ``gn``.
    """
    ell = r * r
    w = torch.clamp(ell - eta.unsqueeze(-1), min=0.0)
    act = (w > 0).to(w.dtype)
    big_w, w2, k = w.sum(-1), (w * w).sum(-1), act.sum(-1)
    q = big_w**2 / w2.clamp_min(1e-300)
    grad_l = 2.0 * r.unsqueeze(-1) * z
    gbar = torch.einsum("sn,snd->sd", p, grad_l)
    m = torch.einsum("sn,snd->sd", act, grad_l)
    a_mat = _outer_sum(4.0 * act * ell, z)
    g_ee = (k - q) / big_w.clamp_min(1e-300)
    ok = torch.isfinite(eta) & (big_w > 0) & (g_ee > 1e-12 * k / big_w.clamp_min(1e-300))
    inv_w = (1.0 / big_w.clamp_min(1e-300))[:, None, None]
    g_tt = gn + (a_mat - q[:, None, None] * gbar[:, :, None] * gbar[:, None, :]) * inv_w
    g_te = (q[:, None] * gbar - m) * inv_w[:, :, 0]
    safe_ee = torch.where(ok, g_ee, torch.ones_like(g_ee))
    hess = g_tt - g_te[:, :, None] * g_te[:, None, :] / safe_ee[:, None, None]
    return torch.where(ok[:, None, None], hess, gn)


def dro_derivatives(theta, z, y, divergence, p, dual):
    """Danskin gradient ``Σ p_i ∇ℓ_i`` and exact Hessian of the χ²/KL robust objective at θ
    (``p``, ``dual`` from the solver at θ); falls back to Gauss–Newton ``Σ p_i ∇²ℓ_i`` where the
    exact Hessian is undefined or not numerically positive definite. Returns ``(g, H, H_gn)``."""
    r = _residuals(theta, z, y)
    grad = 2.0 * torch.einsum("sn,snd->sd", p * r, z)
    gn = 2.0 * _outer_sum(p, z)
    exact = (_chi2_hessian if divergence == "chi2" else _kl_hessian)(z, r, p, dual, gn)
    _, info = torch.linalg.cholesky_ex(exact)
    return grad, torch.where((info == 0)[:, None, None], exact, gn), gn


def _newton_direction(grad: torch.Tensor, hess: torch.Tensor) -> torch.Tensor:
    """``−H⁻¹g`` with a tiny relative ridge (H may be singular when p has < d atoms)."""
    d = hess.shape[-1]
    eye = torch.eye(d, dtype=hess.dtype, device=hess.device)
    ridge = 1e-12 * hess.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300) / d
    return -torch.linalg.solve(hess + ridge[:, None, None] * eye, grad.unsqueeze(-1)).squeeze(-1)


def _line_search(objective, theta, value, direction, slope, active, noise_terms):
    """Armijo backtracking per seed on the rows in ``active``; returns the new state.

    ``noise_terms`` (the number of summed terms, n) sets the test's rounding allowance.
    A seed is *stalled* when no step size down to 2⁻³⁰ passes, or when the accepted step lowers
    the objective by less than ``STALL_RTOL`` relative (nothing representable left to gain).

    ``objective(theta_subset, rows) -> (value, aux)``. Returns ``(theta, value, aux_rows, aux,
    stalled)`` where ``aux`` holds the objective's extra output for the accepted points of
    ``aux_rows`` (seed indices).
    """
    step = torch.ones_like(value)
    pending = active.clone()
    stalled = torch.zeros_like(active)
    new_theta, new_value = theta.clone(), value.clone()
    accepted_rows, accepted_aux = [], []
    for _ in range(MAX_HALVINGS + 1):
        rows = pending.nonzero().squeeze(-1)
        if rows.numel() == 0:
            break
        trial = theta[rows] + step[rows, None] * direction[rows]
        trial_value, aux = objective(trial, rows)
        # Armijo with a rounding allowance: once the predicted decrease is below float64
        # resolution a plain test fails at random and would halve the step 40 times
        slack = ROUNDING_EPS * noise_terms * value[rows].abs()
        ok = trial_value <= value[rows] + ARMIJO * step[rows] * slope[rows] + slack
        good = rows[ok]
        stalled[good] = value[good] - trial_value[ok] <= STALL_RTOL * value[good].abs()
        new_theta[good], new_value[good] = trial[ok], trial_value[ok]
        accepted_rows.append(good)
        accepted_aux.append(aux[ok])
        pending[good] = False
        step[rows[~ok]] *= 0.5
    stalled |= pending
    return new_theta, new_value, torch.cat(accepted_rows), torch.cat(accepted_aux), stalled


def fit_dro(
    z: torch.Tensor, y: torch.Tensor, divergence: str, rho: float, *, max_iter: int = 100
) -> FitResult:
    """``argmin_θ sup_{D(Q‖P̂_n) ≤ ρ} E_Q (z·θ − y)²`` for ``divergence`` in ``{"chi2", "kl"}``.

    Newton's method on the convex R_n: Danskin gradient ``g = Σ p_i·2r_i z_i`` and the exact
    Hessian of the partially minimised dual (see :func:`_chi2_hessian`, :func:`_kl_hessian`),
    falling back to the Gauss–Newton matrix ``2Σp_i z_i z_iᵀ`` (the weighted least-squares step)
    where that is not positive definite. Either way ``−H⁻¹g`` is a descent direction, and the
    Armijo line search on the exact R_n keeps every step a decrease. Stops when
    ``gᵀH⁻¹g ≤ 1e-14·R_n`` or the seed stalls.
    """
    theta = ols(z, y)
    if rho == 0.0:
        return FitResult(theta, 0, torch.ones(theta.shape[0], dtype=torch.bool))

    def objective(th, rows):
        value, p, dual = _solve_rows(_residuals(th, z[rows], y[rows]) ** 2, divergence, rho)
        return value, torch.cat([p, dual.unsqueeze(-1)], dim=-1)

    value, aux = objective(theta, torch.arange(theta.shape[0]))
    done = torch.zeros(theta.shape[0], dtype=torch.bool)
    for it in range(1, max_iter + 1):
        grad, hess, _ = dro_derivatives(theta, z, y, divergence, aux[:, :-1], aux[:, -1])
        direction = _newton_direction(grad, hess)
        slope = (grad * direction).sum(-1)
        done |= -slope <= DECREMENT_TOL * value.abs()
        if bool(done.all()):
            return FitResult(theta, it - 1, done)
        theta, value, rows, aux_rows, stalled = _line_search(
            objective, theta, value, direction, slope, ~done, z.shape[1]
        )
        aux[rows] = aux_rows
        done |= stalled  # no representable decrease left: at the optimum to machine precision
    return FitResult(theta, max_iter, done)


def wasserstein_objective(theta: torch.Tensor, z: torch.Tensor, y: torch.Tensor, rho: float):
    """``R_n(θ) = (1/n)Σℓ_i + ρ·sqrt((1/n)Σ‖∇_z ℓ_i‖²) = A(θ) + 2ρ‖θ‖·sqrt(A(θ))``, ``A = mean ℓ``.

    First-order dual of the type-2 Wasserstein ball of radius ρ with the feature difference z
    perturbed (Gao, Chen & Kleywegt 2017; DRO-REBEL §Wasserstein, arXiv 2509.19104). Closed
    form: ``ℓ_i = r_i²`` with ``r_i = z_i·θ − y_i``, so ``∇_z ℓ_i = 2 r_i θ``,
    ``‖∇_z ℓ_i‖² = 4 r_i² ‖θ‖² = 4 ℓ_i ‖θ‖²`` and ``sqrt(mean_i ‖∇_z ℓ_i‖²) = 2‖θ‖·sqrt(A)``.
    Batched: ``theta [S,d]``, ``z [S,n,d]``, ``y [S,n]`` → ``[S]``.
    """
    a = (_residuals(theta, z, y) ** 2).mean(-1)
    return a + 2.0 * rho * theta.norm(dim=-1) * a.sqrt()


def _wasserstein_derivatives(theta, z, y, rho):
    """Value, exact gradient and Hessian of ``R = A + 2ρNB`` (``N = ‖θ‖``, ``B = sqrt(A)``).

    ``∇A = (2/n)Zᵀr``, ``∇²A = (2/n)ZᵀZ``, ``∇N = u = θ/N``, ``∇²N = (I − uuᵀ)/N``,
    ``∇B = ∇A/(2B)``, ``∇²B = ∇²A/(2B) − ∇A∇Aᵀ/(4B³)``;
    ``∇R = ∇A + 2ρ(B u + N ∇B)``, ``∇²R = ∇²A + 2ρ(B∇²N + u∇Bᵀ + ∇B uᵀ + N∇²B)``.
    """
    n, d = z.shape[1], z.shape[2]
    r = _residuals(theta, z, y)
    a = (r * r).mean(-1)
    ga = 2.0 * torch.einsum("snd,sn->sd", z, r) / n
    ha = 2.0 * z.transpose(1, 2) @ z / n
    nrm = theta.norm(dim=-1).clamp_min(1e-300)
    bb = a.sqrt().clamp_min(1e-300)
    u = theta / nrm[:, None]
    gb = ga / (2.0 * bb[:, None])
    eye = torch.eye(d, dtype=theta.dtype, device=theta.device)
    hn = (eye - u[:, :, None] * u[:, None, :]) / nrm[:, None, None]
    outer = ga[:, :, None] * ga[:, None, :]
    hb = ha / (2.0 * bb[:, None, None]) - outer / (4.0 * bb**3)[:, None, None]
    value = a + 2.0 * rho * nrm * bb
    grad = ga + 2.0 * rho * (bb[:, None] * u + nrm[:, None] * gb)
    cross = u[:, :, None] * gb[:, None, :]
    hess = ha + 2.0 * rho * (
        bb[:, None, None] * hn + cross + cross.transpose(1, 2) + nrm[:, None, None] * hb
    )
    return value, grad, hess, ha


def fit_wasserstein(
    z: torch.Tensor, y: torch.Tensor, rho: float, *, max_iter: int = 100
) -> FitResult:
    """``argmin_θ A(θ) + 2ρ‖θ‖·sqrt(A(θ))`` (see :func:`wasserstein_objective`).

    Newton's method with the exact Hessian where it is positive definite (the objective is
    convex near the OLS start for moderate ρ, not globally: ‖θ‖·sqrt(A) is a product of convex
    functions), else the ``∇²A``-preconditioned gradient (always a descent direction); Armijo
    line search on the exact objective. Stops when ``gᵀH⁻¹g ≤ 1e-14·R_n`` or the seed stalls.
    """
    theta = ols(z, y)
    if rho == 0.0:
        return FitResult(theta, 0, torch.ones(theta.shape[0], dtype=torch.bool))

    def objective(th, rows):
        return wasserstein_objective(th, z[rows], y[rows], rho), th.new_zeros(th.shape[0])

    done = torch.zeros(theta.shape[0], dtype=torch.bool)
    for it in range(1, max_iter + 1):
        value, grad, hess, ha = _wasserstein_derivatives(theta, z, y, rho)
        _, info = torch.linalg.cholesky_ex(hess)
        hess = torch.where((info == 0)[:, None, None], hess, ha)
        direction = _newton_direction(grad, hess)
        slope = (grad * direction).sum(-1)
        done |= -slope <= DECREMENT_TOL * value.abs()
        if bool(done.all()):
            return FitResult(theta, it - 1, done)
        theta, _, _, _, stalled = _line_search(
            objective, theta, value, direction, slope, ~done, z.shape[1]
        )
        done |= stalled
    return FitResult(theta, max_iter, done)


def fit(z: torch.Tensor, y: torch.Tensor, divergence: str, rho: float) -> FitResult:
    """Robust fit: ``"chi2"``/``"kl"`` → :func:`fit_dro`, ``"wasserstein"`` →
    :func:`fit_wasserstein`."""
    if divergence == "wasserstein":
        return fit_wasserstein(z, y, rho)
    return fit_dro(z, y, divergence, rho)
