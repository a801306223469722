"""Wasserstein DRO-REBEL with the fused hidden-state penalty, and the fused WDPO baseline.

First-order dual of the type-2 Wasserstein ball of radius ρ (DRO-REBEL, arXiv 2509.19104;
docs/design.md §1):

    L_W = (1/n) Σ_i ℓ_i + ρ · sqrt( (1/n) Σ_i ‖∇_z ℓ_i‖² ),   ℓ_i = Δ_i²  (REBEL residual)

With z = the final hidden states (default, fused) the per-pair gradient norm is closed-form,

    ‖∇_h ℓ_i‖² = (2Δ_i/(ηT))² · S_i,   S_i = Σ_{t∈a_i∪b_i} ‖W[y_t] − E_{p_t}[W]‖²,

and ``S_i`` comes from :func:`drorebel.ops.linear_wgrad.linear_logps_wgrad` in the same
vocabulary pass as the log-probs; the second-order terms (Δ_i and S_i both depend on θ) are exact
autograd through that op. With z = input token embeddings (the authors' choice) the penalty is a
double backward through the model (:mod:`drorebel.losses.wasserstein_embeddings`).
:func:`fused_linear_wdpo_loss` is the WDPO baseline (Xu et al. 2025) on the same fused pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from drorebel.distributed import data_parallel_info, dp_global_sum
from drorebel.losses.dpo import dpo_losses, trl_metrics
from drorebel.losses.fused_common import legacy_pair_order, token_counts
from drorebel.losses.output import LossOutput
from drorebel.losses.rebel import rebel_loss, rebel_residuals
from drorebel.ops._autocast import call_head_under_autocast
from drorebel.ops.autograd_utils import safe_sqrt
from drorebel.ops.linear_wgrad import linear_logps_wgrad
from drorebel.ops.sequence import sequence_logps

__all__ = ["fused_linear_wasserstein_rebel_loss", "wasserstein_combine", "check_rho",
           "wasserstein_rebel_from_sums", "sequence_logps_and_grad_sums", "fused_linear_wdpo_loss"]


def check_rho(rho: float) -> None:
    if not rho >= 0:
        raise ValueError(f"rho must be >= 0, got {rho}")


def wasserstein_combine(
    logps_a: Tensor, logps_b: Tensor, sq_norms: Tensor | None, ref_logps_a: Tensor,
    ref_logps_b: Tensor, rewards_a: Tensor, rewards_b: Tensor, *, eta: float, rho: float,
    group: object | None = None, global_batch: bool = True, validate: bool = True,
) -> LossOutput:
    """``L_W = mean ℓ + ρ sqrt(mean sq_norms)`` over the global batch, with REBEL metrics.

    ``sq_norms[i] = ‖∇_z ℓ_i‖²`` (differentiable). Data parallel: both means use
    :func:`dp_global_sum`, so the value is global on every rank and DDP-averaged gradients are
    exact. Metrics: those of :func:`rebel_loss` plus ``wasserstein/penalty``,
    ``wasserstein/grad_norm_rms`` (``sqrt(mean ‖∇_z ℓ_i‖²)``); ``dro/robust_objective`` is L_W.
    """
    check_rho(rho)
    base = rebel_loss(logps_a, logps_b, ref_logps_a, ref_logps_b, rewards_a, rewards_b, eta=eta,
                      group=group, global_batch=global_batch, validate=validate)
    resid = rebel_residuals(logps_a, logps_b, ref_logps_a, ref_logps_b, rewards_a, rewards_b, eta)
    loss = resid * resid
    world, _ = data_parallel_info(group, global_batch)
    n_global = world * loss.shape[0]
    total_l = dp_global_sum(loss.sum(), group) if world > 1 else loss.sum()
    rms = loss.new_zeros(())
    if sq_norms is not None:
        sq = sq_norms.to(loss.dtype).sum()
        rms = safe_sqrt((dp_global_sum(sq, group) if world > 1 else sq) / n_global)
    penalty = rho * rms
    value = total_l / n_global + penalty
    metrics = dict(base.metrics)
    metrics["dro/robust_objective"] = value.detach()
    metrics["wasserstein/penalty"] = penalty.detach()
    metrics["wasserstein/grad_norm_rms"] = rms.detach()
    return LossOutput(loss=value, metrics=metrics, weights=base.weights,
                      policy_logps_a=logps_a, policy_logps_b=logps_b)


def _wgrad_tokens(hidden: Tensor, weight: Tensor, labels: Tensor, **kw) -> tuple[Tensor, Tensor]:
    """``linear_logps_wgrad``; under ``torch.autocast`` the head runs in the autocast dtype
    (as ``F.linear`` would) with autocast off inside (:func:`call_head_under_autocast`)."""
    return call_head_under_autocast(linear_logps_wgrad, hidden=hidden, weight=weight,
                                    labels=labels, **kw)


def sequence_logps_and_grad_sums(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, temperature: float = 1.0,
    ignore_index: int = -100, impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Per sequence ``(log π(y|x), S)`` with ``S = Σ_t ‖W[y_t] − E_{p_t}[W]‖²`` from ONE fused
    :func:`linear_logps_wgrad` call (``hidden [B, T, H]``, ``labels [B, T]`` aligned);
    both differentiable (second order included). docs/design.md §1, arXiv 2509.19104."""
    tok, q = _wgrad_tokens(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                           ignore_index=ignore_index, temperature=temperature, impl=impl)
    return (sequence_logps(tok.view(labels.shape), labels, ignore_index=ignore_index),
            sequence_logps(q.view(labels.shape), labels, ignore_index=ignore_index))


