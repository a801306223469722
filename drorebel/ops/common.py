"""Pieces shared by the fused ops' entry points (``linear_logps``, ``linear_logps_wgrad``,
``linear_sequence_logps``): argument validation, the ``impl`` choice and the op-input prologue.

* :func:`validate_inputs`: shapes, dtypes, devices, ``ignore_index`` and ``temperature`` of a
  ``(hidden [..., H], weight [V, H], labels [...])`` call, with readable errors;
* :func:`resolve_impl`: ``"auto"`` → ``"triton"`` for CUDA tensors of a kernel dtype,
  ``"torch"`` (chunked path) otherwise; ``"materialized"``: full logits (the baseline);
* :func:`op_inputs`: row-major ``hidden``/``weight`` and contiguous ``labels`` for the kernels,
  plus (forward ops) the label-value check ``labels ∈ [0, V) ∪ {ignore_index}``;
* :func:`check_softmax_cache` / :func:`softmax_cache_bytes` / :func:`cache_rows_for`: the
  ``softmax_cache`` knob (a byte budget, or ``"auto"``) and the token rows it covers.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from drorebel.kernels.softmax_cache import cache_rows

__all__ = ["AUTO_CACHE_CPU_CAP", "IMPLS", "KERNEL_DTYPES", "cache_rows_for",
           "check_softmax_cache", "op_inputs", "resolve_impl", "softmax_cache_bytes",
           "validate_inputs"]

IMPLS = ("auto", "triton", "torch", "materialized")
# dtypes the Triton kernels take (the chunked torch path takes float64 as well)
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def resolve_impl(impl: str, hidden: Tensor) -> str:
    """The implementation that runs, one rule for every op: ``"auto"`` is ``"triton"`` for CUDA
    tensors of a kernel dtype, else ``"torch"`` (the chunked path: the CPU, and float64
    everywhere); ``"materialized"`` is the full-logits baseline."""
    if impl == "auto":
        cuda = hidden.device.type == "cuda" and hidden.dtype in KERNEL_DTYPES
        return "triton" if cuda else "torch"
    return impl


def _check_label_values(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Labels must lie in [0, V) unless they equal ``ignore_index`` (no host sync on CUDA)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if labels.is_cuda:
        torch._assert_async(
            ~bad.any(), f"labels: values must lie in [0, {vocab}) or equal ignore_index"
        )
    elif bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels: values must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"found {first}"
        )


def _rowmajor(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def op_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Row-major ``hidden``/``weight`` and contiguous ``labels`` for the kernels; the forward
    ops pass ``ignore_index`` to check the label values as well."""
    if ignore_index is not None:
        _check_label_values(labels, weight.shape[0], ignore_index)
    return _rowmajor(hidden), _rowmajor(weight), labels.contiguous()


def validate_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                    temperature: float, impl: str) -> None:
    """Raise ``ValueError``/``TypeError`` naming the offending argument unless ``hidden
    [..., H]``, ``weight [V, H]`` and ``labels`` (``hidden``'s leading shape, int64/int32) share
    a dtype the chosen ``impl`` supports and one device, ``ignore_index`` is an int and
    ``temperature`` a finite number > 0."""
    if impl not in IMPLS:
        raise ValueError(f"impl: must be one of {IMPLS}, got {impl!r}")
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden: expected [..., H] with H = weight.shape[1] = {weight.shape[1]}, "
                         f"got shape {tuple(hidden.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden without its "
                         f"last dim), got {tuple(labels.shape)}")
    allowed = KERNEL_DTYPES + ((torch.float64,) if resolve_impl(impl, hidden) != "triton"
                               else ())
    if hidden.dtype not in allowed:
        raise TypeError(f"hidden: dtype must be one of {allowed} for impl={impl!r}, "
                        f"got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} must equal hidden's dtype {hidden.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels: dtype must be int64 or int32, got {labels.dtype}")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(f"hidden, weight, labels: must share one device, got {hidden.device}, "
                         f"{weight.device}, {labels.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")


# "auto" softmax cache: this share of the free device memory (CUDA) or of the available RAM
# (CPU, capped at AUTO_CACHE_CPU_CAP): the rest of the step (dW, dH, the model's backward)
# still needs room after the head's forward
AUTO_CACHE_FRACTION = 0.25
AUTO_CACHE_CPU_CAP = 4 * 2**30


def check_softmax_cache(softmax_cache: int | str) -> int | str:
    """Return ``softmax_cache`` if it is an int >= 0 (bytes) or ``"auto"``, else raise."""
    if softmax_cache == "auto":
        return softmax_cache
    if isinstance(softmax_cache, bool) or not isinstance(softmax_cache, int) or softmax_cache < 0:
        raise ValueError(f"softmax_cache: expected a byte budget (int >= 0) or 'auto', got "
                         f"{softmax_cache!r}")
    return softmax_cache


def _available_ram() -> int:
    try:
        import psutil
    except ImportError:
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
        return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages > 0 else 0
    return int(psutil.virtual_memory().available)


def softmax_cache_bytes(softmax_cache: int | str, device: torch.device) -> int:
    """Byte budget of the softmax cache: the int itself, or for ``"auto"`` a quarter of the
    free memory of a CUDA device (``torch.cuda.mem_get_info``) or of the available RAM,
    capped at 4 GiB, on the CPU."""
    check_softmax_cache(softmax_cache)
    if softmax_cache != "auto":
        return int(softmax_cache)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * AUTO_CACHE_FRACTION)
    return int(min(AUTO_CACHE_CPU_CAP, _available_ram() * AUTO_CACHE_FRACTION))


def cache_rows_for(softmax_cache: int | str, hidden: Tensor, weight: Tensor) -> int:
    """Token rows of ``hidden [N, H]`` whose softmax the forward keeps: what the budget holds
    at ``V`` values per row (bf16 for bf16 inputs, else fp32/float64), 0 when no gradient
    will flow (``torch.no_grad`` or inputs without ``requires_grad``: nothing to cache for)."""
    if softmax_cache == 0:
        return 0
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:
        return 0
    budget = softmax_cache_bytes(softmax_cache, hidden.device)
    return cache_rows(budget, hidden.shape[0], weight.shape[0], hidden.dtype)
