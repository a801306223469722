"""Fused DPO loss (the baseline) on the same machinery as the fused REBEL loss.

DPO (Rafailov et al., arXiv 2305.18290), sigmoid form:

    ℓ_i = −log σ(β·[(log π_θ(c_i) − log π_ref(c_i)) − (log π_θ(r_i) − log π_ref(r_i))]),
    L = mean_i ℓ_i

with the per-sequence log-probs summed from ``linear_logprobs`` (no materialised logits; the
chosen and rejected tokens go through one fused call).
"""

from __future__ import annotations

from torch import Tensor, nn

from drorebel.losses.dpo import dpo_loss
from drorebel.losses.fused_rebel import (
    _pair_logps,
    check_fused_inputs,
    reference_logps,
    sequence_logps_from_hidden,
    split_stacked,
)
from drorebel.losses.output import LossOutput

__all__ = ["fused_linear_dpo_loss", "FusedLinearDPOLoss"]


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a number > 0, got {beta!r}")
    return float(beta)


def fused_linear_dpo_loss(
    weight: Tensor,
    hidden_chosen: Tensor,
    labels_chosen: Tensor,
    hidden_rejected: Tensor,
    labels_rejected: Tensor,
    ref_logps_chosen: Tensor,
    ref_logps_rejected: Tensor,
    *,
    beta: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    impl: str = "auto",
    validate: bool = True,
) -> LossOutput:
    """Sigmoid DPO ``mean_i −log σ(β[(π_c − ref_c) − (π_r − ref_r)])`` (arXiv 2305.18290) from
    hidden states ``[B, T, H]`` (labels aligned, prompt/padding = ``ignore_index``) and the LM
    head ``[V, H]``.

    Returns a ``LossOutput`` with the TRL metrics of :func:`drorebel.losses.dpo.dpo_loss`,
    uniform ``weights`` and differentiable ``policy_logps_a`` (chosen) / ``policy_logps_b``
    (rejected). ``validate`` checks shapes, labels, empty responses and finiteness (one sync).
    """
    beta = _check_beta(beta)
    if validate:
        check_fused_inputs(
            weight,
            [("hidden_chosen", hidden_chosen, "labels_chosen", labels_chosen),
             ("hidden_rejected", hidden_rejected, "labels_rejected", labels_rejected)],
            {"ref_logps_chosen": ref_logps_chosen, "ref_logps_rejected": ref_logps_rejected},
            ignore_index,
        )
    logps_c, logps_r = _pair_logps(weight, hidden_chosen, labels_chosen, hidden_rejected,
                                   labels_rejected, temperature, ignore_index, impl)
    out = dpo_loss(logps_c, logps_r, ref_logps_chosen, ref_logps_rejected, beta=beta)
    out.policy_logps_a, out.policy_logps_b = logps_c, logps_r
    return out


class FusedLinearDPOLoss(nn.Module):
    """``nn.Module`` DPO over stacked ``[chosen; rejected]`` hidden states (Liger's layout).

    ``forward(weight, hidden, labels, ref_logps=None, *, ref_hidden=None, ref_weight=None)``
    with ``hidden`` ``[2B, T, H]``, ``labels`` ``[2B, T]``, ``ref_logps`` ``[2B]`` — or the
    reference computed here without gradient from ``ref_hidden`` and ``ref_weight`` (default:
    the policy head, detached).
    """

    def __init__(
        self,
        beta: float = 0.1,
        temperature: float = 1.0,
        ignore_index: int = -100,
        impl: str = "auto",
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.beta = _check_beta(beta)
        self.temperature, self.ignore_index, self.impl = temperature, ignore_index, impl
        self.validate = validate

    def extra_repr(self) -> str:
        return f"beta={self.beta}, temperature={self.temperature}, impl={self.impl!r}"

    def forward(
        self,
        weight: Tensor,
        hidden: Tensor,
        labels: Tensor,
        ref_logps: Tensor | None = None,
        *,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
    ) -> LossOutput:
        """DPO on stacked ``[chosen; rejected]`` inputs; returns :class:`LossOutput`."""
        kw = dict(temperature=self.temperature, ignore_index=self.ignore_index, impl=self.impl)
        split_stacked("hidden", hidden)
        if self.validate:
            check_fused_inputs(weight, [("hidden", hidden, "labels", labels)],
                               {"ref_logps": ref_logps}, self.ignore_index)
        ref = reference_logps(weight, hidden, labels, ref_logps, ref_hidden, ref_weight, **kw)
        logps = sequence_logps_from_hidden(weight, hidden, labels, **kw)
        (lc, lr), (rc, rr) = split_stacked("hidden", logps), split_stacked("ref_logps", ref)
        out = dpo_loss(lc, lr, rc, rr, beta=self.beta)
        out.policy_logps_a, out.policy_logps_b = lc, lr
        return out
