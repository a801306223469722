"""Fused DPO loss (the baseline) on the same machinery as the fused REBEL loss.

DPO (Rafailov et al., arXiv 2305.18290), sigmoid form:

    ℓ_i = −log σ(β·[(log π_θ(c_i) − log π_ref(c_i)) − (log π_θ(r_i) − log π_ref(r_i))]),
    L = Σ_i m_i ℓ_i / Σ_i m_i

with the per-sequence log-probs from the fused log-prob op (no materialised logits; the chosen
and rejected tokens go through one call), ``m`` a mask (ties of reward-scored pairs) and the
sums over the global batch under data parallelism (:func:`drorebel.losses.dpo.dpo_loss`).
"""

from __future__ import annotations

from torch import Tensor, nn

from drorebel.losses.dpo import dpo_loss, order_by_reward
from drorebel.losses.fused_common import (
    average_logps,
    check_fused_inputs,
    legacy_module_order,
    legacy_pair_order,
    pair_logps,
    reference_logps,
    split_stacked,
)
from drorebel.losses.options import IMPLS, check_choice
from drorebel.losses.output import LossOutput
from drorebel.ops.common import check_softmax_cache
from drorebel.ops.sequence import linear_sequence_logps

__all__ = ["fused_linear_dpo_loss", "FusedLinearDPOLoss", "check_beta"]


