"""REBEL and χ²/KL DRO-REBEL losses on per-sequence log-probs (pure PyTorch).

REBEL (Gao et al., arXiv 2404.16767) regresses the relative reward of two responses on the
difference of their policy/reference log-ratios; DRO-REBEL (Sahu & Wells, arXiv 2509.19104)
replaces the mean of the squared residuals by the worst case over a χ² or KL ball:

    Δ_i = (1/η)·[(log π_θ(a_i) − log π_ref(a_i)) − (log π_θ(b_i) − log π_ref(b_i))]
          − (r_a,i − r_b,i)
    ℓ_i = Δ_i²,   L = Σ_i p_i.detach()·ℓ_i

with ``p`` uniform (REBEL) or the dual weights of :mod:`drorebel.losses.dro`.
"""

from __future__ import annotations

import torch

from drorebel.distributed import data_parallel_info, gather_rows, local_slice
from drorebel.losses.dro import check_losses, dro_solve, validate_dro_args
from drorebel.losses.output import LossOutput

__all__ = ["rebel_residuals", "rebel_loss"]


def rebel_residuals(
    policy_logps_a: torch.Tensor,
    policy_logps_b: torch.Tensor,
    ref_logps_a: torch.Tensor,
    ref_logps_b: torch.Tensor,
    rewards_a: torch.Tensor,
    rewards_b: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """REBEL residuals (arXiv 2404.16767, eq. for the least-squares REBEL update):

    ``Δ_i = (1/η)·[(π_a − ref_a) − (π_b − ref_b)] − (r_a − r_b)`` where ``π``/``ref`` are
    per-sequence log-probs of the policy and the reference (the sampling policy π_t).

    Computed in float32 (float64 when any input is float64); differentiable in the policy log-probs.
    """
    margin = _implicit_margin(policy_logps_a, policy_logps_b, ref_logps_a, ref_logps_b, eta)
    wide = torch.float64 in (rewards_a.dtype, rewards_b.dtype)
    dtype = torch.float64 if wide else margin.dtype
    return margin.to(dtype) - (rewards_a.to(dtype) - rewards_b.to(dtype))


def _implicit_margin(
    pa: torch.Tensor, pb: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor, eta: float
) -> torch.Tensor:
    """``((π_a − ref_a) − (π_b − ref_b))/η`` in float32 (float64 if any input is float64)."""
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    args = (pa, pb, ra, rb)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in args) else torch.float32
    pa, pb, ra, rb = (t.to(dtype) for t in args)
    return ((pa - ra) - (pb - rb)) / eta


def _check_pairs(tensors: dict[str, torch.Tensor]) -> int:
    shape = tensors["policy_logps_a"].shape
    if len(shape) != 1 or shape[0] == 0:
        raise ValueError(f"policy_logps_a must be 1-D [n] with n >= 1, got shape {tuple(shape)}")
    for name, t in tensors.items():
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return shape[0]


def _pair_stats(
    loss: torch.Tensor,
    resid: torch.Tensor,
    pa: torch.Tensor,
    pb: torch.Tensor,
    margin: torch.Tensor,
    reward_diff: torch.Tensor,
) -> torch.Tensor:
    """Detached ``[n, 6]`` per-pair statistics gathered once across ranks."""
    correct = (torch.sign(margin) == torch.sign(reward_diff)).to(loss.dtype)
    cols = (loss, resid, pa.to(loss.dtype), pb.to(loss.dtype), margin, correct)
    return torch.stack([c.detach() for c in cols], dim=1)


def _metrics(
    stats: torch.Tensor, p: torch.Tensor, dual: torch.Tensor, divergence: str
) -> dict[str, torch.Tensor]:
    """Global metrics from the gathered ``[N, 6]`` statistics and the global weights."""
    loss, resid, pa, pb, margin, correct = stats.unbind(1)
    metrics = {
        "dro/robust_objective": (p * loss).sum(),
        "rebel/loss_mean": loss.mean(),
        "rebel/residual_mean": resid.mean(),
        "rebel/residual_abs_max": resid.abs().max(),
        "dro/ess": 1.0 / (p * p).sum(),
        "dro/weight_max": p.max(),
        "logps/a": pa.mean(),
        "logps/b": pb.mean(),
        "rewards/margins": margin.mean(),
        "rewards/accuracies": correct.mean(),
    }
    if divergence == "chi2":
        metrics["dro/eta_star"] = dual
    elif divergence == "kl":
        metrics["dro/tau_star"] = dual
    return metrics


