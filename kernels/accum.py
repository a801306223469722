"""fp32 GEMM accumulation shared by the chunked PyTorch paths and the Triton launchers.

    acc += a @ b        (acc fp32 or float64; a, b in the input dtype)

The vocabulary- or token-chunked backward passes (``drorebel.ops.chunked``,
``drorebel.ops.wgrad_chunked``, ``drorebel.kernels.linear_logps``/``linear_wgrad``) add one
GEMM per chunk into a wide accumulator, e.g. ``dW += G_c^T h_c`` or ``dH += G_c W_c``. Rounding
each chunk's product to bf16 before adding would lose the low bits of the running sum, so the
accumulator stays fp32 and, on CUDA, the GEMM itself accumulates in fp32 and writes fp32
(``aten::addmm.dtype_out``, torch ≥ 2.6) without an fp32 copy of its 16-bit operands.
Elsewhere (CPU, older torch) the operands are upcast to the accumulator's dtype.

Pure torch (no triton import), so the CPU paths in ``drorebel.ops`` can use it without Triton.
"""

from __future__ import annotations

import torch

__all__ = ["addmm_acc"]


def _has_mixed_addmm() -> bool:
    return hasattr(torch.ops.aten.addmm, "dtype_out")


def addmm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """In place ``acc += a @ b`` with accumulation in ``acc.dtype`` (fp32 or float64).

    Args:
        acc: [M, K] accumulator (fp32 or float64), updated in place.
        a: [M, J] operand (any float dtype; a transposed view is fine, e.g. ``g.t()``).
        b: [J, K] operand, same dtype as ``a``.
    """
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and a.dtype == b.dtype and _has_mixed_addmm():
        torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
