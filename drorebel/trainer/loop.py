"""Offline DRO-REBEL training loop on one process, torchrun DDP or DeepSpeed ZeRO-2/3.

Each optimiser step takes ``grad_accum`` global micro-batches of ``batch_size`` pairs and
minimises ``L = Σ_i p_i.detach()·Δ_i²`` (DRO-REBEL, arXiv 2509.19104; REBEL, arXiv 2404.16767)
with the DRO weights over each *global* micro-batch (all ranks' pairs; see
:mod:`drorebel.trainer.engine`). The data order is a function of the seed and the step only,
and rank ``r`` takes slice ``r`` of each global micro-batch, so a resumed run — or a run on
another number of ranks — sees exactly the batches of an uninterrupted single-process run.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from drorebel.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from drorebel.trainer.config import TrainConfig
from drorebel.trainer.data import PairBatchData, load_rows, normalise_rows, tokenise_pairs
from drorebel.trainer.engine import Engine, TrainingDiverged, create_engine
from drorebel.trainer.metrics import MetricsLogger, to_floats
from drorebel.trainer.model import load_tokenizer, sequence_logps_of

__all__ = ["MicroBatch", "TrainingDiverged", "TrainResult", "train", "run_step", "drive",
           "micro_batch", "maybe_resume"]

# CPU tensors of this rank's share (b pairs): ids_a, mask_a, labels_a, ids_b, mask_b, labels_b
# [b, T]; ref_a, ref_b, rewards_a, rewards_b [b]
MicroBatch = dict[str, torch.Tensor]
_FIELDS = ("ids_a", "mask_a", "labels_a", "ids_b", "mask_b", "labels_b", "ref_a", "ref_b",
           "rewards_a", "rewards_b")


@dataclass
class TrainResult:
    steps: int
    final_dir: str
    metrics_path: str
    n_truncated: int
    n_dropped: int


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; returns where the outputs went.

    Under ``torchrun``/``deepspeed`` every rank calls it; rank 0 writes metrics and the model.
    """
    if cfg.mode == "online":  # sample pairs from the policy: drorebel.trainer.online
        from drorebel.trainer.online import train_online

        return train_online(cfg)
    cfg.check_paths()
    _seed_all(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    rows = normalise_rows(load_rows(cfg.train_file))
    data = tokenise_pairs(rows, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.overlong)
    engine = create_engine(cfg)
    if (data.n_truncated or data.n_dropped) and engine.rank == 0:
        print(f"[drorebel] prompts over max_prompt_length={cfg.max_prompt_length}: "
              f"{data.n_truncated} truncated, {data.n_dropped} dropped")
    if data.ref_a is None:  # reference = the initial policy, computed once before any update
        data.ref_a, data.ref_b = _engine_reference_logps(engine, data)
    engine.train()
    start, _ = maybe_resume(cfg, engine)
    def batches(step: int) -> tuple[list[MicroBatch], dict, dict | None]:
        return ([micro_batch(data, cfg, step * cfg.grad_accum + m, engine.rank,
                             engine.world_size) for m in range(cfg.grad_accum)], {}, None)

    return drive(cfg, engine, tokenizer, start, batches, (data.n_truncated, data.n_dropped))


StepBatches = Callable[[int], "tuple[list[MicroBatch], dict, dict | None]"]


def drive(cfg: TrainConfig, engine: Engine, tokenizer: Any, start: int, batches: StepBatches,
          counts: tuple[int, int]) -> TrainResult:
    """The step loop shared by offline and online training.

    ``batches(step)`` gives this rank's micro-batches of ``step``, extra metrics to log and the
    caller's state to store in a checkpoint (or None). Steps ``start … end−1`` run, metrics go to
    ``metrics.jsonl`` (rank 0), checkpoints every ``save_steps`` and at the end; a complete run
    saves ``output_dir/final`` with ``save_pretrained``. ``counts`` = (truncated, dropped) prompts.
    """
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    tb_dir = os.path.join(cfg.output_dir, "tensorboard") if cfg.tensorboard else None
    logger = (MetricsLogger(metrics_path, start, cfg.max_steps, cfg.progress, tb_dir)
              if engine.rank == 0 else None)
    end = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    try:
        for step in range(start, end):
            micro, extra_metrics, extra_state = batches(step)
            # the loss's own metrics win a name clash (online DPO: rewards/chosen is DPO's
            # implicit reward, as in TRL, not the sampled response's score)
            metrics = {**extra_metrics, **run_step(engine, micro, cfg, step)}
            if logger and ((step + 1) % cfg.log_steps == 0 or step + 1 == cfg.max_steps):
                logger.log(step + 1, metrics)
            if (cfg.save_steps and (step + 1) % cfg.save_steps == 0) or step + 1 == end:
                save_checkpoint(cfg.output_dir, step + 1, engine, cfg.fingerprint(),
                                cfg.save_total_limit, extra_state=extra_state)
    finally:
        if logger:
            logger.close()
    if end < cfg.max_steps:
        return TrainResult(end, "", metrics_path, *counts)
    final = os.path.join(cfg.output_dir, "final")
    engine.save_pretrained(final, tokenizer)
    return TrainResult(end, final, metrics_path, *counts)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002
    torch.manual_seed(seed)


def maybe_resume(cfg: TrainConfig, engine: Engine) -> tuple[int, dict | None]:
    """``(step, extra_state)`` restored per ``cfg.resume`` (``(0, None)`` for a fresh start)."""
    if cfg.resume is None:
        return 0, None
    path = latest_checkpoint(cfg.output_dir) if cfg.resume == "auto" else cfg.resume
    if path is None:
        return 0, None  # "auto" with nothing saved yet: a fresh start
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume: checkpoint {path!r} does not exist")
    step, extra = load_checkpoint(path, engine, cfg.fingerprint())
    if engine.rank == 0:
        print(f"[drorebel] resumed from {path} at step {step}")
    return step, extra


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
                world_size: int = 1) -> MicroBatch:
    """Rank ``rank``'s contiguous ``batch_size / world_size`` pairs of global micro-batch
    ``micro`` (so the ranks' slices, in rank order, are the single-process micro-batch)."""
    idx = _batch_indices(len(data), cfg.batch_size, cfg.seed, micro)
    share = cfg.batch_size // world_size
    idx = idx[rank * share:(rank + 1) * share]
    return {key: getattr(data, key)[idx] for key in _FIELDS}


