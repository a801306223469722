"""Radius–coverage study: estimation rate and coverage of DRO-REBEL vs the radius schedule.

``drorebel experiment radius-coverage --out DIR [--quick]`` (DRO-REBEL, arXiv 2509.19104 §4).

In the linear-reward, log-linear-policy setting one REBEL step (arXiv 2404.16767) is the
regression of the relative reward ``y = r_a − r_b`` on the feature difference ``z = ψ_a − ψ_b``
with loss ``ℓ(θ) = (z·θ − y)²`` and θ* known. For each divergence (χ², KL, Wasserstein) and radius
schedule (``erm`` ρ = 0, ``d_over_n`` ρ = c·d/n, ``sqrt_d_over_n`` ρ = c·sqrt(d/n), ``fixed``
ρ = c·sqrt(d/100)) the study fits ``θ̂ = argmin R_n(θ)`` on many seeds and n, and reports

* the slope of ``log mean ‖θ̂ − θ*‖`` against ``log n`` (least squares over the n grid), and
  ``slope_tail`` over the larger half of the grid (closer to the asymptotic rate);
* the coverage: the fraction of (seed, n) with ``R_n(θ*) ≥ L(θ*)``, ``L(θ*) = E ε²`` the
  population objective (closed form), ``R_n`` the robust empirical objective with the same ρ.

Radius constants (defaults, overridable): χ²/KL ``c = z²/(2d)`` with ``z = Φ⁻¹(level)``. Since
``sup_{D ≤ ρ} E_Q ℓ ≈ mean ℓ + sqrt(2ρ·Var ℓ)`` for small ρ (``D = ½E(w−1)²``, and KL ≈ the same
to second order), ρ = c·d/n = z²/(2n) is the classical empirical-likelihood calibration
(Duchi, Glynn & Namkoong 2021): asymptotic one-sided coverage = level. Wasserstein: the margin is
``2ρ‖θ*‖·sqrt(L)`` against fluctuations ``sd(ε²)/sqrt(n)``, so the radius that keeps coverage
shrinks like 1/sqrt(n); ``c_W = z·sd(ε²)/(2·sqrt(d)·‖θ*‖·sqrt(L))`` (population moments of the
generator) gives the ``sqrt_d_over_n`` schedule asymptotic coverage = level. The generator is
explained in :mod:`drorebel.experiments.radius_coverage.data`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drorebel.experiments.radius_coverage.data import GENERATORS, SCHEDULES, Generator, radius
from drorebel.experiments.radius_coverage.solvers import (
    fit,
    robust_value_and_weights,
    wasserstein_objective,
)

__all__ = [
    "DIVERGENCES",
    "StudyConfig",
    "add_arguments",
    "default_constants",
    "format_table",
    "loglog_slope",
    "robust_at_truth",
    "run",
    "run_study",
]

DIVERGENCES = ("chi2", "kl", "wasserstein")
FULL_N = (100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
FULL_SEEDS = 50
QUICK_N = (50, 100, 250, 500, 1000, 2500, 5000)
QUICK_SEEDS = 20


def default_constants(gen: Generator, level: float = 0.95) -> dict[str, float]:
    """Radius constants calibrated to asymptotic coverage ``level`` (see the module docstring):
    χ²/KL at the ``d_over_n`` schedule, Wasserstein at the ``sqrt_d_over_n`` schedule."""
    if not 0.5 < level < 1.0:
        raise ValueError(f"level must be in (0.5, 1), got {level}")
    z = statistics.NormalDist().inv_cdf(level)
    m2, m4 = gen.noise_moments()
    c_div = z * z / (2.0 * gen.d)
    c_w = (
        z
        * math.sqrt(m4 - m2 * m2)
        / (2.0 * math.sqrt(gen.d) * gen.theta_star.norm().item() * math.sqrt(m2))
    )
    return {"chi2": c_div, "kl": c_div, "wasserstein": c_w}


@dataclass
class StudyConfig:
    """What to run: n grid, number of seeds, generator, radius constants, base seed."""

    n_values: tuple[int, ...] = QUICK_N
    seeds: int = QUICK_SEEDS
    generator: Generator = field(default_factory=Generator)
    constants: dict[str, float] | None = None  # None: default_constants(generator)
    divergences: tuple[str, ...] = DIVERGENCES
    schedules: tuple[str, ...] = SCHEDULES
    seed: int = 0

    def resolved_constants(self) -> dict[str, float]:
        """The radius constants: :func:`default_constants` updated by ``constants``."""
        constants = dict(default_constants(self.generator))
        constants.update(self.constants or {})
        for name, value in constants.items():
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"radius constant for {name} must be finite and >= 0, got {value}")
        return constants


def loglog_slope(n: list[int] | tuple[int, ...], errors: list[float]) -> float:
    """Least-squares slope of ``log errors`` against ``log n``."""
    x = torch.log(torch.tensor(n, dtype=torch.float64))
    y = torch.log(torch.tensor(errors, dtype=torch.float64))
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def robust_at_truth(divergence: str, rho: float, z: torch.Tensor, y: torch.Tensor,
                    eps: torch.Tensor, theta_star: torch.Tensor) -> torch.Tensor:
    """``R_n(θ*)`` per seed: the robust empirical objective at the true parameter."""
    if divergence == "wasserstein":
        return wasserstein_objective(theta_star.expand(z.shape[0], -1), z, y, rho)
    return robust_value_and_weights(eps * eps, divergence, rho)[0]


def _empty_entry() -> dict[str, list]:
    keys = ("n", "errors", "errors_std", "coverage_by_n", "radius", "iterations")
    return {k: [] for k in keys} | {"converged": True}


def _record(entry, n, rho, result, theta_star, covered) -> None:
    err = (result.theta - theta_star).norm(dim=-1)
    entry["n"].append(n)
    entry["errors"].append(err.mean().item())
    entry["errors_std"].append(err.std().item() if err.numel() > 1 else 0.0)
    entry["coverage_by_n"].append(covered.to(torch.float64).mean().item())
    entry["radius"].append(rho)
    entry["iterations"].append(result.iterations)
    entry["converged"] = entry["converged"] and bool(result.converged.all())


def run_study(cfg: StudyConfig, *, progress: bool = True) -> dict[str, dict[str, dict]]:
    """Run the grid; returns ``{divergence: {schedule: {"slope", "coverage", "errors", "n", …}}}``
    (extra keys: ``slope_tail``, ``errors_std``, ``coverage_by_n``, ``radius``, ``radius_constant``,
    ``iterations``, ``converged``)."""
    from tqdm.auto import tqdm

    if len(cfg.n_values) < 2 or min(cfg.n_values) <= cfg.generator.d or cfg.seeds < 2:
        raise ValueError("need >= 2 values of n, each > d, and >= 2 seeds")
    constants = cfg.resolved_constants()
    gen, theta_star = cfg.generator, cfg.generator.theta_star
    pop = gen.noise_moments()[0]
    results = {div: {s: _empty_entry() for s in cfg.schedules} for div in cfg.divergences}
    bar = tqdm(sorted(cfg.n_values), desc="radius-coverage", disable=not progress)
    for n in bar:
        rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + n)
        z, y, eps = gen.sample(cfg.seeds, n, rng)
        for div in cfg.divergences:
            for sched in cfg.schedules:
                bar.set_postfix_str(f"{div}/{sched}")
                rho = radius(sched, constants[div], gen.d, n)
                result = fit(z, y, div, rho)
                covered = robust_at_truth(div, rho, z, y, eps, theta_star) >= pop
                _record(results[div][sched], n, rho, result, theta_star, covered)
    for div, by_sched in results.items():
        for entry in by_sched.values():
            entry["slope"] = loglog_slope(entry["n"], entry["errors"])
            tail = len(entry["n"]) // 2
            entry["slope_tail"] = loglog_slope(entry["n"][tail:], entry["errors"][tail:])
            entry["coverage"] = sum(entry["coverage_by_n"]) / len(entry["coverage_by_n"])
            entry["radius_constant"] = constants[div]
    return results


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown table: divergence × schedule → slope (all n, larger half), pooled coverage,
    coverage and error at the largest n."""
    lines = [
        "| divergence | schedule | slope | slope (larger half of n) | coverage "
        "| coverage (largest n) | error (largest n) |",
        "|---|---|---|---|---|---|---|",
    ]
    for div, by_sched in results.items():
        for sched, e in by_sched.items():
            lines.append(
                f"| {div} | {sched} | {e['slope']:+.3f} | {e['slope_tail']:+.3f} | "
                f"{e['coverage']:.3f} | {e['coverage_by_n'][-1]:.3f} | {e['errors'][-1]:.4f} |"
            )
    return "\n".join(lines)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"radius constant must be finite and >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the CLI options of ``drorebel experiment radius-coverage``."""
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"n in {QUICK_N}, {QUICK_SEEDS} seeds (< 2 min on 2 cores)",
    )
    parser.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help=f"seeds per n (default {FULL_SEEDS}; {QUICK_SEEDS} with --quick)",
    )
    parser.add_argument(
        "--n-values",
        type=_positive_int,
        nargs="+",
        default=None,
        help="sample sizes n (overrides the --quick/full grid)",
    )
    parser.add_argument("--dim", type=_positive_int, default=4, help="feature dimension d")
    parser.add_argument("--generator", choices=GENERATORS, default="skewed")
    parser.add_argument(
        "--radius-constant",
        type=_non_negative,
        default=None,
        help="c of the χ²/KL schedules (default z²/(2d), 95%% calibration)",
    )
    parser.add_argument(
        "--wasserstein-constant",
        type=_non_negative,
        default=None,
        help="c of the Wasserstein schedules (default: 95%% calibration)",
    )
    parser.add_argument("--seed", type=int, default=0, help="base random seed")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _config_from_args(args: argparse.Namespace) -> StudyConfig:
    constants = {}
    if args.radius_constant is not None:
        constants.update(chi2=args.radius_constant, kl=args.radius_constant)
    if args.wasserstein_constant is not None:
        constants["wasserstein"] = args.wasserstein_constant
    n_values = tuple(args.n_values) if args.n_values else (QUICK_N if args.quick else FULL_N)
    seeds = args.seeds or (QUICK_SEEDS if args.quick else FULL_SEEDS)
    gen = Generator(d=args.dim, kind=args.generator)
    return StudyConfig(n_values, seeds, gen, constants or None, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    """Run the study, write ``DIR/results.json``, ``DIR/meta.json`` and
    ``DIR/radius_coverage.png``, print the table; returns 0."""
    from drorebel.experiments.radius_coverage.plot import plot_results

    cfg = _config_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_study(cfg, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    meta = {
        "generator": cfg.generator.describe(),
        "radius_constants": cfg.resolved_constants(),
        "n_values": list(cfg.n_values),
        "seeds": cfg.seeds,
        "seed": cfg.seed,
        "seconds": elapsed,
        "threads": torch.get_num_threads(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    title = f"generator={cfg.generator.kind}, d={cfg.generator.d}, {cfg.seeds} seeds"
    plot_results(results, out / "radius_coverage.png", title=title)
    print(format_table(results))
    print(f"\n{cfg.seeds} seeds x {len(cfg.n_values)} n values in {elapsed:.1f} s; wrote {out}")
    return 0
