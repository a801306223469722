"""Data generator and radius schedules of the radius–coverage study (DRO-REBEL, arXiv 2509.19104).

Linear reward, log-linear policy: features ``ψ(x, y) ~ N(0, I_d)`` for the two responses of a
pair (drawn independently, as REBEL draws both responses from the current policy), reward
``r(x, y) = θ*·ψ(x, y) + s(ψ)·ξ`` and the regression data of one REBEL step
``z = ψ_a − ψ_b``, ``y = r_a − r_b = z·θ* + ε`` with ``ε = s(ψ_a)ξ_a − s(ψ_b)ξ_b``.

Generators:

* ``"skewed"`` (default): ξ is a standardised Beta(0.3, 6) (mean 0, variance 1, skewness ≈ 2.8,
  bounded: a reward model that now and then over-scores a response by a lot) and the noise scale
  ``s(ψ) = s_lo + (s_hi − s_lo)·Φ(ψ₁)`` grows with the first feature (heteroscedastic).
* ``"symmetric"``: homoscedastic Gaussian ξ with the same E ε² (the contrast case).

Why the skewed, heteroscedastic generator. The worst-case χ²/KL weights at θ* are a function
of ``ℓ = ε²`` only, and by Danskin the population robust objective's gradient at θ* is
``E_Q*[−2εz] = −2E[w(ε²)·ε·z]``. If ε is symmetric given the features, ``E[w(ε²)ε | ψ] = 0``:
θ* still minimises the robust objective for every radius and the robust estimator is unbiased
(symmetric homoscedastic noise hides the bias). Skewness alone is not enough in the pair
setting: the difference of two i.i.d. skewed noises is symmetric. With a feature-dependent scale,
``E[ε³ | ψ] = κ₃(s(ψ_a)³ − s(ψ_b)³)`` has the sign of ``z₁``, so ``E[ε³z] ≠ 0``: upweighting the
largest residuals (mostly over-scored responses) tilts θ̂ along e₁ by ``O(sqrt(ρ))``. The
Wasserstein penalty ``2ρ‖θ‖·sqrt(mean ℓ)`` shrinks θ for any noise (bias ``O(ρ)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "GENERATORS",
    "N_REF",
    "SCHEDULES",
    "Generator",
    "radius",
]

GENERATORS = ("skewed", "symmetric")
SCHEDULES = ("erm", "d_over_n", "sqrt_d_over_n", "fixed")
N_REF = 100  # the `fixed` radius is the sqrt_d_over_n radius at n = N_REF, held constant


def radius(schedule: str, constant: float, d: int, n: int) -> float:
    """Radius ρ of a schedule: ``erm`` 0, ``d_over_n`` c·d/n, ``sqrt_d_over_n`` c·sqrt(d/n),
    ``fixed`` c·sqrt(d/N_REF) (independent of n)."""
    if constant < 0 or not math.isfinite(constant):
        raise ValueError(f"radius constant must be finite and >= 0, got {constant}")
    if schedule == "erm":
        return 0.0
    if schedule == "d_over_n":
        return constant * d / n
    if schedule == "sqrt_d_over_n":
        return constant * math.sqrt(d / n)
    if schedule == "fixed":
        return constant * math.sqrt(d / N_REF)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def _beta_raw_moments(a: float, b: float, k: int) -> list[float]:
    """``E B^j`` for j = 0..k of B ~ Beta(a, b): ``Π_{i<j} (a+i)/(a+b+i)``."""
    out = [1.0]
    for i in range(k):
        out.append(out[-1] * (a + i) / (a + b + i))
    return out


def _uniform_affine_moment(lo: float, hi: float, k: int) -> float:
    """``E s^k`` for ``s = lo + (hi − lo)U``, U ~ U(0,1) (Φ(ψ₁) is uniform)."""
    if hi == lo:
        return lo**k
    return (hi ** (k + 1) - lo ** (k + 1)) / ((k + 1) * (hi - lo))


@dataclass(frozen=True)
class Generator:
    """Pair generator of the linear-reward setting (see the module docstring)."""

    d: int = 4
    kind: str = "skewed"
    s_lo: float = 0.05
    s_hi: float = 2.0
    beta_a: float = 0.3
    beta_b: float = 6.0

    def __post_init__(self) -> None:
        if self.kind not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.kind!r}")
        if self.d < 1:
            raise ValueError(f"d must be >= 1, got {self.d}")
        if not 0 <= self.s_lo <= self.s_hi or self.s_hi <= 0:
            raise ValueError("need 0 <= s_lo <= s_hi and s_hi > 0")

    @property
    def theta_star(self) -> torch.Tensor:
        """``θ* = (1, …, 1)/sqrt(d)`` (unit norm)."""
        return torch.full((self.d,), 1.0 / math.sqrt(self.d), dtype=torch.float64)

    def _xi_moments(self) -> tuple[float, float]:
        """``(mean, std)`` of Beta(a, b)."""
        a, b = self.beta_a, self.beta_b
        return a / (a + b), math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))

    def noise_moments(self) -> tuple[float, float]:
        """``(E ε², E ε⁴)`` in closed form: ``E ε² = 2E s²`` (ξ standardised) and
        ``E ε⁴ = 2E[s⁴]E[ξ⁴] + 6(E s²)²`` (odd cross moments vanish). The population objective
        at θ* is ``L(θ*) = E ℓ(θ*) = E ε²``."""
        if self.kind == "symmetric":
            var = 2.0 * _uniform_affine_moment(self.s_lo, self.s_hi, 2)
            return var, 3.0 * var * var
        es2 = _uniform_affine_moment(self.s_lo, self.s_hi, 2)
        es4 = _uniform_affine_moment(self.s_lo, self.s_hi, 4)
        mean, std = self._xi_moments()
        raw = _beta_raw_moments(self.beta_a, self.beta_b, 4)
        central4 = sum(math.comb(4, j) * raw[j] * (-mean) ** (4 - j) for j in range(5))
        return 2.0 * es2, 2.0 * es4 * central4 / std**4 + 6.0 * es2 * es2

    def sample(
        self, seeds: int, n: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z [S,n,d], y [S,n], ε [S,n])`` in float64 for ``seeds`` independent data sets."""
        psi = torch.randn(seeds, n, 2, self.d, generator=gen, dtype=torch.float64)
        if self.kind == "symmetric":
            sd = math.sqrt(self.noise_moments()[0] / 2.0)
            xi = sd * torch.randn(seeds, n, 2, generator=gen, dtype=torch.float64)
        else:
            # Beta(a, b) = Ga/(Ga + Gb); torch._standard_gamma is the gamma sampler that accepts
            # a torch.Generator (torch.distributions.Gamma draws from the global RNG only)
            ga = torch._standard_gamma(
                torch.full((seeds, n, 2), self.beta_a, dtype=torch.float64), generator=gen
            )
            gb = torch._standard_gamma(
                torch.full((seeds, n, 2), self.beta_b, dtype=torch.float64), generator=gen
            )
            mean, std = self._xi_moments()
            phi = 0.5 * (1.0 + torch.erf(psi[..., 0] / math.sqrt(2.0)))
            xi = (self.s_lo + (self.s_hi - self.s_lo) * phi) * (ga / (ga + gb) - mean) / std
        eps = xi[..., 0] - xi[..., 1]
        z = psi[:, :, 0] - psi[:, :, 1]
        return z, z @ self.theta_star + eps, eps

    def describe(self) -> dict[str, object]:
        """JSON-friendly description (kind, parameters, population moments)."""
        m2, m4 = self.noise_moments()
        return {
            "kind": self.kind,
            "d": self.d,
            "s_lo": self.s_lo,
            "s_hi": self.s_hi,
            "beta": [self.beta_a, self.beta_b],
            "theta_star": self.theta_star.tolist(),
            "population_objective": m2,
            "noise_fourth_moment": m4,
        }
