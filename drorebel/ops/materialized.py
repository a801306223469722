"""The materialised baseline of the fused log-prob ops: full ``[N, V]`` logits, plain autograd.

    logp_t = log softmax(W h_t / T)[y_t],      log π(y|x) = Σ_{t: y_t ≠ ignore_index} logp_t

(REBEL, arXiv 2404.16767; docs/design.md §1). This is what a trainer without fused kernels
does: ``hidden @ weight.T`` in the input dtype (as the model's ``lm_head`` would), the
softmax in fp32 (float64 for float64 inputs). It is a production path, selected with
``impl="materialized"`` in the fused losses and ``loss_impl: materialized`` in the trainer,
so that the baseline of every comparison runs the same loss code as the fused path (the
per-sequence sums: :func:`drorebel.ops.sequence.linear_sequence_logps`); it is not the test
oracle (that is :mod:`drorebel.reference`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["materialized_token_logps"]


def materialized_token_logps(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                             ignore_index: int = -100, temperature: float = 1.0) -> Tensor:
    """Per-token ``log softmax(W h_t / T)[y_t]`` (labels' shape, 0 at ``ignore_index``)."""
    logits = hidden @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    tok = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, tok, torch.zeros_like(tok))
