"""Materialised pure-PyTorch reference of the per-token log-probs (docs/design.md §1).

    logp_t = log softmax(W h_t / T)[y_t]     (0 where y_t == ignore_index)

This is the readable oracle of ``drorebel.ops.linear_logps`` and the "materialised
logits" baseline of the benchmarks: it builds the full [N, V] logits, so its memory grows
as N x V. Autograd supplies the gradients.
"""

from __future__ import annotations

import torch

__all__ = ["linear_logps_reference"]


def linear_logps_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    upcast: bool = False,
) -> torch.Tensor:
    """Per-token ``log softmax(hidden @ weight.T / temperature)[labels]`` with full logits.

    Source: the sequence log-prob of REBEL (Gao et al., arXiv 2404.16767) and DRO-REBEL
    (arXiv 2509.19104), ``log π(y|x) = Σ_t log softmax(W h_t / T)[y_t]``; this returns the
    per-token terms.

    Args:
        hidden: [..., H] final hidden states (any float dtype).
        weight: [V, H] LM head.
        labels: [...] token ids, ``ignore_index`` for masked positions.
        ignore_index: label value whose log-prob is reported as 0 (and gets no gradient).
        temperature: sampling temperature T > 0.
        upcast: False (default): the logit matmul runs in the input dtype (what a model does
            with a bf16 head), then log-softmax in fp32. True: the matmul runs in fp32.

    Returns:
        [...] log-probs in fp32 (float64 for float64 inputs).
    """
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    if upcast:
        logits = hidden.to(out_dtype) @ weight.to(out_dtype).T
    else:
        logits = (hidden @ weight.T).to(out_dtype)
    logits = logits / temperature
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp))
