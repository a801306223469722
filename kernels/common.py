"""Launcher utilities shared by the ``linear_logps`` and ``linear_wgrad`` launchers.

Config lists and their shared-memory filter (:func:`tile_config`, :func:`select_configs`,
:func:`device_smem_limit`, :func:`smem_pruner`), the ``EVEN_K`` heuristic, the ``tl.dot``
flags (:func:`dot_flags`), the interpreter/device checks (:func:`interpreting`,
:func:`check_launchable`) and the ``DROREBEL_AUTOTUNE`` switch (:func:`autotune_enabled`).
"""

from __future__ import annotations

import os

import torch
import triton

from drorebel.kernels.tiles import logit_tile

__all__ = [
    "EVEN_K_HEURISTIC",
    "autotune_enabled",
    "check_launchable",
    "device_smem_limit",
    "dot_flags",
    "interpreting",
    "select_configs",
    "smem_pruner",
    "tile_config",
]


def tile_config(bn: int, bv: int, bk: int, warps: int, stages: int, group: int | None = None,
                bd: int | None = None) -> triton.Config:
    """A tile config ``BLOCK_N/BLOCK_V/BLOCK_K`` (``GROUP_N``/``BLOCK_D`` only when given)."""
    kwargs = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}
    if group is not None:
        kwargs["GROUP_N"] = group
    if bd is not None:
        kwargs["BLOCK_D"] = bd
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def select_configs(lists: tuple[list[triton.Config], list[triton.Config]], estimate,
                   kernel: str, dtype: torch.dtype, smem_limit: int | None
                   ) -> list[triton.Config]:
    """The 16-bit or fp32 list of ``lists`` (``(16-bit, fp32)``) for ``dtype``, keeping the
    configs whose ``estimate(kernel, cfg, elt)`` fits ``smem_limit`` bytes (all when None;
    the first one if none fits)."""
    sixteen, thirty_two = lists
    configs = thirty_two if dtype == torch.float32 else sixteen
    if smem_limit is None:
        return configs
    elt = torch.finfo(dtype).bits // 8
    fits = [c for c in configs if estimate(kernel, c, elt) <= smem_limit]
    return fits or configs[:1]


def device_smem_limit(device: torch.device) -> int:
    """Shared memory per block (opt-in maximum) of a CUDA device, in bytes."""
    props = torch.cuda.get_device_properties(device)
    default = 232448 if props.major >= 9 else 166912
    return getattr(props, "shared_memory_per_block_optin", default) or default


def smem_pruner(configs_for_fn, kernel: str) -> dict:
    """``prune_configs_by`` of ``triton.autotune``: keep the configs ``configs_for_fn(kernel,
    dtype, device smem)`` allows (by identity) for the ``hidden_ptr`` argument's dtype/device."""
    def prune(configs, named_args, **kwargs):
        hidden = named_args["hidden_ptr"]
        allowed = configs_for_fn(kernel, hidden.dtype, device_smem_limit(hidden.device))
        return [c for c in configs if any(c is a for a in allowed)]

    return {"early_config_prune": prune}


# EVEN_K: the hidden size is a multiple of BLOCK_K (no K mask in the logit-tile loads)
EVEN_K_HEURISTIC = {"EVEN_K": lambda args: args["H"] % args["BLOCK_K"] == 0}


def dot_flags(dtype: torch.dtype, interpreting: bool) -> dict:
    """``tl.dot`` constexprs: fp32 operands (and bf16 upcast to fp32 under the interpreter,
    whose bf16 dot is wrong) use the exact "ieee" dot; 16-bit operands go to the tensor cores
    with fp32 accumulation (the "tf32" flag only matters for fp32 operands)."""
    upcast = interpreting and dtype == torch.bfloat16
    exact = dtype == torch.float32 or upcast
    return {"UPCAST_DOT": upcast, "DOT_PRECISION": "ieee" if exact else "tf32"}


def interpreting() -> bool:
    """True when the kernels were built for the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return type(logit_tile).__name__ == "InterpretedFunction"


def check_launchable(t: torch.Tensor, interpreted: bool) -> None:
    """Raise unless a kernel can run on ``t``'s device: CUDA, or the CPU when ``interpreted``
    (the value of :func:`interpreting`)."""
    if t.device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment before "
            "triton (or drorebel.kernels) is imported; use impl='torch' on the CPU instead"
        )
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"impl='triton' supports CUDA (and the CPU interpreter), got {t.device}")


def autotune_enabled() -> bool:
    """False when ``DROREBEL_AUTOTUNE=0``: launch the first config that fits, no autotuning."""
    return os.environ.get("DROREBEL_AUTOTUNE", "1") != "0"