def rebel_loss(
    policy_logps_a: torch.Tensor,
    policy_logps_b: torch.Tensor,
    ref_logps_a: torch.Tensor,
    ref_logps_b: torch.Tensor,
    rewards_a: torch.Tensor,
    rewards_b: torch.Tensor,
    *,
    eta: float,
    divergence: str = "none",
    rho: float | None = None,
    tau: float | None = None,
    group: object | None = None,
    global_batch: bool = True,
) -> LossOutput:
    """REBEL / χ²-REBEL / KL-REBEL loss ``L = Σ_i p_i.detach()·Δ_i²`` (arXiv 2509.19104).

    ``Δ_i`` is :func:`rebel_residuals`; ``p`` is uniform for ``divergence="none"`` (REBEL,
    arXiv 2404.16767, ``L = mean Δ²``) or the worst-case weights of the χ² ball (``rho``) or KL
    ball (``rho``) / fixed KL temperature (``tau``) from :func:`drorebel.losses.dro.dro_solve`.
    The value equals the robust objective; the gradient is Danskin's ``Σ p_i ∇ℓ_i``.

    Data parallel (``torch.distributed`` initialised, more than one rank in ``group``,
    ``global_batch=True``): the per-pair statistics are all-gathered (detached; local batch sizes
    must be equal), the weights cover the global batch, and ``loss = world·Σ_{i local} p_i ℓ_i`` so
    that DDP's gradient averaging yields the exact single-process gradient on the union batch.
    ``global_batch=False`` gives per-rank weights. Under gradient accumulation the weights cover
    one micro-batch (one call).

    Returns:
        ``LossOutput`` with ``loss``, ``weights`` (this rank's slice of the detached weights) and
        detached global ``metrics``: ``dro/robust_objective``, ``rebel/loss_mean``,
        ``rebel/residual_mean``, ``rebel/residual_abs_max``, ``dro/ess`` (``1/Σp²``),
        ``dro/weight_max``, ``dro/eta_star`` (χ²) or ``dro/tau_star`` (KL), ``logps/a``,
        ``logps/b``, ``rewards/margins`` (mean implicit margin
        ``((π_a − ref_a) − (π_b − ref_b))/η``) and ``rewards/accuracies`` (fraction of pairs whose
        implicit margin has the sign of ``r_a − r_b``).
    """
    n = _check_pairs(
        {
            "policy_logps_a": policy_logps_a,
            "policy_logps_b": policy_logps_b,
            "ref_logps_a": ref_logps_a,
            "ref_logps_b": ref_logps_b,
            "rewards_a": rewards_a,
            "rewards_b": rewards_b,
        }
    )
    validate_dro_args(divergence, rho, tau)
    resid = rebel_residuals(
        policy_logps_a, policy_logps_b, ref_logps_a, ref_logps_b, rewards_a, rewards_b, eta
    )
    loss = resid * resid
    check_losses(loss)
    reward_diff = (rewards_a - rewards_b).to(loss.dtype)
    margin = _implicit_margin(
        policy_logps_a.detach(), policy_logps_b.detach(), ref_logps_a, ref_logps_b, eta
    ).to(loss.dtype)
    stats = _pair_stats(loss, resid, policy_logps_a, policy_logps_b, margin, reward_diff)
    world, _ = data_parallel_info(group, global_batch)
    if world > 1:
        stats = gather_rows(stats, group)
    p, dual = dro_solve(stats[:, 0], divergence, rho, tau)
    p_local = local_slice(p, n, group) if world > 1 else p
    total = (p_local * loss).sum()
    if world > 1:
        total = world * total
    metrics = _metrics(stats, p, dual, divergence)
    return LossOutput(loss=total, metrics=metrics, weights=p_local)
