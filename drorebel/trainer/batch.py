"""The trainer's unit of work: a batch of tokenised, scored pairs (one typed container).

Offline data, online rollouts and checkpoints all hold the same ten fields, plus an optional
eleventh, ``groups`` (group-level DRO, offline data with a ``group`` column only); this module
names them once. A batch is consumed by :class:`drorebel.losses.zero3.CausalLMWithFusedLoss` through
:meth:`PairBatch.model_inputs`, which stacks the two responses as ``[a; b]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

__all__ = ["PairBatch", "PAIR_FIELDS", "OPTIONAL_FIELDS"]


@dataclass
class PairBatch:
    """``b`` pairs: prompt + response a / b as HF inputs, reference log-probs, rewards.

    ``ids_*``, ``mask_*``, ``labels_*`` are ``[b, T_a]`` / ``[b, T_b]`` (labels HF-style: the
    response tokens, −100 on prompt and padding; right-padded); ``ref_*`` (``log π_ref`` of each
    response) and ``rewards_*`` are ``[b]``. ``groups`` (optional, ``[b]`` int64): the pair's
    group id for ``dro_over: groups``; None when the source has none (a source without the field,
    e.g. an online rollout buffer or an older checkpoint's, gives None).
    """

    ids_a: Tensor
    mask_a: Tensor
    labels_a: Tensor
    ids_b: Tensor
    mask_b: Tensor
    labels_b: Tensor
    ref_a: Tensor
    ref_b: Tensor
    rewards_a: Tensor
    rewards_b: Tensor
    groups: Tensor | None = None

    @classmethod
    def select(cls, source: Any, idx: Tensor) -> PairBatch:
        """Rows ``idx`` of a source holding the fields as attributes or mapping keys."""
        mapping = isinstance(source, Mapping)
        values = {name: (source.get(name) if mapping else getattr(source, name, None))
                  if name in OPTIONAL_FIELDS else
                  (source[name] if mapping else getattr(source, name)) for name in PAIR_FIELDS}
        return cls(**{name: None if v is None else v[idx] for name, v in values.items()})

    def __len__(self) -> int:
        return self.ids_a.shape[0]

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(**{name: None if (v := getattr(self, name)) is None else v.to(device)
                            for name in PAIR_FIELDS})

    def trim(self) -> PairBatch:
        """Drop the padding columns that no sequence of either side uses (one width)."""
        width = int(torch.cat([self.mask_a, self.mask_b]).sum(1).max())
        cut = {f"{k}_{s}": getattr(self, f"{k}_{s}")[:, :width]
               for k in ("ids", "mask", "labels") for s in ("a", "b")}
        return PairBatch(**{name: cut.get(name, getattr(self, name)) for name in PAIR_FIELDS})

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments of ``CausalLMWithFusedLoss``: ``input_ids``, ``attention_mask``,
        ``labels`` ``[2b, T]`` stacked ``[a; b]`` (the narrower side right-padded: id 0, mask 0,
        label −100), ``rewards`` and ``ref_logps`` ``[2b]`` in fp32, and ``groups`` ``[b]``
        (one id per pair) only when the batch has them."""
        width = max(self.ids_a.shape[1], self.ids_b.shape[1])

        def stack(a: Tensor, b: Tensor, fill: int) -> Tensor:
            pad = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in (a, b)]
            return torch.cat(pad)

        out = {"input_ids": stack(self.ids_a, self.ids_b, 0),
               "attention_mask": stack(self.mask_a, self.mask_b, 0),
               "labels": stack(self.labels_a, self.labels_b, -100),
               "rewards": torch.cat([self.rewards_a, self.rewards_b]).float(),
               "ref_logps": torch.cat([self.ref_a, self.ref_b]).float()}
        if self.groups is not None:
            out["groups"] = self.groups
        return out


PAIR_FIELDS = tuple(f.name for f in fields(PairBatch))
OPTIONAL_FIELDS = ("groups",)  # None when the source lacks them