@torch.no_grad()
def _reference_logps(model: torch.nn.Module, data: PairBatchData, cfg: TrainConfig,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of a plain (not ZeRO-3) model, in chunks of 64 (float64, CPU)."""
    model.eval()
    return _chunked(data, lambda i, m, y: sequence_logps_of(
        model, i.to(device), m.to(device), y.to(device), cfg.temperature))


def _engine_reference_logps(engine: Engine, data: PairBatchData
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`_reference_logps` through the engine (ZeRO-3 safe; every rank does all)."""
    engine.eval()
    return _chunked(data, engine.sequence_logps)


def _chunked(data: PairBatchData, fn) -> tuple[torch.Tensor, torch.Tensor]:
    outs = []
    for ids, mask, lab in ((data.ids_a, data.mask_a, data.labels_a),
                           (data.ids_b, data.mask_b, data.labels_b)):
        parts = [fn(ids[i:i + 64], mask[i:i + 64], lab[i:i + 64]).double().cpu()
                 for i in range(0, len(ids), 64)]
        outs.append(torch.cat(parts))
    return outs[0], outs[1]


def run_step(engine: Engine, micro_batches: list[MicroBatch], cfg: TrainConfig, step: int
             ) -> dict[str, float]:
    """One optimiser step over ``micro_batches`` (this rank's shares, one per accumulation).

    Each micro-batch's loss is ``world·Σ_{i local} p_i ℓ_i`` with weights over the global
    micro-batch; gradients are averaged over micro-batches and ranks. Raises
    :class:`TrainingDiverged` on a NaN/inf loss or gradient norm (naming ``step + 1``). Returns
    the step's metrics: micro-batch averages of the (global) loss metrics, ``num_tokens`` summed
    over micro-batches and ranks, ``grad_norm``, ``lr``, ``tokens_per_s``, ``peak_memory_gb``.
    """
    t0 = time.perf_counter()
    n = len(micro_batches)
    sums: dict[str, float] = {}
    ntok = 0.0
    for m, mb in enumerate(micro_batches):
        with engine.accumulate(last=m == n - 1):
            out = engine.forward({k: v.to(engine.device) for k, v in mb.items()})
            loss, tokens = out.pop("loss"), out.pop("num_tokens")
            red = engine.all_reduce_sum(torch.stack([loss.detach().double(), tokens.double()]))
            loss_value, ntok = float(red[0]) / engine.world_size, ntok + float(red[1])
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"non-finite loss ({loss_value}) at step {step + 1}; "
                                       "the last saved checkpoint is intact")
            engine.backward(loss, n)
        for k, v in to_floats({"loss": loss_value, **out}).items():
            sums[k] = sums.get(k, 0.0) + v / n
    lr = engine.lr()  # the rate this step used
    gnorm = engine.step(step)
    elapsed = time.perf_counter() - t0
    return {**sums, "num_tokens": ntok, "grad_norm": gnorm, "lr": lr,
            "tokens_per_s": ntok / elapsed, "peak_memory_gb": _peak_memory_gb(engine.device)}


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0
