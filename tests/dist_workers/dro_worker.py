"""torchrun worker: data-parallel DRO-REBEL must equal one process on the union batch.

Launched by tests/test_distributed_dro.py as
``python -m torch.distributed.run --standalone --nproc_per_node 2 dro_worker.py OUT.json``.
Every rank builds the same union batch, computes the single-process reference on it with
``global_batch=False``, then the data-parallel version on its own slice; gradients are averaged
with an all-reduce (what DDP does). Rank 0 writes the largest differences to ``OUT.json``.
"""

from __future__ import annotations

import torch
from common import avg, gather, rank_slice, run

from drorebel.losses.dro import dro_weights, robust_objective
from drorebel.losses.rebel import rebel_loss
from drorebel.reference.wasserstein import wasserstein_rebel_objective

F64 = torch.float64
N_LOCAL, DIM = 4, 5
MODES = {
    "none": ("none", {}),
    "chi2": ("chi2", {"rho": 0.35}),
    "kl_rho": ("kl", {"rho": 0.25}),
    "kl_tau": ("kl", {"tau": 0.6}),
    # group-level balls: groups that span both ranks (gathered with the statistics)
    "group_chi2": ("chi2", {"rho": 0.35, "groups": True}),
    "group_kl": ("kl", {"rho": 0.25, "groups": True}),
}


def _union_batch(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)
    return {
        "feats_a": mk(n, DIM),
        "feats_b": mk(n, DIM),
        "ref_logps_a": mk(n) - 10,
        "ref_logps_b": mk(n) - 10,
        "rewards_a": mk(n),
        "rewards_b": mk(n),
        "theta": mk(DIM),
        "groups": torch.tensor([0, 1, 0, 2, 1, 1, 0, 2] * (n // 8) + [3] * (n % 8)),
    }


def _loss(batch: dict[str, torch.Tensor], div: str, kw: dict, global_batch: bool):
    kw = dict(kw)
    if kw.pop("groups", False):
        kw["groups"] = batch["groups"]
    theta = batch["theta"].clone().requires_grad_()
    la = torch.tanh(batch["feats_a"] @ theta) * 3 - 10
    lb = torch.tanh(batch["feats_b"] @ theta) * 3 - 10
    out = rebel_loss(
        la,
        lb,
        batch["ref_logps_a"],
        batch["ref_logps_b"],
        batch["rewards_a"],
        batch["rewards_b"],
        eta=0.5,
        divergence=div,
        global_batch=global_batch,
        **kw,
    )
    (grad,) = torch.autograd.grad(out.loss, theta)
    return out, grad


def _compare_mode(full, mine, div, kw, world) -> dict[str, float]:
    ref, ref_grad = _loss(full, div, kw, global_batch=False)
    out, grad = _loss(mine, div, kw, global_batch=True)
    local_only, _ = _loss(mine, div, kw, global_batch=False)
    res = {
        "weights": (gather(out.weights, world) - ref.weights).abs().max().item(),
        "loss": (avg(out.loss, world) - ref.loss).abs().item(),
        "grad": (avg(grad, world) - ref_grad).abs().max().item(),
        "grad_scale": ref_grad.abs().max().item(),
        "local_only_weights": (local_only.weights - out.weights).abs().max().item(),
        "metric_keys_equal": float(set(out.metrics) == set(ref.metrics)),
    }
    for k, v in ref.metrics.items():
        same_inf = bool(torch.isinf(v)) and v.item() == out.metrics[k].item()
        res[f"metric:{k}"] = 0.0 if same_inf else (out.metrics[k] - v).abs().item()
    return res


def _objectives(full, mine, world) -> dict[str, float]:
    """robust_objective and the Wasserstein oracle: global value, exact averaged gradient."""
    res = {}
    for name, fn in (
        ("robust_chi2", lambda ell, z, gb: robust_objective(ell, "chi2", 0.35, global_batch=gb)),
        (
            "wasserstein",
            lambda ell, z, gb: wasserstein_rebel_objective(ell, z, 0.4, global_batch=gb),
        ),
    ):
        vals, grads = [], []
        for batch, gb in ((full, False), (mine, True)):
            theta = batch["theta"].clone().requires_grad_()
            z = batch["feats_a"].clone().requires_grad_()
            ell = (z @ theta - batch["rewards_a"]) ** 2
            value = fn(ell, z, gb)
            vals.append(value.detach())
            grads.append(torch.autograd.grad(value, theta)[0])
        res[f"{name}:value"] = (vals[1] - vals[0]).abs().item()
        res[f"{name}:grad"] = (avg(grads[1], world) - grads[0]).abs().max().item()
    return res


def _unequal_sizes_message(rank: int) -> str:
    ell = torch.rand(3 if rank == 1 else 4, dtype=F64)
    try:
        dro_weights(ell, "chi2", rho=0.2)
    except ValueError as err:
        return str(err)
    return ""


def main(world: int, rank: int) -> dict[str, object]:
    full = _union_batch(world * N_LOCAL)
    mine = rank_slice(full, rank, N_LOCAL, shared=("theta",))
    report: dict[str, object] = {"world": world}
    for name, (div, kw) in MODES.items():
        report[name] = _compare_mode(full, mine, div, kw, world)
    report["objectives"] = _objectives(full, mine, world)
    report["unequal_sizes"] = _unequal_sizes_message(rank)
    return report


if __name__ == "__main__":
    run(main)
