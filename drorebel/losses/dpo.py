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

from drorebel import distributed as _dp
from drorebel.losses.dro import check_hyperparameter, raise_first_bad, sync_free
from drorebel.losses.output import LossOutput
from drorebel.ops.autograd_utils import per_sample_grad_sq_norms

__all__ = ["dpo_losses", "dpo_loss", "order_by_reward", "trl_metrics", "kldpo_loss", "wdpo_loss",
           "KLDPO_WEIGHT_CLAMP"]

KLDPO_WEIGHT_CLAMP = 10.0
_NAMES = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


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
    beta = check_hyperparameter("beta", beta, positive=True, finite=True)
    args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    for name, t in zip(_NAMES, args):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got {t.dtype}")
    shape = chosen_logps.shape
    if len(shape) != 1 or shape[0] == 0:
        raise ValueError(f"chosen_logps must be 1-D [n] with n >= 1, got shape {tuple(shape)}")
    for name, t in zip(_NAMES, args):
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.device != chosen_logps.device:
            raise ValueError(f"{name} is on {t.device} but chosen_logps is on "
                             f"{chosen_logps.device}")
    dtype = _wide(*args)
    pc, pr, rc, rr = (t.to(dtype) for t in args)
    reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
    return -F.logsigmoid(reward_c - reward_r), reward_c, reward_r


