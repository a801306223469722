"""The option vocabularies of the losses, defined once (the trainer's config reuses them).

- ``WEIGHT_DIVERGENCES``: the ambiguity sets that re-weight pairs (:func:`dro_weights`,
  :func:`rebel_loss`): uniform weights (REBEL), the χ² ball, the KL ball.
- ``DIVERGENCES``: what the fused REBEL losses and the trainer accept: the above plus the
  type-2 Wasserstein ball (a gradient penalty, not a re-weighting; docs/design.md §1).
- ``W_TARGETS``: where the Wasserstein perturbation acts: the final hidden states (fused,
  :class:`FusedLinearRebelLoss`) or the input token embeddings
  (:class:`EmbeddingWassersteinRebelLoss`, a double backward through the model).
- ``IMPLS`` (defined by :mod:`drorebel.ops.common`, re-exported here): how log-probs are
  computed: ``"auto"`` (Triton for CUDA tensors of a kernel dtype, the chunked PyTorch path
  otherwise), ``"triton"``, ``"torch"`` (chunked), or ``"materialized"`` (full ``[N, V]``
  logits, the baseline every benchmark compares against).
"""

from __future__ import annotations

from drorebel.ops.common import IMPLS

__all__ = ["WEIGHT_DIVERGENCES", "DIVERGENCES", "W_TARGETS", "IMPLS", "check_choice"]

WEIGHT_DIVERGENCES = ("none", "chi2", "kl")
DIVERGENCES = (*WEIGHT_DIVERGENCES, "wasserstein")
W_TARGETS = ("hidden", "embeddings")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]
