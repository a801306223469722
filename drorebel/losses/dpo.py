"""Baseline preference losses on per-sequence log-probs: DPO, KLDPO and WDPO.

* DPO (Rafailov et al., arXiv 2305.18290), sigmoid form with the implicit rewards
  ``r_c = β(log π_θ(c) − log π_ref(c))``, ``r_r = β(log π_θ(r) − log π_ref(r))``:
  ``ℓ_i = −log σ(r_c,i − r_r,i)``, ``L = mean ℓ``.
* KLDPO (Xu et al. 2025, "Distributionally robust direct preference optimization", arXiv
  2502.01930): ``p_i = min(exp((ℓ_i − mean ℓ)/τ), 10)`` detached, ``L = mean(p·ℓ)``.
* WDPO (same paper): ``L = mean_i(ℓ_i + ρ‖∇_z ℓ_i‖²)`` with full second-order autograd.

Metric names follow TRL's DPOTrainer (``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from drorebel.losses.output import LossOutput
from drorebel.reference.wasserstein import per_sample_grad_sq_norms

__all__ = ["dpo_losses", "dpo_loss", "kldpo_loss", "wdpo_loss", "KLDPO_WEIGHT_CLAMP"]

KLDPO_WEIGHT_CLAMP = 10.0


def _wide(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def dpo_losses(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO losses and implicit rewards (arXiv 2305.18290, eq. 7).

    Returns ``(ℓ, r_c, r_r)`` with ``r_c = β(π_c − ref_c)``, ``r_r = β(π_r − ref_r)`` and
    ``ℓ = −log σ(r_c − r_r)`` (computed with ``logsigmoid``: no overflow), all ``[n]`` float32
    (float64 for float64 input).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shape = chosen_logps.shape
    if len(shape) != 1 or shape[0] == 0:
        raise ValueError(f"chosen_logps must be 1-D [n] with n >= 1, got shape {tuple(shape)}")
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    for name, t in zip(names, args):
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    dtype = _wide(*args)
    pc, pr, rc, rr = (t.to(dtype) for t in args)
    reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
    return -F.logsigmoid(reward_c - reward_r), reward_c, reward_r


def _trl_metrics(
    reward_c: torch.Tensor, reward_r: torch.Tensor, pc: torch.Tensor, pr: torch.Tensor
) -> dict[str, torch.Tensor]:
    rc, rr = reward_c.detach(), reward_r.detach()
    return {
        "rewards/chosen": rc.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margins": (rc - rr).mean(),
        "rewards/accuracies": (rc > rr).to(rc.dtype).mean(),
        "logps/chosen": pc.detach().to(rc.dtype).mean(),
        "logps/rejected": pr.detach().to(rc.dtype).mean(),
    }


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> LossOutput:
    """Sigmoid DPO ``L = mean_i −log σ(β[(π_c − ref_c) − (π_r − ref_r)])`` (arXiv 2305.18290).

    Returns a ``LossOutput`` with uniform ``weights`` (1/n) and TRL metrics plus ``dpo/loss``.
    """
    ell, reward_c, reward_r = dpo_losses(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    loss = ell.mean()
    metrics = _trl_metrics(reward_c, reward_r, chosen_logps, rejected_logps)
    metrics["dpo/loss"] = loss.detach()
    weights = torch.full_like(ell, 1.0 / ell.shape[0]).detach()
    return LossOutput(loss=loss, metrics=metrics, weights=weights)


def kldpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    tau: float,
) -> LossOutput:
    """KLDPO (Xu et al. 2025, arXiv 2502.01930): ``L = mean_i p_i·ℓ_i`` with detached
    ``p_i = min(exp((ℓ_i − mean ℓ)/τ), 10)`` and ``ℓ_i`` the sigmoid DPO losses.

    ``weights`` holds the effective per-pair weights ``p_i/n`` of the loss (they need not sum to
    one: KLDPO does not normalise); metrics add ``dro/weight_max`` (max ``p_i``), ``dro/ess``
    (``(Σp)²/Σp²``) and ``dpo/loss`` (the unweighted mean).
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    ell, reward_c, reward_r = dpo_losses(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    d = ell.detach()
    p = torch.clamp(torch.exp((d - d.mean()) / tau), max=KLDPO_WEIGHT_CLAMP)
    loss = (p * ell).mean()
    metrics = _trl_metrics(reward_c, reward_r, chosen_logps, rejected_logps)
    metrics.update(
        {
            "dpo/loss": d.mean(),
            "dro/robust_objective": loss.detach(),
            "dro/weight_max": p.max(),
            "dro/ess": p.sum() ** 2 / (p * p).sum(),
        }
    )
    return LossOutput(loss=loss, metrics=metrics, weights=p / p.shape[0])


def wdpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    rho: float,
    z: torch.Tensor | Sequence[torch.Tensor],
) -> LossOutput:
    """WDPO (Xu et al. 2025, arXiv 2502.01930): ``L = mean_i (ℓ_i + ρ‖∇_z ℓ_i‖²)``.

    ``ℓ_i`` is the sigmoid DPO loss; ``z`` (a tensor or a sequence of tensors, leading dim = pair
    index, row i used by pair i only) is the perturbed input the policy log-probs were computed
    from. The penalty is differentiated with full second-order autograd. Metrics add
    ``wdpo/penalty`` (mean ``ρ‖∇ℓ‖²``), ``wdpo/grad_sq_norm_mean`` and ``dpo/loss``.
    """
    if not rho >= 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    ell, reward_c, reward_r = dpo_losses(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    sq = per_sample_grad_sq_norms(ell, z)
    penalty = rho * sq.mean()
    loss = ell.mean() + penalty
    metrics = _trl_metrics(reward_c, reward_r, chosen_logps, rejected_logps)
    metrics.update(
        {
            "dpo/loss": ell.detach().mean(),
            "wdpo/penalty": penalty.detach(),
            "wdpo/grad_sq_norm_mean": sq.detach().mean(),
        }
    )
    weights = torch.full_like(ell, 1.0 / ell.shape[0]).detach()
    return LossOutput(loss=loss, metrics=metrics, weights=weights)
