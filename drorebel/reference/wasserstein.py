"""Pure-PyTorch oracle of the Wasserstein (type-2) DRO-REBEL objective (full double backward).

First-order dual of the Wasserstein-2 ball of radius ρ around the empirical distribution
(Gao, Chen & Kleywegt 2017; DRO-REBEL §Wasserstein, arXiv 2509.19104):

    L_W = (1/n) Σ_i ℓ_i + ρ · sqrt( (1/n) Σ_i ‖∇_z ℓ_i‖² )

where z is the perturbed input of each sample (hidden states, token embeddings or features).
The penalty is differentiated with full second-order autograd (no stop-gradient): this module is
the slow, readable ground truth that the fused penalty is tested against. Being an oracle, it
imports nothing it checks (no ``drorebel.ops``/``losses``/``kernels``): production code has its
own ``per_sample_grad_sq_norms`` (``drorebel.ops.autograd_utils``). Only the data-parallel
helpers of ``drorebel.distributed`` (a utility, not something tested here) are shared.

Assumption (checked only through its consequence): ℓ_i depends on row i of every z tensor and on
no other row, so ``∇_{z[i]} Σ_j ℓ_j = ∇_{z[i]} ℓ_i`` and one ``autograd.grad`` of ``Σ ℓ`` yields all
per-sample gradients. Batch-coupled models (batch norm, attention across samples) violate it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from drorebel.distributed import data_parallel_info, dp_global_sum

__all__ = ["linear_logps_wgrad_reference", "per_sample_grad_sq_norms", "wasserstein_penalty",
           "wasserstein_rebel_objective"]

TensorOrSeq = torch.Tensor | Sequence[torch.Tensor]


def linear_logps_wgrad_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 temperature: float = 1.0, ignore_index: int = -100
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token ``(log p_y, q)`` from full ``[N, V]`` logits in the inputs' dtype,
    autograd-differentiable: ``z = W h / T``, ``q = ‖W_y − E_p[W]‖²`` (the squared norm of
    ``T·∇_h log p_y``, what the fused penalty op computes); ignored tokens give 0 for both."""
    z = hidden @ weight.t() / temperature
    ys = labels.clamp_min(0)
    d = weight[ys] - z.softmax(-1) @ weight
    ok = labels != ignore_index
    lp = z.log_softmax(-1).gather(-1, ys[:, None])[:, 0]
    return torch.where(ok, lp, 0.0), torch.where(ok, (d * d).sum(-1), 0.0)


def _as_list(z: TensorOrSeq) -> list[torch.Tensor]:
    zs = [z] if isinstance(z, torch.Tensor) else list(z)
    if not zs:
        raise ValueError("z must be a tensor or a non-empty sequence of tensors")
    for t in zs:
        if not t.requires_grad:
            raise ValueError("every z tensor must require grad and be used to compute losses")
    return zs


def per_sample_grad_sq_norms(losses: torch.Tensor, z: TensorOrSeq) -> torch.Tensor:
    """``g_i = ‖∇_z ℓ_i‖²`` summed over all z tensors, differentiable (``create_graph=True``).

    Args:
        losses: ``[n]`` per-sample losses built from ``z``.
        z: a tensor or a sequence of tensors whose leading dim indexes the sample (length n);
            ℓ_i must depend on row i only (see the module docstring).

    Returns:
        ``[n]`` squared gradient norms (dtype of the gradients), part of the autograd graph.
    """
    if losses.dim() != 1:
        raise ValueError(f"losses must be 1-D [n], got shape {tuple(losses.shape)}")
    zs = _as_list(z)
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


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (a subgradient) instead of inf·0 = NaN at x = 0."""
    pos = x > 0
    return torch.where(
        pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x)
    )


def wasserstein_penalty(
    losses: torch.Tensor,
    z: TensorOrSeq,
    rho: float,
    *,
    group: object | None = None,
    global_batch: bool = True,
) -> torch.Tensor:
    """``ρ · sqrt((1/n) Σ_i ‖∇_z ℓ_i‖²)`` with full second-order autograd (arXiv 2509.19104).

    Under data parallelism (``torch.distributed`` initialised, several ranks, ``global_batch``) the
    mean runs over the global batch: the value is the global penalty on every rank and the
    gradient is scaled so that DDP's averaging gives the exact single-process gradient.
    """
    if not rho >= 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    sq = per_sample_grad_sq_norms(losses, z)
    world, _ = data_parallel_info(group, global_batch)
    total = dp_global_sum(sq.sum(), group) if world > 1 else sq.sum()
    return rho * _safe_sqrt(total / (world * losses.shape[0]))


def wasserstein_rebel_objective(
    losses: torch.Tensor,
    z: TensorOrSeq,
    rho: float,
    *,
    group: object | None = None,
    global_batch: bool = True,
) -> torch.Tensor:
    """``L_W = (1/n) Σ ℓ_i + ρ·sqrt((1/n) Σ ‖∇_z ℓ_i‖²)`` (Wasserstein DRO-REBEL, arXiv 2509.19104).

    ``losses`` are the REBEL losses ``ℓ_i = Δ_i²`` (any per-sample loss works). Data parallel:
    global value on every rank, gradient exact after DDP averaging (see
    :func:`wasserstein_penalty`).
    """
    world, _ = data_parallel_info(group, global_batch)
    mean = losses.mean()
    if world > 1:
        mean = dp_global_sum(losses.sum(), group) / (world * losses.shape[0])
    return mean + wasserstein_penalty(losses, z, rho, group=group, global_batch=global_batch)
