"""DeepSpeed ZeRO-3 worker: train tiny causal LMs with the fused REBEL loss on 2 CPU ranks.

Launched by tests/test_zero3_fused.py as ``deepspeed --num_gpus 2 zero3_worker.py IN.pt OUT.pt``
(gloo). ``IN.pt`` holds, per case, a pickled model (identical on both ranks), the loss
settings, the union batch (stacked ``[a; b]``), the number of SGD steps and the learning rate.
Every rank trains ``CausalLMWithFusedLoss(model, FusedLinearRebelLoss(...))`` under ZeRO-3
(every parameter partitioned: persistence threshold 0; gradient clipping off) on its own
pairs; rank 0 saves the rank-averaged loss of every step, the gathered final parameters, and
what the LM head looks like outside a forward (the empty shard).
"""

from __future__ import annotations

import sys

import deepspeed
import torch
import torch.distributed as dist
from common import finish

from drorebel.losses.fused_rebel import FusedLinearRebelLoss
from drorebel.losses.zero3 import CausalLMWithFusedLoss, is_zero3_partitioned


def ds_config(local_pairs: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": local_pairs,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }


def local_rows(batch: dict, rank: int, world: int) -> dict:
    """This rank's pairs of a stacked [a; b] batch, still stacked [a_local; b_local]."""
    n = batch["input_ids"].shape[0] // 2
    lo, hi = rank * n // world, (rank + 1) * n // world
    return {k: torch.cat([v[lo:hi], v[n + lo: n + hi]]) for k, v in batch.items()}


def train(case: dict, rank: int, world: int) -> dict:
    loss = FusedLinearRebelLoss(impl="torch", **case["loss"])
    wrapper = CausalLMWithFusedLoss(case["model"], loss)
    batch = local_rows(case["batch"], rank, world)
    opt = torch.optim.SGD(wrapper.parameters(), lr=case["lr"])
    engine, _, _, _ = deepspeed.initialize(model=wrapper, optimizer=opt,
                                           config=ds_config(batch["rewards"].shape[0] // 2))
    head = wrapper.lm_head_weight
    seen = {"partitioned": is_zero3_partitioned(head), "numel_outside_forward": head.numel(),
            "ds_numel": getattr(head, "ds_numel", -1)}
    losses, weights = [], []
    for _ in range(case["steps"]):
        out = engine(**batch)
        engine.backward(out["loss"])
        engine.step()
        total = out["loss"].detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
        parts = [torch.empty_like(out["weights"]) for _ in range(world)]
        dist.all_gather(parts, out["weights"].detach().contiguous())
        weights.append(torch.cat(parts))
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        final = {n: p.detach().clone() for n, p in engine.module.model.named_parameters()}
    return {"losses": losses, "weights": weights, "params": final, "seen": seen}


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    src, dst = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # launcher's flag
    cases = torch.load(src, weights_only=False)
    results = {name: train(case, rank, world) for name, case in cases.items()}
    if rank == 0:
        torch.save(results, dst)
    dist.barrier()
    dist.destroy_process_group()
    finish()  # no interpreter finalization: it can abort a finished rank (common.finish)


if __name__ == "__main__":
    main()
