"""The step loop shared by offline and online training, and what surrounds it.

Each optimiser step takes ``grad_accum`` global micro-batches of ``batch_size`` pairs and
minimises ``L = Σ_i p_i.detach()·Δ_i²`` (DRO-REBEL, arXiv 2509.19104; REBEL, arXiv 2404.16767)
with the DRO weights over each *global* micro-batch (all ranks' pairs; see
:mod:`drorebel.trainer.engine`), through the public loss module the config selects
(:func:`drorebel.trainer.model.build_loss`). Offline (:mod:`drorebel.trainer.loop`) and online
(:mod:`drorebel.trainer.online`) training differ only in where a step's micro-batches come from.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from drorebel.trainer.batch import PairBatch
from drorebel.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from drorebel.trainer.config import TrainConfig
from drorebel.trainer.engine import Engine, TrainingDiverged
from drorebel.trainer.metrics import MetricsLogger, to_floats

__all__ = ["TrainResult", "TrainingDiverged", "StepBatches", "drive", "run_step",
           "maybe_resume", "seed_all", "peak_memory_gb", "reference_logps", "LogpFn"]


@dataclass
class TrainResult:
    steps: int
    final_dir: str
    metrics_path: str
    n_truncated: int
    n_dropped: int


StepBatches = Callable[[int], "tuple[list[PairBatch], dict, dict | None]"]


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


def seed_all(seed: int) -> None:
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


def run_step(engine: Engine, micro_batches: list[PairBatch], cfg: TrainConfig, step: int
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
            out = engine.forward(mb.to(engine.device))
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
            "tokens_per_s": ntok / elapsed, "peak_memory_gb": peak_memory_gb(engine.device)}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0


LogpFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def reference_logps(fn: LogpFn, source: Any, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log π_ref(a), log π_ref(b))`` of every pair of ``source`` (float64, CPU).

    ``fn(ids, mask, labels)`` gives per-sequence log-probs (e.g. :meth:`Engine.sequence_logps`,
    ZeRO-3 safe: every rank must make the same calls); ``source`` holds ``ids_*``, ``mask_*``,
    ``labels_*`` as attributes or mapping keys; ``chunk`` rows go through ``fn`` at a time.
    """
    get = source.__getitem__ if isinstance(source, Mapping) else source.__getattribute__
    out = []
    for s in ("a", "b"):
        ids, mask, lab = (get(f"{k}_{s}") for k in ("ids", "mask", "labels"))
        parts = [fn(ids[i:i + chunk], mask[i:i + chunk], lab[i:i + chunk]).double().cpu()
                 for i in range(0, len(ids), chunk)]
        out.append(torch.cat(parts))
    return out[0], out[1]
