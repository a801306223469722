"""A dispatch-mode probe for the no-N×V tests: the largest tensor any ATen op creates."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LargestTensor(TorchDispatchMode):
    """Largest element count (or byte size with ``in_bytes``) of any tensor an ATen op
    produces inside the ``with`` region. Byte sizes suit the Triton interpreter, which copies
    kernel arguments as byte storages."""

    def __init__(self, in_bytes: bool = False) -> None:
        super().__init__()
        self.in_bytes = in_bytes
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                size = t.numel() * (t.element_size() if self.in_bytes else 1)
                self.largest = max(self.largest, size)
        return out