def trl_metrics(
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


def order_by_reward(
    logps_a: torch.Tensor,
    logps_b: torch.Tensor,
    ref_logps_a: torch.Tensor,
    ref_logps_b: torch.Tensor,
    rewards_a: torch.Tensor,
    rewards_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn reward-scored pairs into DPO's ``(chosen, rejected)`` roles.

    The chosen response of pair i is ``a_i`` when ``r_a,i > r_b,i`` and ``b_i`` otherwise.
    Returns ``(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, untied)``
    with ``untied = r_a ≠ r_b``: a tied pair states no preference and should carry no loss
    (pass ``untied`` as :func:`dpo_loss`'s ``mask``).
    """
    a_wins = rewards_a > rewards_b

    def pick(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.where(a_wins, x, y), torch.where(a_wins, y, x)

    (pc, pr), (rc, rr) = pick(logps_a, logps_b), pick(ref_logps_a, ref_logps_b)
    return pc, pr, rc, rr, rewards_a != rewards_b


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    mask: torch.Tensor | None = None,
    group: object | None = None,
    global_batch: bool = True,
    validate: bool = True,
) -> LossOutput:
    """Sigmoid DPO ``L = Σ_i m_i ℓ_i / Σ_i m_i`` with
    ``ℓ_i = −log σ(β[(π_c − ref_c) − (π_r − ref_r)])`` (arXiv 2305.18290, eq. 7).

    ``mask`` (bool ``[n]``, default all true) drops pairs from the loss and the metrics, e.g.
    the ties of :func:`order_by_reward`; with every pair masked the loss is 0 with zero
    gradient. Data parallel (``torch.distributed`` initialised, ``global_batch=True``): the
    sums run over the *global* batch and this rank returns ``world·Σ_{i local} m_i ℓ_i /
    Σ_{i global} m_i``, so that DDP's gradient averaging gives the exact single-process
    gradient (one all-reduce of detached counts and metric sums; docs/design.md §1, data
    parallel). ``global_batch=False``: local sums only.

    Returns a ``LossOutput`` with ``weights`` ``m_i / Σ m`` (this rank's slice) and global
    metrics over the unmasked pairs, TRL's names: ``rewards/{chosen,rejected,margins,
    accuracies}`` (implicit rewards ``β(π − ref)``), ``logps/{chosen,rejected}``, plus
    ``dpo/loss`` and, when ``mask`` is given, ``dpo/tie_fraction`` (masked share).

    ``validate=True`` (default): the four inputs must be finite, the implicit rewards small
    enough that their sums over the batch (the metrics) are finite (a huge ``beta`` times a
    log-ratio overflows), and ``ℓ_i`` finite on the pairs kept by ``mask``; a ``ValueError``
    names the argument and the first bad row, at the cost of ONE host synchronisation (none
    under ``torch.compile``/``torch.vmap``; under data parallelism the flags ride with the
    all-reduce of the metric sums, so every rank raises and none waits in a collective).
    ``validate=False`` skips the value checks for code that must not synchronise. ``beta`` is a
    finite Python number > 0 (a bool is refused).
    """
    ell, reward_c, reward_r = dpo_losses(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    if mask is None:
        keep = torch.ones_like(ell, dtype=torch.bool)
    elif tuple(mask.shape) != tuple(ell.shape) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(ell.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    else:
        if mask.device != ell.device:
            raise ValueError(f"mask is on {mask.device} but the log-probs are on {ell.device}")
        keep = mask
    world, _ = _dp.data_parallel_info(group, global_batch)
    checks = []
    if validate and not sync_free(ell):
        checks = _checks(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                         keep, reward_c, reward_r, ell, beta, world)
        if world == 1:
            raise_first_bad(checks)  # the one host sync
    m = keep.to(ell.dtype)
    ell = torch.where(keep, ell, torch.zeros_like(ell))
    rc, rr = reward_c.detach(), reward_r.detach()
    rows = [torch.ones_like(m), m, ell.detach(), m * rc, m * rr, m * (rc > rr).to(m.dtype),
            m * chosen_logps.detach().to(m.dtype), m * rejected_logps.detach().to(m.dtype)]
    sums = torch.stack(rows).sum(1)
    if world > 1:
        if checks:  # the flag counts ride with the sums: every rank learns of every bad pair
            local = torch.stack([bad.sum() for _, bad, _ in checks]).to(sums.dtype)
            sums = _dp.all_reduce_sum(torch.cat([sums, local]), group)
            _raise_data_parallel(checks, local, sums[len(rows):])
            sums = sums[:len(rows)]
        else:
            sums = _dp.all_reduce_sum(sums, group)
    n = sums[1].clamp_min(1.0)
    loss = world * ell.sum() / n
    names = ("dpo/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
             "logps/chosen", "logps/rejected")
    metrics = {k: sums[i] / n for k, i in zip(names, (2, 3, 4, 5, 6, 7))}
    metrics["rewards/margins"] = (sums[3] - sums[4]) / n
    if mask is not None:
        metrics["dpo/tie_fraction"] = 1.0 - sums[1] / sums[0]
    return LossOutput(loss=loss, metrics=metrics, weights=(m / n).detach())


def _checks(
    pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, keep: torch.Tensor,
    reward_c: torch.Tensor, reward_r: torch.Tensor, ell: torch.Tensor, beta: float, world: int,
) -> list[tuple[str, torch.Tensor, object]]:
    """:func:`dpo_loss`'s value checks (``raise_first_bad`` form, no sync here): the inputs
    finite; every implicit reward small enough that the sums over all ranks' pairs (the
    metrics) stay finite; ``ℓ`` finite on the kept pairs."""
    def not_finite(t: torch.Tensor):
        return lambda row: f"is not finite ({t.reshape(-1)[row].item()})"

    checks = [(name, ~torch.isfinite(t.detach()), not_finite(t))
              for name, t in zip(_NAMES, (pc, pr, rc, rr))]
    dtype = str(ell.dtype).removeprefix("torch.")
    limit = torch.finfo(ell.dtype).max
    overflow = (f"overflows {dtype}: beta={beta:g} times the log-ratio is too large; lower beta "
                "or pass float64 inputs")
    for name, t in (("implicit reward beta*(chosen_logps - ref_chosen_logps)", reward_c),
                    ("implicit reward beta*(rejected_logps - ref_rejected_logps)", reward_r)):
        # "not (x <= limit)": NaN and inf are flagged too
        checks.append((name, ~(t.detach().abs().to(torch.float64) * (t.shape[0] * world)
                                <= limit), overflow))
    checks.append(("DPO loss -log sigmoid(margin)", keep & ~torch.isfinite(ell.detach()),
                   overflow))
    return checks


def _raise_data_parallel(checks: list, local: torch.Tensor, total: torch.Tensor) -> None:
    """After the all-reduce of the flag counts, ONE host sync: every rank raises for the first
    check that flags a pair on any rank (naming the row where it is local)."""
    values = torch.cat([local, total]).tolist()
    k = len(checks)
    for i, (name, bad, what) in enumerate(checks):
        if values[k + i] > 0:
            if values[i] > 0:
                rank = _dp.data_parallel_info()[1]
                row = int(bad.reshape(-1).nonzero()[0, 0])
                text = what(row) if callable(what) else what
                raise ValueError(f"{name} row {row} of rank {rank} {text}")
            raise ValueError(f"{name}: {int(values[k + i])} pair(s) on another rank are bad "
                             "(not finite or overflowing); that rank's error names the row")


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
    tau = check_hyperparameter("tau", tau, positive=True)
    ell, reward_c, reward_r = dpo_losses(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    d = ell.detach()
    p = torch.clamp(torch.exp((d - d.mean()) / tau), max=KLDPO_WEIGHT_CLAMP)
    loss = (p * ell).mean()
    metrics = trl_metrics(reward_c, reward_r, chosen_logps, rejected_logps)
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
    rho = check_hyperparameter("rho", rho, finite=True)
    ell, reward_c, reward_r = dpo_losses(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    sq = per_sample_grad_sq_norms(ell, z)
    penalty = rho * sq.mean()
    loss = ell.mean() + penalty
    metrics = trl_metrics(reward_c, reward_r, chosen_logps, rejected_logps)
    metrics.update(
        {
            "dpo/loss": ell.detach().mean(),
            "wdpo/penalty": penalty.detach(),
            "wdpo/grad_sq_norm_mean": sq.detach().mean(),
        }
    )
    weights = torch.full_like(ell, 1.0 / ell.shape[0]).detach()
    return LossOutput(loss=loss, metrics=metrics, weights=weights)
