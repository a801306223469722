"""Training entry point: offline DRO-REBEL on one process, torchrun DDP or DeepSpeed ZeRO-2/3.

:func:`train` dispatches on ``cfg.mode``: ``online`` goes to :mod:`drorebel.trainer.online`,
``offline`` (a dataset of scored pairs) runs here. The data order is a function of the seed
and the step only, and rank ``r`` takes slice ``r`` of each global micro-batch, so a resumed
run — or a run on another number of ranks — sees exactly the batches of an uninterrupted
single-process run. The step loop itself is :func:`drorebel.trainer.driver.drive`.
"""

from __future__ import annotations

import torch

from drorebel.trainer.batch import PairBatch
from drorebel.trainer.config import TrainConfig
from drorebel.trainer.data import PairBatchData, load_rows, normalise_rows, tokenise_pairs
from drorebel.trainer.driver import (
    BatchOrigin,
    TrainingDiverged,
    TrainResult,
    drive,
    maybe_resume,
    prepare_run,
    reference_logps,
    seed_all,
)
from drorebel.trainer.engine import create_engine
from drorebel.trainer.model import load_tokenizer
from drorebel.trainer.online import train_online

__all__ = ["TrainingDiverged", "TrainResult", "train", "train_offline", "micro_batch",
           "REFERENCE_CHUNK"]

REFERENCE_CHUNK = 64  # pairs per forward when the initial policy scores the dataset


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; returns where the outputs went.

    Under ``torchrun``/``deepspeed`` every rank calls it; rank 0 writes metrics and the model.
    """
    if cfg.mode == "online":  # sample pairs from the policy
        return train_online(cfg)
    return train_offline(cfg)


def train_offline(cfg: TrainConfig) -> TrainResult:
    """Offline DRO-REBEL on the pairs of ``cfg.train_file``."""
    cfg.check_paths()
    run = prepare_run(cfg)  # output_dir / resume checks, before the model loads
    seed_all(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    by_group = cfg.dro_over == "groups"  # the `group` column: checked, carried to the loss
    rows = normalise_rows(load_rows(cfg.train_file, "train_file", cfg.train_split,
                                    cfg.column_map), groups=by_group)
    data = tokenise_pairs(rows, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.overlong,
                          pairs_per_step=cfg.batch_size * cfg.grad_accum, groups=by_group)
    engine = create_engine(cfg)
    if (data.n_truncated or data.n_dropped) and engine.rank == 0:
        print(f"[drorebel] prompts over max_prompt_length={cfg.max_prompt_length}: "
              f"{data.n_truncated} truncated, {data.n_dropped} dropped")
    if data.ref_a is None:  # reference = the initial policy, computed once before any update
        engine.eval()  # ZeRO-3 safe: every rank scores every pair
        data.ref_a, data.ref_b = reference_logps(engine.initial_logps, data, REFERENCE_CHUNK)
    engine.train()
    start, _ = maybe_resume(cfg, engine, run)
    kept = list(getattr(data, "kept", None) or range(len(data)))

    def batches(step: int) -> tuple[list[PairBatch], dict, None, BatchOrigin]:
        first = step * cfg.grad_accum

        def rows(m: int) -> list[int]:  # source rows of global micro-batch m (0-based)
            return [kept[i] for i in _batch_indices(len(data), cfg.batch_size, cfg.seed,
                                                    first + m).tolist()]

        micro = [micro_batch(data, cfg, first + m, engine.rank, engine.world_size)
                 for m in range(cfg.grad_accum)]
        return micro, {}, None, BatchOrigin(f"rows {{}} of {cfg.train_file}", rows,
                                             cfg.grad_accum)

    return drive(cfg, engine, tokenizer, start, batches, (data.n_truncated, data.n_dropped),
                 run)


def _batch_indices(n: int, batch_size: int, seed: int, micro: int) -> torch.Tensor:
    """Indices of micro-batch ``micro`` in the stream of seeded per-epoch permutations."""
    pos = torch.arange(micro * batch_size, (micro + 1) * batch_size)
    out = torch.empty_like(pos)
    for epoch in pos.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        sel = pos // n == epoch
        out[sel] = perm[pos[sel] % n]
    return out


def micro_batch(data: PairBatchData, cfg: TrainConfig, micro: int, rank: int = 0,
                world_size: int = 1) -> PairBatch:
    """Rank ``rank``'s contiguous ``batch_size / world_size`` pairs of global micro-batch
    ``micro`` (so the ranks' slices, in rank order, are the single-process micro-batch)."""
    idx = _batch_indices(len(data), cfg.batch_size, cfg.seed, micro)
    share = cfg.batch_size // world_size
    return PairBatch.select(data, idx[rank * share:(rank + 1) * share])
