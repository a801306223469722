"""Launch configurations of the fused linear log-prob kernels (see ``linear_logprobs.py``).

Each GEMM kernel has a list for 16-bit inputs (tensor cores) and one for fp32 (exact "ieee"
dot: FMA, smaller tiles); the autotuner prunes them by the device's shared memory with
:func:`smem_estimate`, an upper bound that tests/test_kernels_aot.py checks against the
compiled kernels for sm_80 and sm_90. The config builder, the shared-memory filter and pruner,
``_EVEN_K`` and ``_dot_flags`` are also used by the ``linear_wgrad`` launchers.
"""

from __future__ import annotations

import torch
import triton

__all__ = [
    "BWD_CONFIGS",
    "COMBINE_CONFIGS",
    "FWD_CONFIGS",
    "GRAD_LOGITS_CONFIGS",
    "INTERPRET_CONFIG",
    "configs_for",
    "smem_estimate",
]


def _cfg(bn: int, bv: int, bk: int, warps: int, stages: int, group: int | None = None,
         bd: int | None = None) -> triton.Config:
    """A tile config (``GROUP_N``/``BLOCK_D`` only when given); shared with ``linear_wgrad``."""
    kwargs = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}
    if group is not None:
        kwargs["GROUP_N"] = group
    if bd is not None:
        kwargs["BLOCK_D"] = bd
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


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
    return _select_configs(_BY_KERNEL[kernel], smem_estimate, kernel, dtype, smem_limit)


def _select_configs(lists: tuple[list[triton.Config], list[triton.Config]], estimate,
                    kernel: str, dtype: torch.dtype, smem_limit: int | None
                    ) -> list[triton.Config]:
    """The 16-bit or fp32 list of ``lists`` for ``dtype``, keeping the configs whose
    ``estimate(kernel, cfg, elt)`` fits ``smem_limit`` (the first one if none fits); shared
    with ``linear_wgrad.configs_for``."""
    sixteen, thirty_two = lists
    configs = thirty_two if dtype == torch.float32 else sixteen
    if smem_limit is None:
        return configs
    elt = torch.finfo(dtype).bits // 8
    fits = [c for c in configs if estimate(kernel, c, elt) <= smem_limit]
    return fits or configs[:1]


def _device_smem_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    default = 232448 if props.major >= 9 else 166912
    return getattr(props, "shared_memory_per_block_optin", default) or default


def _smem_pruner(configs_for_fn, kernel: str) -> dict:
    """``prune_configs_by`` of ``triton.autotune``: keep the configs ``configs_for_fn(kernel,
    dtype, device smem)`` allows (by identity) for the ``hidden_ptr`` argument's dtype/device."""
    def prune(configs, named_args, **kwargs):
        hidden = named_args["hidden_ptr"]
        allowed = configs_for_fn(kernel, hidden.dtype, _device_smem_limit(hidden.device))
        return [c for c in configs if any(c is a for a in allowed)]

    return {"early_config_prune": prune}


# EVEN_K: the hidden size is a multiple of BLOCK_K (no K mask in the logit-tile loads)
_EVEN_K = {"EVEN_K": lambda args: args["H"] % args["BLOCK_K"] == 0}


def _dot_flags(dtype: torch.dtype, interpreting: bool) -> dict:
    """``tl.dot`` constexprs: fp32 operands (and bf16 upcast to fp32 under the interpreter,
    whose bf16 dot is wrong) use the exact "ieee" dot; 16-bit operands go to the tensor cores
    with fp32 accumulation (the "tf32" flag only matters for fp32 operands)."""
    upcast = interpreting and dtype == torch.bfloat16
    exact = dtype == torch.float32 or upcast
    return {"UPCAST_DOT": upcast, "DOT_PRECISION": "ieee" if exact else "tf32"}