def check_beta(beta: float) -> float:
    """``beta`` as a float; a ``ValueError`` unless it is a finite number > 0."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) \
            or not 0 < beta < float("inf"):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    return float(beta)


def fused_linear_dpo_loss(
    hidden_chosen: Tensor,
    hidden_rejected: Tensor,
    weight: Tensor,
    labels_chosen: Tensor,
    labels_rejected: Tensor,
    ref_logps_chosen: Tensor,
    ref_logps_rejected: Tensor,
    *,
    beta: float = 0.1,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    impl: str = "auto",
    group: object | None = None,
    global_batch: bool = True,
    validate: bool = True,
    average_log_prob: bool = False,
    softmax_cache: int | str = 0,
) -> LossOutput:
    """Sigmoid DPO ``Σ m_i·(−log σ(β[(π_c − ref_c) − (π_r − ref_r)])) / Σ m_i`` (arXiv
    2305.18290) from hidden states ``[B, T, H]`` (labels aligned, prompt/padding =
    ``ignore_index``) and the LM head ``[V, H]``.

    ``mask`` (bool ``[B]``) drops pairs, ``group``/``global_batch`` set the data-parallel
    scope, as in :func:`drorebel.losses.dpo.dpo_loss`. Returns a ``LossOutput`` with its TRL
    metrics, ``weights`` and differentiable ``policy_logps_a`` (chosen) / ``policy_logps_b``
    (rejected). ``validate`` checks shapes, labels, empty responses and finiteness (one sync).
    ``average_log_prob=True`` uses per-token mean log-probs (each sum divided by its number of
    response tokens); the reference log-probs must then be averages too. ``softmax_cache``:
    byte budget (or ``"auto"``) of the policy log-probs' softmax cache (``drorebel.linear_logps``).
    """
    beta = check_beta(beta)
    check_choice("impl", impl, IMPLS)
    check_softmax_cache(softmax_cache)
    hc, hr, weight, yc, yr = legacy_pair_order(
        (hidden_chosen, hidden_rejected, weight, labels_chosen, labels_rejected),
        "fused_linear_dpo_loss")
    if validate:
        check_fused_inputs(
            weight, [("hidden_chosen", hc, "labels_chosen", yc),
                     ("hidden_rejected", hr, "labels_rejected", yr)],
            {"ref_logps_chosen": ref_logps_chosen, "ref_logps_rejected": ref_logps_rejected},
            ignore_index)
    logps_c, logps_r = pair_logps(hc, hr, weight, yc, yr, temperature=temperature,
                                  ignore_index=ignore_index, impl=impl,
                                  average_log_prob=average_log_prob, softmax_cache=softmax_cache)
    out = dpo_loss(logps_c, logps_r, ref_logps_chosen, ref_logps_rejected, beta=beta, mask=mask,
                   group=group, global_batch=global_batch, validate=validate)
    out.policy_logps_a, out.policy_logps_b = logps_c, logps_r
    return out


class FusedLinearDPOLoss(nn.Module):
    """``nn.Module`` DPO over stacked hidden states (Liger's layout).

    ``forward(hidden, weight, labels, ref_logps=None, *, rewards=None, ref_hidden=None,
    ref_weight=None)`` with ``hidden`` ``[2B, T, H]``, ``labels`` ``[2B, T]``, ``ref_logps``
    ``[2B]`` — or the reference computed here without gradient from ``ref_hidden`` and
    ``ref_weight`` (default: the policy head, detached). The stack is ``[chosen; rejected]``;
    with ``order_by_reward=True`` it is ``[a; b]`` of reward-scored pairs and ``forward`` needs
    ``rewards`` ``[2B]``: the higher-reward response of each pair is the chosen one and tied
    pairs are masked (:func:`drorebel.losses.dpo.order_by_reward`; the trainer's ``loss: dpo``).
    """

    def __init__(self, beta: float = 0.1, temperature: float = 1.0, ignore_index: int = -100,
                 impl: str = "auto", validate: bool = True, group: object | None = None,
                 global_batch: bool = True, order_by_reward: bool = False,
                 average_log_prob: bool = False, softmax_cache: int | str = 0) -> None:
        super().__init__()
        self.beta = check_beta(beta)
        self.softmax_cache = check_softmax_cache(softmax_cache)
        self.average_log_prob = bool(average_log_prob)
        self.order_by_reward = bool(order_by_reward)
        self.temperature, self.ignore_index = temperature, ignore_index
        self.impl = check_choice("impl", impl, IMPLS)
        self.validate, self.group, self.global_batch = validate, group, global_batch

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, temperature={self.temperature}, impl={self.impl!r}, "
                f"order_by_reward={self.order_by_reward}")

    def _lp_kw(self) -> dict:
        return dict(temperature=self.temperature, ignore_index=self.ignore_index, impl=self.impl)

    def sequence_logps(self, hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        """``Σ_t log softmax(W h_t / T)[y_t]`` per row of ``hidden [B, T, H]`` (``[B]``); the
        per-token mean with ``average_log_prob=True``."""
        logps = linear_sequence_logps(hidden, weight, labels, softmax_cache=self.softmax_cache,
                                      **self._lp_kw())
        if self.average_log_prob:
            logps = average_logps(logps, labels, self.ignore_index)
        return logps

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor,
                ref_logps: Tensor | None = None, *, rewards: Tensor | None = None,
                ref_hidden: Tensor | None = None, ref_weight: Tensor | None = None
                ) -> LossOutput:
        """DPO on stacked inputs; returns :class:`LossOutput`."""
        hidden, weight = legacy_module_order(hidden, weight, type(self).__name__)
        if self.order_by_reward != (rewards is not None):
            raise ValueError("rewards are required with order_by_reward=True and not used "
                             "otherwise (the stack is then [chosen; rejected])")
        split_stacked("hidden", hidden)
        if self.validate:
            check_fused_inputs(weight, [("hidden", hidden, "labels", labels)],
                               {"ref_logps": ref_logps, "rewards": rewards}, self.ignore_index)
        ref = reference_logps(hidden, weight, labels, ref_logps, ref_hidden, ref_weight,
                              average_log_prob=self.average_log_prob, **self._lp_kw())
        logps = self.sequence_logps(hidden, weight, labels)
        (la, lb), (ra, rb) = split_stacked("hidden", logps), split_stacked("ref_logps", ref)
        lc, lr, rc, rr, mask = la, lb, ra, rb, None
        if self.order_by_reward:
            lc, lr, rc, rr, mask = order_by_reward(la, lb, ra, rb, *split_stacked("rewards",
                                                                               rewards))
        out = dpo_loss(lc, lr, rc, rr, beta=self.beta, mask=mask, group=self.group,
                       global_batch=self.global_batch, validate=self.validate)
        out.policy_logps_a, out.policy_logps_b = la, lb  # in the input's [a; b] order
        return out
