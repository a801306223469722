"""Exact worst-case weights of the χ² and KL ambiguity sets of DRO-REBEL (arXiv 2509.19104).

For per-pair losses ``ℓ_1..ℓ_n`` and the empirical distribution ``P̂`` (uniform), the robust
objective is ``sup_{Q: D(Q‖P̂) ≤ ρ} E_Q ℓ = Σ_i p_i ℓ_i`` with the worst-case weights ``p``:

* χ² (``D = ½·E_P̂[(dQ/dP̂ − 1)²]``): ``p_i = (ℓ_i − η*)_+ / Σ_j (ℓ_j − η*)_+`` where η* minimises
  ``η + sqrt(1+2ρ)·sqrt((1/n) Σ_i (ℓ_i − η)_+²)`` (solved exactly, see :func:`_chi2_solve`).
* KL: ``p = softmax(ℓ/τ*)`` with τ* solving ``Σ_i p_i log(n p_i) = ρ`` (bisection in log τ), or a
  fixed temperature τ (the paper's practice).

The solvers are pure tensor code: no ``.item()``, no data-dependent Python control flow (only the
hyper-parameters ρ, τ and the static batch size steer Python branches), so they run inside
``torch.compile(fullgraph=True)`` and never synchronise with the host. The public functions
check the losses first (``validate=True``: NaN/inf refused with a ``ValueError`` naming the row,
ONE host synchronisation; skipped under ``torch.compile``/``torch.vmap``; ``validate=False`` for
code that must not synchronise). They compute in float64
(the batch is small) after subtracting ``max ℓ`` and return weights in float32 (float64 for
float64 input). Weights are detached: by Danskin's theorem the gradient of the robust objective
is ``Σ p_i ∇ℓ_i`` with ``p`` held fixed.

Group level (``groups=``, beyond the paper; Group-DRO in the style of Sagawa et al., arXiv
1911.08731, with a χ²/KL ball instead of the whole simplex): pairs carry a group id, the ball is
over distributions ``q`` of the groups around their empirical shares ``π_g = n_g/n``, and the
objective is ``sup_{D(q‖π) ≤ ρ} Σ_g q_g L_g`` with ``L_g`` the mean loss of group g. It is solved
as the per-pair problem on the group means broadcast to their pairs, ``ℓ'_i = L_{g(i)}``: the
objective is constant within a group, so averaging any pair-level ``Q`` within each group keeps
its value and (by convexity of the divergence) does not increase ``D``, and a within-group-uniform
``Q`` has ``D(Q‖P̂) = D(q‖π)``. Each pair of group g then gets ``p_i = q_g/n_g``, and ``Σ_i p_i
ℓ_i = Σ_g q_g L_g``. ρ = 0 is REBEL's mean; the group means are computed without a host
synchronisation (an ``n × n`` same-group mask).
"""

from __future__ import annotations

import math
import numbers

import torch

from drorebel.distributed import (
    data_parallel_info,
    dp_global_sum,
    gather_rows,
    local_slice,
)
from drorebel.losses.options import WEIGHT_DIVERGENCES, check_choice

__all__ = ["dro_solve", "dro_weights", "robust_objective", "validate_dro_args", "check_losses",
           "check_groups", "group_first", "group_means", "check_hyperparameter", "raise_first_bad",
           "sync_free"]

# KL radius solve: multi-section of a log-τ bracket of width 80 with 31 interior points per
# round; 10 rounds shrink it to 80·32⁻¹⁰ ≈ 7e-14 (τ* to ~1e-13 relative) in 10 batched steps.
KL_SECTION_POINTS = 31
KL_SECTION_ROUNDS = 10
_KL_BRACKET_WIDTH = 80.0


def check_hyperparameter(
    name: str, value: object, *, positive: bool = False, finite: bool = False
) -> float:
    """The one check of a numeric hyper-parameter (``rho``, ``tau``, ``eta``, ``beta``): returns
    it as a float.

    A ``ValueError`` naming ``name`` for None, a bool (``rho=True`` is not a radius of 1), NaN,
    a negative value (``<= 0`` with ``positive``) or an infinite one (with ``finite``); a
    ``TypeError`` for anything that is not a real Python/NumPy number (a string, a tensor: pass
    ``float(t)``).
    """
    if value is None:
        raise ValueError(f"{name} is required")
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, not a bool (got {value!r})")
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (a Python float), got "
                        f"{type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if finite and math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_scalar(name: str, value: float | None, *, positive: bool = False) -> float:
    return check_hyperparameter(name, value, positive=positive)


