"""torchrun worker: data-parallel fused Wasserstein REBEL equals one process on the union batch.

Launched by tests/test_wasserstein_fused.py with 2 ranks (gloo, CPU, float64). Every rank builds
the same union batch, computes the single-process loss on it (``global_batch=False``) and the
data-parallel loss on its slice. Parameter gradients (W) are averaged as DDP would; the hidden
gradients are per-rank activations, which DDP's averaging divides by the world size, so
``dH_local / world`` must equal the reference rows. Rank 0 writes the largest differences.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import rank_slice, run

from drorebel.losses.wasserstein import fused_linear_wasserstein_rebel_loss

F64 = torch.float64
N_LOCAL, T, H, V = 3, 4, 5, 9


def _union(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(21)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    ya, yb = (torch.randint(0, V, (n, T), generator=g) for _ in range(2))
    ya[:, 0] = -100
    return {"w": mk(V, H), "ha": mk(n, T, H), "hb": mk(n, T, H), "ya": ya, "yb": yb,
            "ref_a": mk(n) - 4, "ref_b": mk(n) - 4, "ra": mk(n), "rb": mk(n)}


def _run(b: dict[str, torch.Tensor], global_batch: bool):
    w, ha, hb = (b[k].clone().requires_grad_() for k in ("w", "ha", "hb"))
    out = fused_linear_wasserstein_rebel_loss(
        ha, hb, w, b["ya"], b["yb"], b["ref_a"], b["ref_b"], b["ra"], b["rb"], eta=0.7, rho=0.6,
        global_batch=global_batch)
    return out, torch.autograd.grad(out.loss, (w, ha, hb))


def main(world: int, rank: int) -> dict[str, object]:
    full = _union(world * N_LOCAL)
    lo, hi = rank * N_LOCAL, (rank + 1) * N_LOCAL
    mine = rank_slice(full, rank, N_LOCAL, shared=("w",))
    ref, (rw, rha, rhb) = _run(full, False)
    out, (dw, dha, dhb) = _run(mine, True)
    dist.all_reduce(dw)
    res = {
        "world": world,
        "value": (out.loss.detach() - ref.loss.detach()).abs().item(),
        "dW": (dw / world - rw).abs().max().item(),
        "dHa": (dha / world - rha[lo:hi]).abs().max().item(),
        "dHb": (dhb / world - rhb[lo:hi]).abs().max().item(),
        "grad_scale": rw.abs().max().item(),
        "penalty_scale": ref.metrics["wasserstein/penalty"].item(),
    }
    for k, v in ref.metrics.items():
        res[f"metric:{k}"] = (out.metrics[k] - v).abs().item()
    errs = torch.tensor([max(v for k, v in res.items() if k not in ("world", "grad_scale",
                                                                    "penalty_scale"))], dtype=F64)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    res["max_err_all_ranks"] = errs.item()
    return res


if __name__ == "__main__":
    run(main)
