"""Fused (DRO-)REBEL loss: hidden states + LM head → per-sequence log-probs → residuals →
χ²/KL dual weights (or the Wasserstein penalty) → one backward pass through the fused op.

    Δ_i = (1/η)·[(log π_θ(a_i) − log π_ref(a_i)) − (log π_θ(b_i) − log π_ref(b_i))]
          − (r_a,i − r_b,i),        L = Σ_i p_i.detach() · Δ_i²

with ``p`` uniform (REBEL, Gao et al., arXiv 2404.16767) or the worst-case weights of a χ² or
KL ball (DRO-REBEL, Sahu & Wells, arXiv 2509.19104; docs/design.md §1). The a- and b-tokens
go through ONE call of the fused log-prob op, so the LM head is streamed once per pass and
autograd runs the fused backward once with the per-token upstream gradient ``±2·p_i·Δ_i/η``.
``divergence="wasserstein"`` adds ``ρ·sqrt((1/n) Σ_i ‖∇_h ℓ_i‖²)`` with z = the final hidden
states, fused into the same vocabulary pass (:mod:`drorebel.losses.wasserstein`); the
input-embedding variant needs the model and lives in :mod:`drorebel.losses.wasserstein_embeddings`.
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from drorebel.losses.dro import check_groups, validate_dro_args
from drorebel.losses.fused_common import (
    average_logps,
    check_eta,
    check_fused_inputs,
    legacy_module_order,
    legacy_pair_order,
    pair_logps,
    reference_logps,
    split_stacked,
    token_counts,
)
from drorebel.losses.options import DIVERGENCES, IMPLS, check_choice
from drorebel.losses.output import LossOutput
from drorebel.losses.rebel import rebel_loss
from drorebel.losses.wasserstein import (
    fused_linear_wasserstein_rebel_loss,
    sequence_logps_and_grad_sums,
    wasserstein_rebel_from_sums,
)
from drorebel.ops.common import check_softmax_cache
from drorebel.ops.sequence import linear_sequence_logps

__all__ = ["fused_linear_rebel_loss", "FusedLinearRebelLoss", "check_divergence",
           "sequence_logps_from_hidden"]

_EMBEDDINGS = ("the Wasserstein penalty on input embeddings needs the model: use "
               "drorebel.EmbeddingWassersteinRebelLoss (or embedding_wasserstein_rebel_loss)")


def check_divergence(divergence: str, rho: float | None, tau: float | None) -> None:
    """:func:`validate_dro_args` extended with ``"wasserstein"`` (needs ``rho >= 0``, no
    ``tau``)."""
    check_choice("divergence", divergence, DIVERGENCES)
    if divergence != "wasserstein":
        validate_dro_args(divergence, rho, tau)
        return
    if tau is not None:
        raise ValueError("tau is not used by divergence='wasserstein' (pass rho only)")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho < float("inf"):
        raise ValueError(f"divergence='wasserstein' needs a finite radius rho >= 0, got {rho!r}")


def _check_w_target(w_target: str) -> None:
    """``w_target`` survives one release for old callers: only ``"hidden"`` is computed here."""
    if w_target == "embeddings":
        raise ValueError(f"w_target='embeddings': {_EMBEDDINGS}")
    check_choice("w_target", w_target, ("hidden",))


def fused_linear_rebel_loss(
    hidden_a: Tensor, hidden_b: Tensor, weight: Tensor, labels_a: Tensor, labels_b: Tensor,
    ref_logps_a: Tensor, ref_logps_b: Tensor, rewards_a: Tensor, rewards_b: Tensor, *,
    eta: float, divergence: str = "none", rho: float | None = None,
    tau: float | None = None, temperature: float = 1.0, ignore_index: int = -100,
    impl: str = "auto", group: object | None = None, global_batch: bool = True,
    validate: bool = True, w_target: str = "hidden", average_log_prob: bool = False,
    softmax_cache: int | str = 0, groups: Tensor | None = None,
) -> LossOutput:
    """REBEL / χ²-REBEL / KL-REBEL / Wasserstein-REBEL loss from final hidden states and the head.

    ``L = Σ_i p_i.detach()·Δ_i²`` with ``Δ_i = (1/η)[(log π_θ(a_i) − log π_ref(a_i)) −
    (log π_θ(b_i) − log π_ref(b_i))] − (r_a,i − r_b,i)`` and ``p`` uniform
    (``divergence="none"``, REBEL, arXiv 2404.16767) or the worst-case weights of the χ² / KL
    ball of radius ``rho`` (or KL at fixed temperature ``tau``) of DRO-REBEL (arXiv 2509.19104).
    The value equals the robust objective; the gradient is Danskin's ``Σ p_i ∇ℓ_i``.
    ``divergence="wasserstein"``: ``L_W = (1/n) Σ ℓ_i + ρ sqrt((1/n) Σ_i ‖∇_h ℓ_i‖²)`` with z =
    the final hidden states (docs/design.md §1), exact second-order gradients.

    Args:
        hidden_a, hidden_b: final hidden states ``[B, T, H]`` (``T`` may differ between a, b).
        weight: LM head ``[V, H]``, same dtype as the hidden states (under ``torch.autocast``
            both are cast to the autocast dtype). Under DeepSpeed ZeRO-3 call this inside a
            module forward that registered the head: see :mod:`drorebel.losses.zero3`.
        labels_a, labels_b: ``[B, T]``; ``labels[:, t]`` is the token ``hidden[:, t]`` predicts
            (already shifted), prompt and padding = ``ignore_index``.
        ref_logps_a, ref_logps_b: per-sequence reference log-probs ``[B]`` (precomputed).
        rewards_a, rewards_b: ``[B]``.
        eta: REBEL step size η > 0.
        divergence, rho, tau: ``"none"``, ``"chi2"`` (``rho``), ``"kl"`` (``rho`` or ``tau``)
            or ``"wasserstein"`` (``rho``; ρ = 0 is REBEL).
        temperature, ignore_index: as for ``drorebel.linear_logps``.
        impl: ``"auto"`` | ``"triton"`` | ``"torch"`` (fused) | ``"materialized"`` (full logits).
        group, global_batch: data-parallel scope of the weights (see ``rebel_loss``): by default
            the weights cover the global batch and the loss is scaled so that averaged gradients
            are exact.
        validate: check shapes, label values, empty responses and finiteness (one host sync).
        w_target: deprecated, ``"hidden"`` only (the embedding penalty has its own module).
        average_log_prob: divide each sequence's summed log-prob by its number of response
            tokens (TRL/Liger's name). The reference log-probs passed in must then be per-token
            averages too.
        softmax_cache: byte budget (int, 0 = none) or ``"auto"`` of the softmax cache of the
            policy log-probs (``drorebel.linear_logps``): cached tokens skip the logit
            recompute in the backward. Not used by ``divergence="wasserstein"``.
        groups: optional ``[B]`` integer group id per pair (group-level DRO, beyond the paper):
            the χ²/KL ball is over the groups' distribution around their empirical shares and
            each pair of group g gets the weight ``q_g/n_g`` (see ``rebel_loss``; gathered with
            the statistics under data parallelism; adds ``dro/num_groups`` and
            ``dro/worst_group_loss``). ``divergence="wasserstein"`` refuses it (``ValueError``);
            with ``"none"`` the weights stay uniform and only the metrics are added.

    Returns:
        ``LossOutput``: ``.loss``, differentiable ``.policy_logps_a/_b`` ``[B]``, detached
        ``.weights`` ``[B]`` (this rank's slice) and ``.metrics`` (see ``rebel_loss``).
    """
    ha, hb, weight, la, lb = legacy_pair_order(
        (hidden_a, hidden_b, weight, labels_a, labels_b), "fused_linear_rebel_loss")
    ref_a, ref_b, rew_a, rew_b = ref_logps_a, ref_logps_b, rewards_a, rewards_b
    eta = check_eta(eta)
    check_divergence(divergence, rho, tau)
    _check_w_target(w_target)
    check_choice("impl", impl, IMPLS)
    check_softmax_cache(softmax_cache)
    _check_groups(groups, divergence, ha)
    if validate:
        check_fused_inputs(weight, [("hidden_a", ha, "labels_a", la),
                                    ("hidden_b", hb, "labels_b", lb)],
                           {"ref_logps_a": ref_a, "ref_logps_b": ref_b, "rewards_a": rew_a,
                            "rewards_b": rew_b}, ignore_index)
    if divergence == "wasserstein":
        return fused_linear_wasserstein_rebel_loss(
            ha, hb, weight, la, lb, ref_a, ref_b, rew_a, rew_b, eta=eta, rho=float(rho),
            temperature=temperature, ignore_index=ignore_index, impl=impl, group=group,
            global_batch=global_batch, validate=validate, average_log_prob=average_log_prob)
    logps_a, logps_b = pair_logps(ha, hb, weight, la, lb, temperature=temperature,
                                  ignore_index=ignore_index, impl=impl,
                                  average_log_prob=average_log_prob, softmax_cache=softmax_cache)
    return _rebel_from_logps(logps_a, logps_b, ref_a, ref_b, rew_a, rew_b, eta=eta,
                             divergence=divergence, rho=rho, tau=tau, group=group,
                             global_batch=global_batch, validate=validate, groups=groups)


def _check_groups(groups: Tensor | None, divergence: str, hidden_a: Tensor) -> None:
    """``groups``: None, or ``[B]`` integer ids (one per pair) with a χ²/KL/none divergence."""
    if groups is None:
        return
    if divergence == "wasserstein":
        raise ValueError("groups (group-level DRO) needs divergence 'chi2' or 'kl', got "
                         "divergence='wasserstein' (the penalty has no per-pair weights)")
    check_groups(groups, hidden_a.shape[0] if hidden_a.dim() else 0)


def _rebel_from_logps(logps_a: Tensor, logps_b: Tensor, *args: Tensor, **kw) -> LossOutput:
    if kw.get("groups") is not None:
        kw["groups"] = kw["groups"].to(logps_a.device)
    out = rebel_loss(logps_a, logps_b, *args, **kw)
    out.policy_logps_a, out.policy_logps_b = logps_a, logps_b
    return out


class FusedLinearRebelLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_linear_rebel_loss` (REBEL / χ² / KL / Wasserstein).

    ``forward(hidden, weight, labels, rewards, ref_logps=None, *, ref_hidden=None,
    ref_weight=None)`` takes the a- and b-responses stacked along the batch as ``[a; b]``
    (``hidden`` ``[2B, T, H]``, ``labels`` ``[2B, T]``, ``rewards`` and ``ref_logps`` ``[2B]``),
    Liger's layout, in ONE fused call. The reference log-probs are precomputed per sequence
    (``ref_logps``) or computed here without gradient from ``ref_hidden`` ``[2B, T, H]`` and
    ``ref_weight`` (default: the policy head, detached). :meth:`forward_pairs` takes the a- and
    b-tensors separately with the functional signature; :meth:`sequence_logps` gives the
    per-sequence log-probs with this module's settings (e.g. for reference log-probs).
    ``group``/``global_batch``: the data-parallel scope of the weights. ``groups=`` (forward and
    :meth:`forward_pairs`): ``[B]`` integer group ids, ONE PER PAIR (not per stacked row), for
    group-level DRO (see :func:`fused_linear_rebel_loss`; refused with ``"wasserstein"``).
    """

    def __init__(
        self, eta: float, divergence: str = "none", rho: float | None = None,
        tau: float | None = None, temperature: float = 1.0, ignore_index: int = -100,
        impl: str = "auto", validate: bool = True, group: object | None = None,
        global_batch: bool = True, w_target: str = "hidden", average_log_prob: bool = False,
        softmax_cache: int | str = 0,
    ) -> None:
        super().__init__()
        self.eta = check_eta(eta)
        self.softmax_cache = check_softmax_cache(softmax_cache)
        self.average_log_prob = bool(average_log_prob)
        check_divergence(divergence, rho, tau)
        _check_w_target(w_target)
        self.divergence, self.rho, self.tau = divergence, rho, tau
        self.temperature, self.ignore_index = temperature, ignore_index
        self.impl = check_choice("impl", impl, IMPLS)
        self.validate, self.group, self.global_batch = validate, group, global_batch

    def extra_repr(self) -> str:
        return (f"eta={self.eta}, divergence={self.divergence!r}, rho={self.rho}, "
                f"tau={self.tau}, temperature={self.temperature}, impl={self.impl!r}")

    def _lp_kw(self) -> dict:
        return dict(temperature=self.temperature, ignore_index=self.ignore_index, impl=self.impl)

    def _dro_kw(self) -> dict:
        return dict(eta=self.eta, divergence=self.divergence, rho=self.rho, tau=self.tau,
                    group=self.group, global_batch=self.global_batch)

    def sequence_logps(self, hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        """``Σ_t log softmax(W h_t / T)[y_t]`` per row of ``hidden [B, T, H]`` (``[B]``); the
        per-token mean with ``average_log_prob=True``."""
        logps = linear_sequence_logps(hidden, weight, labels, softmax_cache=self.softmax_cache,
                                      **self._lp_kw())
        if self.average_log_prob:
            logps = average_logps(logps, labels, self.ignore_index)
        return logps

    def forward(
        self, hidden: Tensor, weight: Tensor, labels: Tensor, rewards: Tensor,
        ref_logps: Tensor | None = None, *, ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None, groups: Tensor | None = None,
    ) -> LossOutput:
        """Loss on stacked ``[a; b]`` inputs (``groups``: ``[B]``, one id per pair); returns
        :class:`LossOutput`."""
        hidden, weight = legacy_module_order(hidden, weight, type(self).__name__)
        half, _ = split_stacked("hidden", hidden)
        _check_groups(groups, self.divergence, half)
        if self.validate:
            check_fused_inputs(weight, [("hidden", hidden, "labels", labels)],
                               {"rewards": rewards, "ref_logps": ref_logps}, self.ignore_index)
        ref = reference_logps(hidden, weight, labels, ref_logps, ref_hidden, ref_weight,
                              average_log_prob=self.average_log_prob, **self._lp_kw())
        if self.divergence == "wasserstein":
            logps, sums = sequence_logps_and_grad_sums(hidden, weight, labels, **self._lp_kw())
            if self.average_log_prob:  # ‖∇_h (log π / n)‖² = S / n²
                count = token_counts(labels, self.ignore_index).clamp(min=1)
                logps, sums = logps / count.to(logps.dtype), sums / (count * count).to(sums.dtype)
        else:
            logps = self.sequence_logps(hidden, weight, labels)
        (la, lb), (ra, rb), (wa, wb) = (split_stacked(k, t) for k, t in
                                        (("hidden", logps), ("ref_logps", ref),
                                         ("rewards", rewards)))
        if self.divergence == "wasserstein":
            sa, sb = split_stacked("hidden", sums)
            return wasserstein_rebel_from_sums(
                la, lb, sa + sb, ra, rb, wa, wb, eta=self.eta, rho=float(self.rho),
                temperature=self.temperature, group=self.group, global_batch=self.global_batch,
                validate=self.validate)
        return _rebel_from_logps(la, lb, ra, rb, wa, wb, validate=self.validate, groups=groups,
                                 **self._dro_kw())

    def forward_pairs(
        self, hidden_a: Tensor, hidden_b: Tensor, weight: Tensor, labels_a: Tensor,
        labels_b: Tensor, ref_logps_a: Tensor, ref_logps_b: Tensor, rewards_a: Tensor,
        rewards_b: Tensor, *, groups: Tensor | None = None,
    ) -> LossOutput:
        """Same as :func:`fused_linear_rebel_loss` with this module's settings."""
        return fused_linear_rebel_loss(
            hidden_a, hidden_b, weight, labels_a, labels_b, ref_logps_a, ref_logps_b, rewards_a,
            rewards_b, validate=self.validate, average_log_prob=self.average_log_prob,
            softmax_cache=self.softmax_cache, groups=groups, **self._dro_kw(), **self._lp_kw())


def sequence_logps_from_hidden(weight: Tensor, hidden: Tensor, labels: Tensor, **kw) -> Tensor:
    """Deprecated 0.1 spelling and order of ``drorebel.linear_sequence_logps(hidden, weight,
    labels, ...)``; warns, then computes the same per-sequence log-probs."""
    warnings.warn("sequence_logps_from_hidden(weight, hidden, labels) is deprecated; use "
                  "drorebel.linear_sequence_logps(hidden, weight, labels). It is removed in 0.3.",
                  DeprecationWarning, stacklevel=2)
    return linear_sequence_logps(hidden, weight, labels, **kw)