def validate_dro_args(
    divergence: str, rho: float | None, tau: float | None
) -> tuple[float | None, float | None]:
    """Check the divergence name and its hyper-parameters; return ``(rho, tau)`` as floats.

    ``"none"`` ignores ``rho``/``tau``; ``"chi2"`` needs ``rho >= 0`` and no ``tau``; ``"kl"``
    needs exactly one of ``rho >= 0`` (radius) or ``tau > 0`` (fixed temperature).
    """
    check_choice("divergence", divergence, WEIGHT_DIVERGENCES)
    if divergence == "none":
        return None, None
    if divergence == "chi2":
        if tau is not None:
            raise ValueError("tau is not used by divergence='chi2' (pass rho only)")
        return _check_scalar("rho", rho), None
    if (rho is None) == (tau is None):
        raise ValueError("divergence='kl' needs exactly one of rho (radius) or tau (temperature)")
    if rho is not None:
        return _check_scalar("rho", rho), None
    return None, _check_scalar("tau", tau, positive=True)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tied_max_weights(x: torch.Tensor) -> torch.Tensor:
    """Uniform weights on the entries equal to the maximum (``x`` is max-subtracted: max = 0)."""
    tied = (x == 0).to(x.dtype)
    return tied / tied.sum()


def _chi2_solve(x: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """χ² worst case for max-subtracted float64 losses ``x`` (max 0); returns ``(p, η*)``.

    Dual (Namkoong & Duchi 2016/2017; DRO-REBEL §χ², arXiv 2509.19104):
    ``sup_{½E[(w−1)²] ≤ ρ, E w = 1, w ≥ 0} E[wℓ] = min_η η + c·sqrt(E (ℓ−η)_+²)``,
    ``c = sqrt(1+2ρ)``.
    Why ``1+2ρ`` and not ``2ρ``: the constraint ``½E[(w−1)²] ≤ ρ`` with ``E w = 1`` is
    ``E[w²] ≤ 1+2ρ``, and Cauchy–Schwarz bounds ``E[w(ℓ−η)] ≤ sqrt(E w²)·sqrt(E(ℓ−η)_+²)``. With
    ``sqrt(2ρ)`` the objective tends to −∞ as η → −∞ for ρ < ½ and ``(ℓ−η)_+`` normalised by it
    would not sum to one.

    Exact solution: sort descending, prefix sums ``S1_k, S2_k``. On the piece where the top k are
    active the objective is ``f_k(η) = η + sqrt(c²/n)·sqrt(S2_k − 2ηS1_k + kη²)`` (convex); its
    stationary point (when ``c²k > n``) is
    ``η_k = S1_k/k − sqrt(n·(k·S2_k − S1_k²)/(c²k − n))/k``, else ``f_k`` is non-decreasing. The
    minimiser of f over piece k is ``η_k`` clamped to ``[ℓ_(k+1), ℓ_(k)]`` (``ℓ_(k+1)`` when
    ``c²k ≤ n``); the global minimiser is the best of these n candidates and ``η = max ℓ``
    (value ``max ℓ``) — an argmin over values, robust to rounding at the piece boundaries.
    """
    n = x.shape[0]
    c2 = 1.0 + 2.0 * rho
    if rho == 0.0:  # infimum at η → −∞: uniform weights
        eta = torch.full((), -math.inf, dtype=x.dtype, device=x.device)
        return torch.full_like(x, 1.0 / n), eta
    if c2 >= n:  # the point mass on the maximum is feasible: all mass on the tied maxima
        return _tied_max_weights(x), torch.zeros((), dtype=x.dtype, device=x.device)
    xs = torch.sort(x, descending=True).values
    k = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    s1, s2 = torch.cumsum(xs, 0), torch.cumsum(xs * xs, 0)
    den = c2 * k - n
    var = torch.clamp(k * s2 - s1 * s1, min=0.0)
    eta = s1 / k - torch.sqrt(n * var / torch.clamp(den, min=1e-300)) / k
    lo = torch.cat([xs[1:], xs.new_full((1,), -math.inf)])
    cand = torch.where(den > 0, torch.minimum(torch.maximum(eta, lo), xs), lo)
    quad = torch.clamp(s2 - 2.0 * cand * s1 + k * cand * cand, min=0.0)
    vals = cand + math.sqrt(c2 / n) * torch.sqrt(quad)
    vals = torch.where(torch.isfinite(vals), vals, torch.full_like(vals, math.inf))
    # the candidate η = max ℓ (= 0 here) has value 0
    cand = torch.cat([cand, cand.new_zeros(1)])
    vals = torch.cat([vals, vals.new_zeros(1)])
    eta_star = torch.gather(cand, 0, torch.argmin(vals).reshape(1)).squeeze(0)  # no host sync
    w = torch.clamp(x - eta_star, min=0.0)
    s = w.sum()
    p = torch.where(s > 0, w / torch.where(s > 0, s, torch.ones_like(s)), _tied_max_weights(x))
    return p, eta_star


def _kl_section_round(x: torch.Tensor, rho: float, bracket: torch.Tensor) -> torch.Tensor:
    """Shrink ``bracket = [lo, hi, KL(lo), KL(hi)]`` (log τ, ``KL(lo) > ρ ≥ KL(hi)``) to one of
    its 32 equal sub-intervals.

    ``KL(softmax(x/τ) ‖ uniform) = Σ p log(n p)`` is evaluated on all interior points at once;
    it decreases in τ, so the points with ``KL > ρ`` form a prefix of length ``m`` and the new
    bracket is ``[pts[m], pts[m+1]]`` of ``pts = [lo, grid, hi]`` (picked with ``gather``).
    """
    k = KL_SECTION_POINTS
    lo, hi = bracket[0], bracket[1]
    frac = torch.arange(1, k + 1, dtype=x.dtype, device=x.device) / (k + 1)
    grid = lo + (hi - lo) * frac
    logp = torch.log_softmax(x.unsqueeze(0) / torch.exp(grid).unsqueeze(1), dim=1)
    kl = (logp.exp() * (logp + math.log(x.shape[0]))).sum(dim=1)
    m = (kl > rho).sum().reshape(1)
    pts = torch.cat([bracket[:1], grid, bracket[1:2]])
    vals = torch.cat([bracket[2:3], kl, bracket[3:]])
    idx = torch.cat([m, m + 1])
    return torch.cat([torch.gather(pts, 0, idx), torch.gather(vals, 0, idx)])


def _kl_radius_solve(x: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL worst case of radius ρ for max-subtracted float64 ``x``; returns ``(p, τ*)``.

    Dual (DRO-REBEL §KL, arXiv 2509.19104): ``min_{τ>0} τρ + τ·log((1/n) Σ exp(ℓ_i/τ))``; the
    minimiser τ* solves ``KL(softmax(ℓ/τ)‖P̂) = ρ`` (decreasing in τ, from ``log(n/t)`` at τ → 0,
    t = number of tied maxima, to 0 at τ → ∞). If ``ρ ≥ log(n/t)`` all mass goes to the tied
    maxima (τ* = 0). Bracket: with ``R = max ℓ − min ℓ``, ``KL ≤ R/τ`` and ``KL ≤ R²/(8τ²)``
    (the variance of ℓ under any tilt is ≤ R²/4), so ``τ_hi = R·min(1/ρ, 1/sqrt(8ρ))`` has
    ``KL ≤ ρ``; ``τ_lo = τ_hi·e⁻⁸⁰`` is below any float64-resolvable τ*. A fixed number of
    multi-section rounds in log τ (bisection with 32 sub-intervals per step, see
    :func:`_kl_section_round`) and a final linear interpolation keep the solve free of host
    synchronisation.
    """
    n = x.shape[0]
    if rho == 0.0:
        return torch.full_like(x, 1.0 / n), torch.full((), math.inf, dtype=x.dtype, device=x.device)
    tied = _tied_max_weights(x)
    if math.isinf(rho):
        return tied, torch.zeros((), dtype=x.dtype, device=x.device)
    n_tied = (x == 0).sum().to(x.dtype)
    saturated = rho >= math.log(n) - torch.log(n_tied)
    spread = -x.min()
    spread = torch.where(spread > 0, spread, torch.ones_like(spread))
    hi = torch.log(spread) + min(-math.log(rho), -0.5 * math.log(8.0 * rho))
    # KL at the initial ends is only bounded (≤ log(n/t), ≥ 0): used if τ* sits at an end
    bracket = torch.stack([hi - _KL_BRACKET_WIDTH, hi, math.log(n) - torch.log(n_tied), 0 * hi])
    for _ in range(KL_SECTION_ROUNDS):
        bracket = _kl_section_round(x, rho, bracket)
    # final linear interpolation of KL(log τ) = ρ inside the last bracket
    lo, hi, k_lo, k_hi = bracket.unbind()
    gap = k_lo - k_hi
    frac = torch.clamp((k_lo - rho) / torch.where(gap > 0, gap, torch.ones_like(gap)), 0.0, 1.0)
    log_tau = lo + (hi - lo) * frac
    p = torch.where(saturated, tied, torch.softmax(x / torch.exp(log_tau), dim=0))
    tau_star = torch.where(saturated, torch.zeros_like(log_tau), torch.exp(log_tau))
    return p, tau_star


def check_groups(groups: torch.Tensor | None, n: int) -> None:
    """A ``TypeError``/``ValueError`` unless ``groups`` is None or a 1-D integer tensor of ``n``
    group ids (any integers: only equality matters)."""
    if groups is None:
        return
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"groups must be a torch.Tensor of group ids, got {type(groups).__name__}")
    if groups.dim() != 1 or groups.shape[0] != n:
        raise ValueError(f"groups must be 1-D with one id per pair ([{n}]), got shape "
                         f"{tuple(groups.shape)}")
    if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
        raise ValueError(f"groups must be an integer tensor of group ids, got {groups.dtype}")


def group_means(losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``L_{g(i)}``: the mean loss of each pair's group, broadcast to the pairs (float64,
    detached; no host synchronisation)."""
    ell = losses.detach().to(torch.float64)
    mask = groups.unsqueeze(0) == groups.unsqueeze(1)
    same = mask.to(torch.float64)
    means = (same @ ell) / same.sum(1)
    # every pair reads its group's first row: bitwise-equal means within a group (the rows of a
    # matrix product may round differently, and a χ² threshold between them would split a group)
    return means[_first_of(mask)]


def _first_of(same: torch.Tensor) -> torch.Tensor:
    return torch.argmax(same.to(torch.int8), dim=1)


def group_first(groups: torch.Tensor) -> torch.Tensor:
    """Index of the first pair of each pair's group (``groups[group_first(groups)] == groups``;
    ``(group_first(g) == arange(n)).sum()`` is the number of groups); no host synchronisation."""
    return _first_of(groups.unsqueeze(0) == groups.unsqueeze(1))


def _solve_float64(
    losses: torch.Tensor, divergence: str, rho: float | None, tau: float | None,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and dual value (original units) in float64 for validated arguments; with
    ``groups``, of the group-level ball (solved on the broadcast group means)."""
    if groups is not None:
        losses = group_means(losses, groups)
    ell = losses.detach().to(torch.float64)
    n = ell.shape[0]
    nan = torch.full((), math.nan, dtype=torch.float64, device=ell.device)
    if divergence == "none":
        return torch.full_like(ell, 1.0 / n), nan
    top = ell.max()
    # A spread max ℓ − min ℓ beyond 2^59 is solved on (ℓ − max ℓ)/2^k ∈ [−2, 0] (a power of two
    # divides exactly): the weights are scale-invariant and the dual value scales, while the
    # squares of the χ² solve (spread ≳ 1e154) and the spread itself (≳ 1.8e308) would overflow
    # float64. Below 2^59 nothing changes (x = ℓ − max ℓ).
    half = top / 2 - ell.min() / 2  # cannot overflow
    big = half > 2.0**58
    step = torch.exp2(torch.where(big, torch.ceil(torch.log2(half)) - 1.0, 0.0))  # ≤ 2^1023
    x = torch.where(big, (ell / 2 - top / 2) / step, ell - top)

    def unscale(v: torch.Tensor) -> torch.Tensor:
        return torch.where(big, v * step * 2.0, v)

    if divergence == "chi2":
        p, eta = _chi2_solve(x, rho)  # type: ignore[arg-type]
        return p, unscale(eta) + top
    if tau is not None:
        return torch.softmax(unscale(x / tau), dim=0), torch.full_like(nan, tau)
    p, tau_star = _kl_radius_solve(x, rho)  # type: ignore[arg-type]
    return p, unscale(tau_star)


def check_losses(losses: torch.Tensor) -> None:
    """A ``TypeError``/``ValueError`` unless ``losses`` is a non-empty 1-D float tensor."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"losses must be a torch.Tensor, got {type(losses).__name__}")
    if losses.dim() != 1:
        raise ValueError(f"losses must be 1-D [n], got shape {tuple(losses.shape)}")
    if losses.shape[0] == 0:
        raise ValueError("losses must hold at least one value")
    if not losses.is_floating_point():
        raise ValueError(f"losses must be floating point, got {losses.dtype}")


def sync_free(t: torch.Tensor) -> bool:
    """True where a host synchronisation is impossible: while ``torch.compile`` traces, or when
    ``t`` is wrapped by a functorch transform (``torch.vmap``, ``torch.func.grad``). The value
    checks (``validate=True``) are skipped there; they run eagerly everywhere else."""
    return bool(torch.compiler.is_compiling()
                or torch._C._functorch.is_functorch_wrapped_tensor(t))


def raise_first_bad(checks: list[tuple[str, torch.Tensor, object]],
                    rows_per_rank: int | None = None) -> None:
    """``checks``: ``(name, bad, what)`` with ``bad`` a bool ``[n]`` mask and ``what`` a string
    or ``what(row) -> str``. ONE host synchronisation for all of them; a ``ValueError``
    ``"<name> row <i> <what>"`` for the first check with a flagged row (its first row).
    ``rows_per_rank``: the masks cover rows gathered from several ranks, ``rows_per_rank`` each;
    the message names the rank and its local row."""
    if not checks:
        return
    flags = torch.stack([bad.any() for _, bad, _ in checks]).tolist()  # the one host sync
    for flag, (name, bad, what) in zip(flags, checks):
        if flag:
            row = int(bad.reshape(-1).nonzero()[0, 0])
            text = what(row) if callable(what) else what
            where = f"row {row}"
            if rows_per_rank:
                where = f"row {row % rows_per_rank} of rank {row // rows_per_rank}"
            raise ValueError(f"{name} {where} {text}")


def _finite_check(name: str, t: torch.Tensor) -> tuple[str, torch.Tensor, object]:
    """A :func:`raise_first_bad` check that ``t`` is finite."""
    def what(row: int) -> str:
        return f"is not finite ({t.reshape(-1)[row].item()})"
    return name, ~torch.isfinite(t.detach()), what


def dro_solve(
    losses: torch.Tensor,
    divergence: str,
    rho: float | None = None,
    tau: float | None = None,
    *,
    groups: torch.Tensor | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Worst-case weights ``p`` over the given batch and the dual value (single process).

    ``sup_{D(Q‖P̂) ≤ ρ} E_Q ℓ = Σ_i p_i ℓ_i`` (DRO-REBEL, arXiv 2509.19104):

    * ``"none"``: ``p_i = 1/n`` (REBEL, arXiv 2404.16767); dual value NaN.
    * ``"chi2"`` (radius ``rho``): ``p_i = (ℓ_i − η*)_+ / Σ_j (ℓ_j − η*)_+``,
      ``η* = argmin_η η + sqrt(1+2ρ)·sqrt((1/n)Σ(ℓ_i − η)_+²)``; dual value η* (−inf for ρ = 0,
      ``max ℓ`` once ``1+2ρ ≥ n`` or the worst case is the tied maxima). The factor is
      ``sqrt(1+2ρ)`` because ``D = ½E[(w−1)²] ≤ ρ`` with ``E w = 1`` means ``E w² ≤ 1+2ρ``; the
      ``sqrt(2ρ)`` of a published implementation is unbounded below for ρ < ½ and its weights
      do not sum to one (see :func:`_chi2_solve`).
    * ``"kl"``, radius ``rho``: ``p = softmax(ℓ/τ*)`` with ``Σ p_i log(n p_i) = ρ``; dual value
      τ* (inf for ρ = 0, 0 when ``ρ ≥ log(n/#tied maxima)``: mass split over the tied maxima).
    * ``"kl"``, temperature ``tau``: ``p = softmax(ℓ/τ)``; dual value τ.

    Args:
        losses: per-pair losses ``[n]`` (any float dtype; the solve runs in float64 after
            subtracting ``max ℓ``, and spreads ``max ℓ − min ℓ`` beyond 2^59 are solved on
            exactly rescaled losses, so any finite ℓ and bf16/fp16 inputs are safe).
        divergence: ``"none"``, ``"chi2"`` or ``"kl"``.
        rho, tau: see above (Python numbers; a bool is refused).
        groups: optional ``[n]`` integer group ids: the ball is over the groups' distribution
            around their empirical shares and ``p_i = q_g/n_g`` (group level, see the module
            docstring); the dual value is that of the problem on the group means.
        validate: refuse NaN/inf losses with a ``ValueError`` naming the first bad row (one host
            synchronisation; skipped under ``torch.compile`` and ``torch.vmap``, see
            :func:`sync_free`). ``validate=False``: no synchronisation, and a NaN/inf loss
            gives NaN weights.

    Returns:
        ``(weights, dual_value)``, both detached; weights sum to 1 and have dtype float32
        (float64 for float64 input); dual value is a 0-d tensor of the same dtype.
    """
    check_losses(losses)
    check_groups(groups, losses.shape[0])
    rho, tau = validate_dro_args(divergence, rho, tau)
    if validate and not sync_free(losses):
        raise_first_bad([_finite_check("losses", losses)])
    p, dual = _solve_float64(losses, divergence, rho, tau, groups)
    dtype = _work_dtype(losses)
    return p.to(dtype), dual.to(dtype)


def _local_weights(
    losses: torch.Tensor, divergence: str, rho: float | None, tau: float | None,
    group: object | None, global_batch: bool, validate: bool, groups: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    """The shared prologue of :func:`dro_weights` and :func:`robust_objective`: validate once,
    gather the detached losses of the data-parallel group (when there is one), solve on the
    gathered batch, keep this rank's slice. Returns ``(p_local, world_size)``."""
    check_losses(losses)
    check_groups(groups, losses.shape[0])
    rho, tau = validate_dro_args(divergence, rho, tau)
    world, _ = data_parallel_info(group, global_batch)
    pool = gather_rows(losses, group) if world > 1 else losses.detach()
    if groups is not None and world > 1:
        groups = gather_rows(groups.to(torch.int64), group)
    if validate and not sync_free(losses):  # on the gathered pool: every rank raises alike
        raise_first_bad([_finite_check("losses", pool)],
                        rows_per_rank=losses.shape[0] if world > 1 else None)
    p, _ = _solve_float64(pool, divergence, rho, tau, groups)
    p = p.to(_work_dtype(losses))
    return (local_slice(p, losses.shape[0], group) if world > 1 else p), world


def dro_weights(
    losses: torch.Tensor,
    divergence: str,
    rho: float | None = None,
    tau: float | None = None,
    *,
    group: object | None = None,
    global_batch: bool = True,
    validate: bool = True,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Detached worst-case weights ``p`` (see :func:`dro_solve` for the formulas, ``groups``
    (group-level ball) and ``validate``: NaN/inf losses are refused naming the row, one host
    sync).

    Under data parallelism (``torch.distributed`` initialised, more than one rank in ``group`` and
    ``global_batch=True``) the weights are those of the *global* batch (all ranks' losses in rank
    order; equal local sizes required) and this rank's slice is returned: it sums to less than one,
    the global vector sums to one. Otherwise the weights cover ``losses`` and sum to one.
    """
    return _local_weights(losses, divergence, rho, tau, group, global_batch, validate, groups)[0]


def robust_objective(
    losses: torch.Tensor,
    divergence: str,
    rho: float | None = None,
    tau: float | None = None,
    *,
    group: object | None = None,
    global_batch: bool = True,
    validate: bool = True,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_i p_i ℓ_i`` = ``sup_{D(Q‖P̂) ≤ ρ} E_Q ℓ`` (arXiv 2509.19104), differentiable by Danskin.
    With ``groups``: ``sup_{D(q‖π) ≤ ρ} Σ_g q_g L_g`` over the groups (see :func:`dro_solve`).

    The gradient is ``Σ_i p_i ∇ℓ_i`` with ``p`` held fixed. Computed in float32 (float64 for
    float64 input). Under data parallelism the value is the robust objective of the global batch
    on every rank and the gradient is scaled (see
    :func:`drorebel.distributed.dp_global_sum`) so that DDP's gradient averaging gives the
    exact single-process gradient. ``validate``: NaN/inf losses are refused naming the row (one
    host sync; see :func:`dro_solve`).
    """
    p, world = _local_weights(losses, divergence, rho, tau, group, global_batch, validate,
                              groups)
    local = (p * losses.to(p.dtype)).sum()
    if world == 1:
        return local
    return dp_global_sum(local, group)
