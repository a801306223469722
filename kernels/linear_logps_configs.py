"""Launch configurations of the fused linear log-prob kernels (see ``linear_logps.py``).

Each GEMM kernel has a list for 16-bit inputs (tensor cores) and one for fp32 (exact "ieee"
dot: FMA, smaller tiles); the autotuner prunes them by the device's shared memory with
:func:`smem_estimate`, an upper bound that tests/test_kernels_aot.py checks against the
compiled kernels for sm_80 and sm_90. The config builder and the shared-memory filter are in
``drorebel.kernels.common``.
"""

from __future__ import annotations

import torch
import triton

from drorebel.kernels.common import select_configs
from drorebel.kernels.common import tile_config as _cfg

__all__ = [
    "BWD_CONFIGS",
    "COMBINE_CONFIGS",
    "FWD_CONFIGS",
    "GRAD_LOGITS_CONFIGS",
    "INTERPRET_CONFIG",
    "configs_for",
    "smem_estimate",
]


# bf16/fp16 configs (tensor cores) and fp32 configs (exact "ieee" dot: FMA, smaller tiles);
# the first one of each list is the one autotuning chose on an H100 at H=4096, V=128256
FWD_CONFIGS_16 = [
    _cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 3), _cfg(256, 128, 64, 8, 3),
    _cfg(64, 256, 64, 8, 4), _cfg(128, 128, 64, 4, 4), _cfg(128, 256, 64, 8, 4),
    _cfg(128, 128, 128, 8, 3),
]
FWD_CONFIGS_32 = [_cfg(64, 64, 32, 4, 2), _cfg(64, 128, 32, 8, 2), _cfg(128, 64, 32, 8, 2)]
GRAD_LOGITS_CONFIGS_16 = [
    _cfg(128, 256, 64, 8, 4, 16), _cfg(128, 256, 64, 8, 3, 16), _cfg(128, 128, 64, 8, 3, 16),
    _cfg(256, 128, 64, 8, 3, 8), _cfg(128, 128, 64, 4, 4, 16), _cfg(256, 128, 64, 8, 4, 8),
]
GRAD_LOGITS_CONFIGS_32 = [_cfg(64, 64, 32, 4, 2, 16), _cfg(64, 128, 32, 8, 2, 16)]
BWD_CONFIGS_16 = [_cfg(128, 128, 64, 8, 3, 8), _cfg(64, 128, 64, 4, 3, 8),
                  _cfg(128, 64, 64, 4, 3, 8)]
BWD_CONFIGS_32 = [_cfg(64, 64, 32, 4, 2, 8), _cfg(32, 64, 32, 4, 2, 8)]
FWD_CONFIGS = FWD_CONFIGS_16 + FWD_CONFIGS_32
GRAD_LOGITS_CONFIGS = GRAD_LOGITS_CONFIGS_16 + GRAD_LOGITS_CONFIGS_32
BWD_CONFIGS = BWD_CONFIGS_16 + BWD_CONFIGS_32
# the split-combine kernel (no GEMM: one config; a plain elementwise pass over [3, S, N])
COMBINE_CONFIGS = [triton.Config({"BLOCK_N": 512}, num_warps=4)]
# the one config used by the CPU interpreter (autotuning there would be far too slow)
INTERPRET_CONFIG = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_K": 32, "GROUP_N": 2}

_BY_KERNEL = {
    "fwd": (FWD_CONFIGS_16, FWD_CONFIGS_32),
    "grad_logits": (GRAD_LOGITS_CONFIGS_16, GRAD_LOGITS_CONFIGS_32),
    "bwd": (BWD_CONFIGS_16, BWD_CONFIGS_32),
    "combine": (COMBINE_CONFIGS, COMBINE_CONFIGS),
}


def smem_estimate(kernel: str, cfg: triton.Config, elt: int) -> int:
    """Upper estimate of a config's shared memory: pipelined h and W tiles (+ G for "bwd");
    "combine": the scratch of its two cross-warp reductions (min/max over a token block)."""
    k = cfg.kwargs
    if kernel == "combine":
        return 2 * k["BLOCK_N"] * 4
    tiles = cfg.num_stages * (k["BLOCK_N"] + k["BLOCK_V"]) * k["BLOCK_K"] * elt
    return tiles + (k["BLOCK_N"] * k["BLOCK_V"] * 4 if kernel == "bwd" else 0)


def configs_for(kernel: str, dtype: torch.dtype, smem_limit: int | None = None
                ) -> list[triton.Config]:
    """The autotune configs a kernel ("fwd", "grad_logits", "bwd") can launch with for
    ``dtype`` on a device with ``smem_limit`` bytes of shared memory per block (None: all)."""
    return select_configs(_BY_KERNEL[kernel], smem_estimate, kernel, dtype, smem_limit)
