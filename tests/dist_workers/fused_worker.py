"""torchrun worker: the data-parallel fused loss equals one process on the union batch.

Launched by tests/test_fused_distributed.py as
``python -m torch.distributed.run --standalone --nproc_per_node 2 fused_worker.py OUT.json``.
Every rank builds the same union batch (float64, ``impl="torch"``), computes the single-process
fused loss on it with ``global_batch=False``, then the data-parallel loss on its own pairs.
The LM-head gradient is averaged over ranks (what DDP / ZeRO do); a hidden-state gradient is an
activation gradient, which is ``world ×`` the single-process one (the loss is scaled by world so
that the *averaged parameter* gradients are exact). Rank 0 writes the largest differences.
"""

from __future__ import annotations

import torch
from common import avg, gather, max_all, rank_slice, run

from drorebel.losses.fused_rebel import FusedLinearRebelLoss, fused_linear_rebel_loss

F64 = torch.float64
N_LOCAL, T, H, V, ETA = 3, 5, 8, 29, 5.0
MODES = {
    "none": ("none", {}),
    "chi2": ("chi2", {"rho": 0.35}),
    "kl_rho": ("kl", {"rho": 0.25}),
    "kl_tau": ("kl", {"tau": 3.0}),
}


def _union_batch(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(21)
    labels = torch.randint(0, V, (2, n, T), generator=g)
    labels[:, :, :2] = -100  # prompt
    labels[1, 0, 3:] = -100  # a short b-response
    return {
        "weight": torch.randn(V, H, generator=g, dtype=F64) * 0.2,
        "hidden": torch.randn(2, n, T, H, generator=g, dtype=F64),
        "labels": labels,
        "ref": 0.3 * torch.randn(2, n, generator=g, dtype=F64) - 10,
        "rewards": torch.randn(2, n, generator=g, dtype=F64),
    }


def _loss(batch, div, kw, global_batch: bool, form: str):
    w = batch["weight"].clone().requires_grad_()
    h = batch["hidden"].clone().requires_grad_()
    y, ref, rew = batch["labels"], batch["ref"], batch["rewards"]
    if form == "module":
        loss_fn = FusedLinearRebelLoss(ETA, div, impl="torch", global_batch=global_batch, **kw)
        out = loss_fn(h.flatten(0, 1), w, y.flatten(0, 1), rew.flatten(), ref.flatten())
    else:
        out = fused_linear_rebel_loss(h[0], h[1], w, y[0], y[1], ref[0], ref[1], rew[0], rew[1],
                                      eta=ETA, divergence=div, impl="torch",
                                      global_batch=global_batch, **kw)
    out.loss.backward()
    return out, w.grad, h.grad


def _compare(full, mine, div, kw, world, form) -> dict[str, float]:
    ref, ref_dw, ref_dh = _loss(full, div, kw, False, form)
    out, dw, dh = _loss(mine, div, kw, True, form)
    local_only, _, _ = _loss(mine, div, kw, False, form)
    res = {
        "loss": (avg(out.loss, world) - ref.loss).abs().item(),
        "weights": (gather(out.weights, world) - ref.weights).abs().max().item(),
        "dW": (avg(dw, world) - ref_dw).abs().max().item(),
        "dH": (gather(dh / world, world, dim=1) - ref_dh).abs().max().item(),
        "logps_a": (gather(out.policy_logps_a.detach(), world)
                    - ref.policy_logps_a).abs().max().item(),
        "grad_scale": min(ref_dw.abs().max().item(), ref_dh.abs().max().item()),
        "local_only_weights": max_all(local_only.weights - out.weights),
        "weight_max": ref.weights.max().item(),
    }
    for k, v in ref.metrics.items():
        res[f"metric:{k}"] = (out.metrics[k] - v).abs().item()
    return res


def main(world: int, rank: int) -> dict[str, object]:
    full = _union_batch(world * N_LOCAL)
    mine = rank_slice(full, rank, N_LOCAL, shared=("weight",), dim=1)
    report: dict[str, object] = {"world": world}
    for name, (div, kw) in MODES.items():
        for form in ("functional", "module"):
            report[f"{name}/{form}"] = _compare(full, mine, div, kw, world, form)
    return report


if __name__ == "__main__":
    run(main, check_sizes=False)  # the library default: no size check, no extra host sync
