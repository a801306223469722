"""Run a fused LM-head op the way ``torch.autocast`` would run the head's ``F.linear``.

Under autocast a model's ``lm_head`` (``F.linear``) computes in the autocast dtype, e.g.
``logits = (h.bf16() @ W.bf16()^T)``. The fused ops (``linear_sequence_logps``,
``linear_logps_wgrad``) take ``hidden`` and ``weight`` instead of logits, so the cast is
done here: both are cast to the autocast dtype and the op runs with autocast OFF, so that its
own fp32 maths (logsumexp, accumulators) is not recast. Outside autocast the op is called
unchanged. Shared by ``drorebel.losses.fused_rebel`` and ``drorebel.losses.wasserstein``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["call_head_under_autocast"]

T = TypeVar("T")


def call_head_under_autocast(fn: Callable[..., T], *, hidden: Tensor, weight: Tensor,
                             **kw) -> T:
    """``fn(hidden=hidden, weight=weight, **kw)``; under ``torch.autocast`` on
    ``hidden.device.type``, ``hidden`` and ``weight`` are first cast to the autocast dtype
    (as ``F.linear`` would) and ``fn`` runs with autocast disabled."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            return fn(hidden=hidden.to(dtype), weight=weight.to(dtype), **kw)
    return fn(hidden=hidden, weight=weight, **kw)
