"""Autograd helpers of the Wasserstein penalties (production; the test oracle in
``drorebel.reference.wasserstein`` has its own independent implementation).

The first-order Wasserstein DRO penalty (Gao, Chen & Kleywegt 2017; DRO-REBEL §Wasserstein,
arXiv 2509.19104) is ``ρ · sqrt((1/n) Σ_i ‖∇_z ℓ_i‖²)``:

* :func:`per_sample_grad_sq_norms`: ``g_i = ‖∇_z ℓ_i‖²`` for every sample with ONE
  ``autograd.grad`` of ``Σ_i ℓ_i`` (``create_graph=True``, so the penalty is differentiable);
  valid when ℓ_i depends on row i of every z tensor and on no other row, so that
  ``∇_{z[i]} Σ_j ℓ_j = ∇_{z[i]} ℓ_i`` (batch-coupled models violate it);
* :func:`safe_sqrt`: ``sqrt`` with gradient 0 (a subgradient) at 0 instead of ``inf·0 = NaN``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["per_sample_grad_sq_norms", "safe_sqrt"]


def per_sample_grad_sq_norms(losses: torch.Tensor,
                             z: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """``g_i = ‖∇_z ℓ_i‖²`` summed over all z tensors, differentiable (``create_graph=True``).

    Args:
        losses: ``[n]`` per-sample losses built from ``z``.
        z: a tensor or a non-empty sequence of tensors that require grad, whose leading dim
            indexes the sample (length n); ℓ_i must depend on row i only (module docstring).

    Returns:
        ``[n]`` squared gradient norms in ``losses``' dtype, part of the autograd graph.
    """
    if losses.dim() != 1:
        raise ValueError(f"losses must be 1-D [n], got shape {tuple(losses.shape)}")
    zs = [z] if isinstance(z, torch.Tensor) else list(z)
    if not zs:
        raise ValueError("z must be a tensor or a non-empty sequence of tensors")
    if not all(t.requires_grad for t in zs):
        raise ValueError("every z tensor must require grad and be used to compute losses")
    n = losses.shape[0]
    for t in zs:
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(f"each z tensor needs leading dim n={n}, got shape {tuple(t.shape)}")
    grads = torch.autograd.grad(losses.sum(), zs, create_graph=True, allow_unused=True)
    total = losses.new_zeros(n)
    for g in grads:
        if g is not None:
            total = total + g.reshape(n, -1).pow(2).sum(dim=1).to(total.dtype)
    return total


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` for ``x > 0`` and 0 elsewhere, with gradient 0 (a subgradient) instead of
    ``inf·0 = NaN`` at ``x = 0``."""
    pos = x > 0
    return torch.where(
        pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x)
    )
