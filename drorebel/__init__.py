"""drorebel: distributionally robust REBEL (χ², KL, Wasserstein) for LLM alignment.

Public API (all differentiable where it makes sense; see README and docs/design.md §1):

- per-sequence losses: :func:`rebel_residuals`, :func:`rebel_loss`, :func:`dro_weights`,
  :func:`dro_solve`, :func:`robust_objective`, :func:`dpo_loss`, :func:`kldpo_loss`,
  :func:`wdpo_loss`, the Wasserstein oracle :func:`wasserstein_penalty`;
- fused hidden-state losses: :func:`linear_logprobs`, :func:`sequence_logps`,
  :func:`sequence_logps_fused`, :func:`fused_linear_rebel_loss`, :class:`FusedLinearRebelLoss`,
  :func:`fused_linear_dpo_loss`, :class:`FusedLinearDPOLoss`, and the ZeRO-3-safe wrapper
  :class:`CausalLMWithFusedLoss`;
- Wasserstein: :func:`linear_logprobs_wgrad` (log-probs and ``‖W[y_t] − E_p[W]‖²`` in one pass),
  :func:`fused_linear_wasserstein_rebel_loss`, :func:`embedding_wasserstein_rebel_loss`,
  :func:`fused_linear_wdpo_loss`.

Fused names are imported lazily so that the per-sequence maths imports without Triton.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from drorebel.losses.dpo import dpo_loss, kldpo_loss, order_by_reward, wdpo_loss
from drorebel.losses.dro import dro_solve, dro_weights, robust_objective
from drorebel.losses.output import LossOutput
from drorebel.losses.rebel import rebel_loss, rebel_residuals
from drorebel.ops.autograd_utils import per_sample_grad_sq_norms

__version__ = "0.1.0"

_LAZY = {
    "wasserstein_penalty": "drorebel.reference.wasserstein",
    "wasserstein_rebel_objective": "drorebel.reference.wasserstein",
    "linear_logprobs": "drorebel.ops.linear_logprobs",
    "sequence_logps": "drorebel.ops.sequence",
    "sequence_logps_fused": "drorebel.ops.sequence",
    "fused_linear_rebel_loss": "drorebel.losses.fused_rebel",
    "FusedLinearRebelLoss": "drorebel.losses.fused_rebel",
    "fused_linear_dpo_loss": "drorebel.losses.fused_dpo",
    "FusedLinearDPOLoss": "drorebel.losses.fused_dpo",
    "CausalLMWithFusedLoss": "drorebel.losses.zero3",
    "linear_logprobs_wgrad": "drorebel.ops.linear_wgrad",
    "fused_linear_wasserstein_rebel_loss": "drorebel.losses.wasserstein",
    "embedding_wasserstein_rebel_loss": "drorebel.losses.wasserstein_embeddings",
    "EmbeddingWassersteinRebelLoss": "drorebel.losses.wasserstein_embeddings",
    "fused_linear_wdpo_loss": "drorebel.losses.wasserstein",
}

__all__ = [
    "LossOutput",
    "dpo_loss",
    "dro_solve",
    "dro_weights",
    "kldpo_loss",
    "order_by_reward",
    "per_sample_grad_sq_norms",
    "rebel_loss",
    "rebel_residuals",
    "robust_objective",
    "wdpo_loss",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'drorebel' has no attribute {name!r}")
