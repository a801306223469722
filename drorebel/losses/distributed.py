"""Re-export of :mod:`drorebel.distributed` (the data-parallel helpers moved there, below every
layer, so that ``drorebel.reference`` can use them too); import from ``drorebel.distributed``."""

from __future__ import annotations

from drorebel.distributed import (
    all_reduce_sum,
    check_equal_local_sizes,
    data_parallel_info,
    dp_global_sum,
    gather_rows,
    local_slice,
    set_check_sizes,
)

__all__ = [
    "data_parallel_info",
    "set_check_sizes",
    "check_equal_local_sizes",
    "gather_rows",
    "all_reduce_sum",
    "local_slice",
    "dp_global_sum",
]
