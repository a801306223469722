"""drorebel: distributionally robust REBEL (χ², KL, Wasserstein) for LLM alignment.

Public API (all differentiable where it makes sense; tour in docs/api.md, maths in
docs/design.md §1). One argument order throughout: ``hidden, weight, labels`` first, then the
per-sequence tensors; pair functions list each role for ``a`` then ``b``.

- per-sequence losses: :func:`rebel_residuals`, :func:`rebel_loss`, :func:`dro_weights`,
  :func:`dro_solve`, :func:`robust_objective`, :func:`dpo_loss` (+ :func:`order_by_reward`),
  :func:`kldpo_loss`, :func:`wdpo_loss`; the Wasserstein oracle :func:`wasserstein_penalty`;
- log-probs from hidden states and the LM head, without ``[N, V]`` logits:
  :func:`linear_logps` (per token), :func:`linear_sequence_logps` (per sequence, the sums in
  the kernel epilogue), :func:`sequence_logps` (sums of existing per-token values);
- fused losses: :func:`fused_linear_rebel_loss` / :class:`FusedLinearRebelLoss` (REBEL, χ², KL,
  Wasserstein on hidden states), :func:`fused_linear_dpo_loss` / :class:`FusedLinearDPOLoss`,
  :class:`EmbeddingWassersteinRebelLoss` (Wasserstein on input embeddings, needs the model),
  and the ZeRO-3-safe wrapper :class:`CausalLMWithFusedLoss` (what the trainer trains);
- Wasserstein building blocks: :func:`linear_logps_wgrad` (log-probs and
  ``‖W[y_t] − E_p[W]‖²`` in one pass), :func:`fused_linear_wasserstein_rebel_loss`,
  :func:`embedding_wasserstein_rebel_loss`, :func:`fused_linear_wdpo_loss`.

Deprecated 0.1 names (they warn; removed in 0.3): ``linear_logprobs``,
``linear_logprobs_wgrad``, ``sequence_logps_fused(weight, hidden, ...)``. Fused names are
imported lazily so that the per-sequence maths imports without Triton.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from drorebel.losses.dpo import dpo_loss, kldpo_loss, order_by_reward, wdpo_loss
from drorebel.losses.dro import dro_solve, dro_weights, robust_objective
from drorebel.losses.output import LossOutput
from drorebel.losses.rebel import rebel_loss, rebel_residuals
from drorebel.ops.autograd_utils import per_sample_grad_sq_norms

__version__ = "0.2.0"

_DEPRECATED = ("linear_logprobs", "linear_logprobs_wgrad", "sequence_logps_fused")
_LAZY = {
    "wasserstein_penalty": "drorebel.reference.wasserstein",
    "wasserstein_rebel_objective": "drorebel.reference.wasserstein",
    "linear_logps": "drorebel.ops.linear_logps",
    "linear_sequence_logps": "drorebel.ops.sequence",
    "sequence_logps": "drorebel.ops.sequence",
    "sequence_logps_fused": "drorebel.ops.sequence",
    "linear_logprobs": "drorebel.ops.linear_logps",
    "linear_logprobs_wgrad": "drorebel.ops.linear_wgrad",
    "fused_linear_rebel_loss": "drorebel.losses.fused_rebel",
    "FusedLinearRebelLoss": "drorebel.losses.fused_rebel",
    "fused_linear_dpo_loss": "drorebel.losses.fused_dpo",
    "FusedLinearDPOLoss": "drorebel.losses.fused_dpo",
    "CausalLMWithFusedLoss": "drorebel.losses.zero3",
    "linear_logps_wgrad": "drorebel.ops.linear_wgrad",
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
    *(name for name in _LAZY if name not in _DEPRECATED),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'drorebel' has no attribute {name!r}")