def _pair_tokens(hidden_a: Tensor, hidden_b: Tensor, weight: Tensor, labels_a: Tensor,
                 labels_b: Tensor, temperature: float, ignore_index: int, impl: str,
                 average_log_prob: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sequence ``(log π(a), log π(b), S_a + S_b)`` from ONE fused call over both responses.
    ``average_log_prob``: ``(log π(a)/n_a, log π(b)/n_b, S_a/n_a² + S_b/n_b²)`` (n = response
    tokens), the squared gradient norm of the averaged log-probs."""
    h = hidden_a.shape[-1]
    flat_h = torch.cat([hidden_a.reshape(-1, h), hidden_b.reshape(-1, h)])
    flat_y = torch.cat([labels_a.reshape(-1), labels_b.reshape(-1)])
    tok, q = _wgrad_tokens(flat_h, weight, flat_y, ignore_index=ignore_index,
                           temperature=temperature, impl=impl)
    na = labels_a.numel()
    split = lambda t, lab, lo, hi: sequence_logps(t[lo:hi].view(lab.shape), lab,  # noqa: E731
                                                  ignore_index=ignore_index)
    lp_a, lp_b = split(tok, labels_a, 0, na), split(tok, labels_b, na, tok.numel())
    s_a, s_b = split(q, labels_a, 0, na), split(q, labels_b, na, q.numel())
    if average_log_prob:
        n_a, n_b = (token_counts(lab, ignore_index).clamp(min=1) for lab in (labels_a, labels_b))
        lp_a, lp_b = lp_a / n_a.to(lp_a.dtype), lp_b / n_b.to(lp_b.dtype)
        s_a, s_b = s_a / (n_a * n_a).to(s_a.dtype), s_b / (n_b * n_b).to(s_b.dtype)
    return lp_a, lp_b, s_a + s_b


def wasserstein_rebel_from_sums(
    logps_a: Tensor, logps_b: Tensor, grad_sums: Tensor, ref_logps_a: Tensor,
    ref_logps_b: Tensor, rewards_a: Tensor, rewards_b: Tensor, *, eta: float, rho: float,
    temperature: float = 1.0, group: object | None = None, global_batch: bool = True,
    validate: bool = True,
) -> LossOutput:
    """``L_W`` from per-pair ``(log π(a), log π(b), S_a + S_b)``: ``‖∇_h ℓ_i‖² =
    (2Δ_i/(ηT))² (S_a + S_b)_i`` (docs/design.md §1), then :func:`wasserstein_combine`."""
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    resid = rebel_residuals(logps_a, logps_b, ref_logps_a, ref_logps_b, rewards_a, rewards_b, eta)
    sq = (2.0 * resid / (eta * temperature)) ** 2 * grad_sums.to(resid.dtype)
    return wasserstein_combine(logps_a, logps_b, sq, ref_logps_a, ref_logps_b, rewards_a,
                               rewards_b, eta=eta, rho=rho, group=group, global_batch=global_batch,
                               validate=validate)


def fused_linear_wasserstein_rebel_loss(
    hidden_a: Tensor,
    hidden_b: Tensor,
    weight: Tensor,
    labels_a: Tensor,
    labels_b: Tensor,
    ref_logps_a: Tensor,
    ref_logps_b: Tensor,
    rewards_a: Tensor,
    rewards_b: Tensor,
    *,
    eta: float,
    rho: float,
    temperature: float = 1.0,
    ignore_index: int = -100,
    impl: str = "auto",
    w_target: str = "hidden",
    group: object | None = None,
    global_batch: bool = True,
    validate: bool = True,
    average_log_prob: bool = False,
) -> LossOutput:
    """Wasserstein DRO-REBEL, fused hidden-state penalty (arXiv 2509.19104; docs/design.md §1).

    ``L_W = (1/n) Σ ℓ_i + ρ sqrt((1/n) Σ_i (2Δ_i/(ηT))² S_i)`` with
    ``S_i = Σ_{t∈a_i∪b_i} ‖W[y_t] − E_{p_t}[W]‖²`` (= ‖∇_{h} ℓ_i‖² up to the factor), full
    second-order gradients, no [N, V] logits.

    Args:
        hidden_a/hidden_b: [B, T, H]; weight: [V, H] LM head; labels_a/labels_b: [B, T]
            aligned (``hidden[:, t]`` predicts ``labels[:, t]``; ``ignore_index`` masked).
        ref_logps_a/b, rewards_a/b: [B]. eta: REBEL η > 0. rho: radius ρ ≥ 0 (0 = REBEL).
        w_target: only "hidden" here; for "embeddings" call
            :func:`embedding_wasserstein_rebel_loss` with the model.
        group, global_batch: data parallel scope (see :func:`wasserstein_combine`).
        average_log_prob: per-token mean log-probs (sums divided by the response token
            counts; the reference log-probs must be averages too); the penalty then uses
            ``S_a/n_a² + S_b/n_b²``.
    """
    if w_target != "hidden":
        raise ValueError("w_target: this function implements 'hidden'; use "
                         "embedding_wasserstein_rebel_loss(model, ...) for 'embeddings'")
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    hidden_a, hidden_b, weight, labels_a, labels_b = legacy_pair_order(
        (hidden_a, hidden_b, weight, labels_a, labels_b), "fused_linear_wasserstein_rebel_loss")
    if impl == "materialized":
        raise ValueError("impl='materialized': the Wasserstein penalty on hidden states is "
                         "computed by the fused op only (use impl='auto', 'torch' or 'triton')")
    lp_a, lp_b, s = _pair_tokens(hidden_a, hidden_b, weight, labels_a, labels_b, temperature,
                                 ignore_index, impl, average_log_prob)
    return wasserstein_rebel_from_sums(lp_a, lp_b, s, ref_logps_a, ref_logps_b, rewards_a,
                                       rewards_b, eta=eta, rho=rho, temperature=temperature,
                                       group=group, global_batch=global_batch, validate=validate)


def fused_linear_wdpo_loss(
    hidden_chosen: Tensor,
    hidden_rejected: Tensor,
    weight: Tensor,
    labels_chosen: Tensor,
    labels_rejected: Tensor,
    ref_logps_chosen: Tensor,
    ref_logps_rejected: Tensor,
    *,
    beta: float,
    rho: float,
    temperature: float = 1.0,
    ignore_index: int = -100,
    impl: str = "auto",
) -> LossOutput:
    """WDPO (Xu et al. 2025, arXiv 2502.01930) with z = final hidden states, fused.

    ``L = mean_i (ℓ_i + ρ‖∇_h ℓ_i‖²)``, ``ℓ_i = −log σ(u_i)``,
    ``u_i = β[(log π(c_i) − ref_c) − (log π(r_i) − ref_r)]``. Per token,
    ``∇_{h_t} ℓ_i = ∓(β σ(−u_i)/T) (W[y_t] − E_{p_t}[W])`` (− for chosen), so
    ``‖∇_h ℓ_i‖² = (β σ(−u_i)/T)² (S_c + S_r)_i`` with S from the same fused pass as the
    log-probs (:func:`linear_logps_wgrad`); second-order gradients exact. Same value and
    gradients as :func:`drorebel.losses.dpo.wdpo_loss` with ``z = [hidden_chosen,
    hidden_rejected]``; metrics: TRL's DPO ones plus ``dpo/loss``, ``wdpo/penalty``,
    ``wdpo/grad_sq_norm_mean``.
    """
    check_rho(rho)
    hc, hr, weight, yc, yr = legacy_pair_order(
        (hidden_chosen, hidden_rejected, weight, labels_chosen, labels_rejected),
        "fused_linear_wdpo_loss")
    lp_c, lp_r, s = _pair_tokens(hc, hr, weight, yc, yr, temperature, ignore_index, impl)
    ell, reward_c, reward_r = dpo_losses(lp_c, lp_r, ref_logps_chosen, ref_logps_rejected, beta)
    # dℓ/du = −σ(−u), u = reward_c − reward_r
    coef = beta * torch.sigmoid(reward_r - reward_c) / temperature
    sq = coef * coef * s.to(ell.dtype)
    penalty = rho * sq.mean()
    metrics = trl_metrics(reward_c, reward_r, lp_c, lp_r)
    metrics.update({"dpo/loss": ell.detach().mean(), "wdpo/penalty": penalty.detach(),
                    "wdpo/grad_sq_norm_mean": sq.detach().mean()})
    weights = torch.full_like(ell, 1.0 / ell.shape[0]).detach()
    return LossOutput(loss=ell.mean() + penalty, metrics=metrics, weights=weights,
                      policy_logps_a=lp_c, policy_logps_b=lp_r)
