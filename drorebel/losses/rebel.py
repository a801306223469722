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

import math

import torch

from drorebel.distributed import data_parallel_info, gather_rows, local_slice
from drorebel.losses.dro import (
    check_groups,
    check_hyperparameter,
    check_losses,
    dro_solve,
    group_first,
    group_means,
    sync_free,
    validate_dro_args,
)
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

    Computed in float32, or entirely in float64 when ANY of the six inputs is float64 (float64
    rewards with float32 log-probs included); differentiable in the policy log-probs. No value
    check (see :func:`rebel_loss`'s ``validate``).
    """
    eta = check_hyperparameter("eta", eta, positive=True, finite=True)
    args = (policy_logps_a, policy_logps_b, ref_logps_a, ref_logps_b, rewards_a, rewards_b)
    dtype = _pair_dtype(*args)
    margin = _implicit_margin(policy_logps_a, policy_logps_b, ref_logps_a, ref_logps_b, eta, dtype)
    return margin - (rewards_a.to(dtype) - rewards_b.to(dtype))


def _pair_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (bf16/fp16 inputs are widened)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _implicit_margin(
    pa: torch.Tensor, pb: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor, eta: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``((π_a − ref_a) − (π_b − ref_b))/η`` in ``dtype`` (``eta`` already checked)."""
    pa, pb, ra, rb = (t.to(dtype) for t in (pa, pb, ra, rb))
    return ((pa - ra) - (pb - rb)) / eta


def _check_pairs(tensors: dict[str, torch.Tensor]) -> int:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got {t.dtype}")
    first = tensors["policy_logps_a"]
    shape = first.shape
    if len(shape) != 1 or shape[0] == 0:
        raise ValueError(f"policy_logps_a must be 1-D [n] with n >= 1, got shape {tuple(shape)}")
    for name, t in tensors.items():
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but policy_logps_a is on {first.device}")
    return shape[0]


_CHECKED = ("policy_logps_a", "policy_logps_b", "ref_logps_a", "ref_logps_b", "rewards_a",
            "rewards_b")


def _bad_codes(
    tensors: dict[str, torch.Tensor], resid: torch.Tensor, eta: float, n_total: int, world: int,
) -> torch.Tensor:
    """Per pair: 0 when fine, ``k + 1`` when the k-th input of :data:`_CHECKED` is not finite,
    ``len(_CHECKED) + 1`` when the residual is too large: ``Δ²·N`` (N = pairs in the weighted
    batch) overflows the working dtype, or the gradient ``world·2Δ/η`` of the pair's loss with
    respect to its log-probs exceeds ``sqrt(max)`` of the working dtype (headroom for the
    backward through an LM head, which multiplies it by the head and the hidden states) or the
    largest value of the policy log-probs' dtype. The lowest code wins. No host
    synchronisation."""
    dtype = resid.dtype
    limit = torch.finfo(dtype).max
    grad_limit = min([math.sqrt(limit)] + [torch.finfo(tensors[k].dtype).max for k in
                                           _CHECKED[:2] if tensors[k].is_floating_point()])
    r = resid.detach().abs().to(torch.float64)
    # "not (x <= limit)": NaN and inf are flagged too
    too_big = ~(r * r * float(n_total) <= limit) | ~(r * (2.0 * world) / eta <= grad_limit)
    code = torch.where(too_big, float(len(_CHECKED) + 1), 0.0)
    for k in reversed(range(len(_CHECKED))):
        code = torch.where(torch.isfinite(tensors[_CHECKED[k]].detach()), code, float(k + 1))
    return code


def _raise_bad(code: torch.Tensor, resid: torch.Tensor, n: int, world: int, eta: float,
               dtype: torch.dtype) -> None:
    """ONE host synchronisation: a ``ValueError`` for the first check (in the order of
    :data:`_CHECKED`, then the residual) that flags a pair, naming its first flagged row. The
    codes are the gathered ones: every rank raises the same error, none waits in a collective."""
    fine = float(len(_CHECKED) + 2)
    c = torch.where(code > 0, code, fine)
    bad = c.min()
    first = torch.argmax((c == bad).to(torch.int32))
    bad, row = (int(v) for v in torch.stack([bad, first.to(c.dtype)]).tolist())
    if bad == fine:
        return
    where = f"row {row % n}" + (f" of rank {row // n}" if world > 1 else "")
    if bad <= len(_CHECKED):
        raise ValueError(f"{_CHECKED[bad - 1]} {where} is not finite (NaN or inf)")
    name = str(dtype).removeprefix("torch.")
    raise ValueError(f"pair {where} has a REBEL residual Δ = {resid[row].item():.4g} that {name} "
                     f"cannot hold: Δ²·n overflows or the gradient 2Δ/η (eta={eta:g}) exceeds "
                     "sqrt(max); rescale the rewards, raise eta or pass float64 inputs")


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
    validate: bool = True,
    groups: torch.Tensor | None = None,
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

    ``groups`` (optional ``[n]`` integer ids, gathered with the statistics under data
    parallelism): group-level DRO, beyond the paper — the χ²/KL ball is over the groups'
    distribution around their empirical shares, ``L = sup_{D(q‖π) ≤ ρ} Σ_g q_g·mean_{i∈g} Δ_i²``
    and each pair of group g has weight ``q_g/n_g`` (:func:`drorebel.losses.dro.dro_solve`);
    adds the metrics ``dro/num_groups`` and ``dro/worst_group_loss``.

    Precision: the residuals are computed in float64 when any input is float64, else in
    float32 (bf16/fp16 inputs are widened); the loss, the weights and the gradients are of that
    dtype. Rewards around 1e20 (or log-ratios divided by a tiny ``eta``) make ``Δ²`` overflow
    float32: with ``validate=True`` that is a ``ValueError`` naming the pair and advising float64
    inputs or rescaled rewards, never a silent NaN/inf. (A float32 loss cannot hold ``Δ²`` of
    1e40 whatever precision ``Δ`` was computed in, so float32 inputs are not silently widened.)

    ``validate=True`` (default): the six inputs must be finite, and each residual small enough
    that ``Δ²·N`` (N pairs in the weighted batch) is finite and the gradient ``2Δ/η`` of a
    pair's loss stays below ``sqrt(max)`` of the working dtype (~1.8e19 in float32: headroom for
    the backward through an LM head, which multiplies it by the head and the hidden states); a
    ``ValueError`` names the argument (or ``pair``) and the first bad row. All value checks cost
    ONE host synchronisation (none under ``torch.compile``/``torch.vmap``).
    ``validate=False`` skips them for code that must not synchronise: a NaN/inf input then
    gives a NaN/inf loss. Hyper-parameters are Python numbers; a bool ``eta``/``rho``/``tau``
    is refused.

    Returns:
        ``LossOutput`` with ``loss``, ``weights`` (this rank's slice of the detached weights) and
        detached global ``metrics``: ``dro/robust_objective``, ``rebel/loss_mean``,
        ``rebel/residual_mean``, ``rebel/residual_abs_max``, ``dro/ess`` (``1/Σp²``),
        ``dro/weight_max``, ``dro/eta_star`` (χ²) or ``dro/tau_star`` (KL), ``logps/a``,
        ``logps/b``, ``rewards/margins`` (mean implicit margin
        ``((π_a − ref_a) − (π_b − ref_b))/η``) and ``rewards/accuracies`` (fraction of pairs whose
        implicit margin has the sign of ``r_a − r_b``).
    """
    tensors = {
        "policy_logps_a": policy_logps_a,
        "policy_logps_b": policy_logps_b,
        "ref_logps_a": ref_logps_a,
        "ref_logps_b": ref_logps_b,
        "rewards_a": rewards_a,
        "rewards_b": rewards_b,
    }
    n = _check_pairs(tensors)
    check_groups(groups, n)
    rho, tau = validate_dro_args(divergence, rho, tau)
    eta = check_hyperparameter("eta", eta, positive=True, finite=True)
    resid = rebel_residuals(
        policy_logps_a, policy_logps_b, ref_logps_a, ref_logps_b, rewards_a, rewards_b, eta
    )
    loss = resid * resid
    check_losses(loss)
    world, _ = data_parallel_info(group, global_batch)
    check = validate and not sync_free(resid)
    reward_diff = (rewards_a - rewards_b).to(loss.dtype)
    margin = _implicit_margin(
        policy_logps_a.detach(), policy_logps_b.detach(), ref_logps_a, ref_logps_b, eta,
        loss.dtype,
    )
    stats = _pair_stats(loss, resid, policy_logps_a, policy_logps_b, margin, reward_diff)
    if check:  # the codes travel with the statistics: every rank sees every rank's bad pairs
        code = _bad_codes(tensors, resid, eta, n * world, world)
        stats = torch.cat([stats, code.to(stats.dtype).unsqueeze(1)], dim=1)
    if world > 1:
        stats = gather_rows(stats, group)
    if check:
        _raise_bad(stats[:, -1], stats[:, 1], n, world, eta, loss.dtype)
        stats = stats[:, :-1]
    if groups is not None and world > 1:
        groups = gather_rows(groups.to(torch.int64), group)
    # group level: the per-pair problem on the broadcast group means (dro.py docstring)
    means = None if groups is None else group_means(stats[:, 0], groups)
    p, dual = dro_solve(stats[:, 0] if means is None else means, divergence, rho, tau,
                        validate=False)  # checked above
    p, dual = p.to(loss.dtype), dual.to(loss.dtype)
    p_local = local_slice(p, n, group) if world > 1 else p
    total = (p_local * loss).sum()
    if world > 1:
        total = world * total
    metrics = _metrics(stats, p, dual, divergence)
    if means is not None:
        first = group_first(groups)
        metrics["dro/num_groups"] = (first == torch.arange(first.shape[0], device=first.device)
                                     ).sum().to(loss.dtype)
        metrics["dro/worst_group_loss"] = means.max().to(loss.dtype)
    return LossOutput(loss=total, metrics=metrics, weights=p_local)
