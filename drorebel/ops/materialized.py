"""The materialised baseline of the fused log-prob ops: full ``[N, V]`` logits, plain autograd.

    logp_t = log softmax(W h_t / T)[y_t],      log π(y|x) = Σ_{t: y_t ≠ ignore_index} logp_t

(REBEL, arXiv 2404.16767; docs/design.md §1). This is what a trainer without fused kernels
does: ``hidden @ weight.T`` in the input dtype (as the model's ``lm_head`` would), the
softmax in fp32 (float64 for float64 inputs). It is a production path, selected with
``impl="materialized"`` in the fused losses and ``loss_impl: materialized`` in the trainer,
so that the baseline of every comparison runs the same loss code as the fused path; it is
not the test oracle (that is :mod:`drorebel.reference`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["materialized_token_logps", "materialized_sequence_logps"]


def materialized_token_logps(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                             ignore_index: int = -100, temperature: float = 1.0) -> Tensor:
    """Per-token ``log softmax(W h_t / T)[y_t]`` (labels' shape, 0 at ``ignore_index``)."""
    logits = hidden @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    tok = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, tok, torch.zeros_like(tok))


def materialized_sequence_logps(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                                seq_ids: Tensor | None = None, num_seqs: int | None = None,
                                ignore_index: int = -100, temperature: float = 1.0) -> Tensor:
    """Per-sequence sums of :func:`materialized_token_logps`.

    Padded layout (``labels [B, T]``, ``hidden [B, T, H]``) → ``[B]``; or flat tokens with
    ``seq_ids`` (labels' shape, ``-1`` = no sequence) and ``num_seqs`` → ``[num_seqs]``.
    """
    tok = materialized_token_logps(hidden, weight, labels, ignore_index=ignore_index,
                                   temperature=temperature)
    if seq_ids is None:
        return tok.sum(-1)
    if num_seqs is None:
        raise ValueError("num_seqs is required with seq_ids")
    keep = seq_ids >= 0
    out = tok.new_zeros(num_seqs)
    return out.index_add(0, seq_ids[keep].long(), tok[keep])
