"""``DroRebelTRLTrainer`` (examples/trl_rebel.py's tiny set-up, χ², 3 steps) on 4 pairs per step:
one process with 4 pairs, or under ``torchrun --nproc_per_node 2`` (DDP over gloo, HF Trainer /
accelerate) with 2 pairs per rank. Rank 0 saves the logged losses and the final parameters to
``argv[1]`` (torch.save) for tests/test_integration_trl.py to compare.

    python trl_worker.py OUT.pt            # one process
    torchrun --nproc_per_node 2 trl_worker.py OUT.pt
    deepspeed --num_gpus 2 --no_local_rank trl_worker.py OUT.pt DS_CONFIG.json   # ZeRO
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from common import finish
from load_path import ROOT, load_module

PAIRS_PER_STEP = 4


def main() -> None:
    ex = load_module(ROOT / "examples" / "trl_rebel.py", "drorebel_example_trl_rebel")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"deepspeed": sys.argv[2]} if len(sys.argv) > 2 else {}
        trainer = ex.make_trainer(tmp, 3, "chi2", 0.5, batch_size=PAIRS_PER_STEP // world,
                                  **extra)
        trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    params = dict(trainer.model.named_parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params.values()):  # ZeRO-3 shards: gather them
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(params.values()))
    with gather:
        full = {k: v.detach().clone() for k, v in params.items()}
    if trainer.args.process_index == 0:
        torch.save({"world": world, "losses": [e["loss"] for e in logs],
                    "weight_max": [e["dro/weight_max"] for e in logs], "params": full},
                   sys.argv[1])
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    finish()  # no interpreter finalization: it can abort a finished rank (common.finish)


if __name__ == "__main__":
    main()
