"""The value every drorebel loss returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """Result of a drorebel loss.

    Attributes:
        loss: the differentiable scalar to call ``.backward()`` on. For the DRO variants it is
            ``Σ_i p_i.detach() · ℓ_i`` (Danskin), whose value equals the robust objective.
        metrics: detached scalars, named after TRL where a name exists (``rewards/…``,
            ``logps/…``) plus ``rebel/…`` and ``dro/…``.
        weights: the detached per-pair weights ``p`` (sum to 1 for REBEL/χ²/KL; KLDPO's clamped
            weights are not normalised), or ``None`` for losses that have none.
        policy_logps_a / policy_logps_b: per-sequence policy log-probs when the loss computed
            them itself (fused losses), differentiable; ``None`` otherwise.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: torch.Tensor | None = None
    policy_logps_a: torch.Tensor | None = None
    policy_logps_b: torch.Tensor | None = None
