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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from drorebel.trainer.batch import PairBatch
from drorebel.trainer.checkpoint import (
    load_checkpoint,
    read_state,
    resume_candidates,
    save_checkpoint,
    save_final,
)
from drorebel.trainer.config import ConfigError, TrainConfig
from drorebel.trainer.engine import Engine, NonFiniteStep, TrainingDiverged
from drorebel.trainer.errors import CheckpointError
from drorebel.trainer.metrics import MetricsLogger, to_floats
from drorebel.trainer.run_dir import (
    SET_ASIDE_AT_START,
    NoSpaceLeft,
    RunDir,
    other_run_files,
    set_aside,
)

__all__ = ["TrainResult", "TrainingDiverged", "StepBatches", "BatchOrigin", "drive", "run_step",
           "prepare_run", "maybe_resume", "seed_all", "peak_memory_gb", "reference_logps",
           "LogpFn"]


@dataclass
class TrainResult:
    steps: int
    final_dir: str
    metrics_path: str
    n_truncated: int
    n_dropped: int


@dataclass
class BatchOrigin:
    """Where the pairs of one optimiser step come from, for error messages.

    ``what``: e.g. ``"rows {} of pairs.jsonl"`` or ``"entries {} of the rollout buffer of
    iteration 3"`` (the first ``{}``: the numbers); ``rows(m)``: the numbers (0-based source
    rows, buffer indices) of GLOBAL micro-batch ``m`` (all ranks' pairs), computed only when a
    message needs them.
    """

    what: str
    rows: Callable[[int], Sequence[int]]
    n_micro: int

    def describe(self, m: int | None = None) -> str:
        if m is None:
            items = [r for k in range(self.n_micro) for r in self.rows(k)]
            return "the step's pairs are " + self.what.replace("{}", _shorten(items), 1)
        numbers = _shorten(list(self.rows(m)))
        return f"micro-batch {m + 1} of {self.n_micro} holds " + self.what.replace("{}", numbers, 1)


def _shorten(items: list[int], n: int = 24) -> str:
    head = ", ".join(str(int(i)) for i in items[:n])
    return head + (f", … ({len(items)} in all)" if len(items) > n else "")


# batches(step) -> (this rank's micro-batches, extra metrics, state to checkpoint, origin)
StepBatches = Callable[[int], "tuple[list[PairBatch], dict, dict | None, BatchOrigin | None]"]


def _on_nonfinite(cfg: TrainConfig) -> str:
    return getattr(cfg, "on_nonfinite", "stop")  # until config.py has the field


def prepare_run(cfg: TrainConfig) -> RunDir:
    """Check ``output_dir`` and choose the checkpoint to resume from — before the model loads
    (the rules: :mod:`drorebel.trainer.run_dir`).

    :class:`ConfigError` when ``output_dir`` is not a directory, or holds another run's files
    (checkpoints, ``metrics.jsonl``, ``final/``, ``tensorboard/``) while neither ``resume`` nor
    ``overwrite_output_dir`` is set. With ``overwrite_output_dir`` rank 0 renames the old
    ``metrics.jsonl`` / ``tensorboard/`` to ``*.old`` and leaves everything else in place. With
    ``resume`` set: the checkpoints to try (:func:`~drorebel.trainer.checkpoint.
    resume_candidates`: one printed line per newer checkpoint passed over, a one-line
    :class:`CheckpointError` for a missing or damaged named one).
    """
    out = cfg.output_dir
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ConfigError(f"`output_dir`: {out!r} exists and is not a directory")
    run = RunDir(out)
    rank0 = int(os.environ.get("RANK", "0") or 0) == 0
    if cfg.resume is not None:
        run.resume_candidates = resume_candidates(cfg.resume, out, cfg.fingerprint(), log=rank0)
        return run
    found = other_run_files(out)
    if not found:
        return run
    if not getattr(cfg, "overwrite_output_dir", False):
        shown = ", ".join(found[:6]) + (f", … ({len(found)} in all)" if len(found) > 6 else "")
        raise ConfigError(
            f"`output_dir` {out!r} already holds another run's files ({shown}); continue that "
            "run with resume=auto, start a new run beside it with overwrite_output_dir=true "
            "(nothing of the old run is deleted), or choose another output_dir")
    if rank0:
        moved = [f"{name} -> {os.path.basename(set_aside(os.path.join(out, name)))}"
                 for name in SET_ASIDE_AT_START if name in found]
        kept = [n for n in found if n not in SET_ASIDE_AT_START]
        print(f"[drorebel] overwrite_output_dir: a new run in {out}"
              + (f"; renamed {', '.join(moved)}" if moved else "")
              + (f"; left in place {', '.join(kept)} (this run never deletes them)"
                 if kept else ""))
    return run


def drive(cfg: TrainConfig, engine: Engine, tokenizer: Any, start: int, batches: StepBatches,
          counts: tuple[int, int], run: RunDir | None = None) -> TrainResult:
    """The step loop shared by offline and online training.

    ``batches(step)`` gives this rank's micro-batches of ``step``, extra metrics to log, the
    caller's state to store in a checkpoint (or None) and where the pairs came from (a
    :class:`BatchOrigin` for error messages, or None). Steps ``start … end−1`` run, metrics go to
    ``metrics.jsonl`` (rank 0), checkpoints every ``save_steps`` and at the end; a complete run
    saves ``output_dir/final`` with ``save_pretrained``. ``counts`` = (truncated, dropped)
    prompts; ``run``: from :func:`prepare_run` / :func:`maybe_resume` (its run id goes into
    every checkpoint).

    Non-finite values (:class:`TrainingDiverged`, naming the step, the pairs and the last intact
    checkpoint). The loss and the gradient norm are checked before the update; the parameters
    after it (one fused check, all ranks); parameters and optimizer state again before a
    checkpoint is written, so no checkpoint or ``final/`` ever holds a NaN/inf.
    ``on_nonfinite="stop"`` (default) stops at the first of them. ``"skip"`` skips a step whose
    loss or gradient norm is non-finite: no parameter or optimizer-state update, gradients
    dropped, the learning-rate schedule still advances (the step slot is used up, so the rate of
    step s stays a function of s, as in an uninterrupted run) and ``train/skipped_steps``
    (logged in every row, kept in checkpoints) counts them. Parameters that became non-finite
    through an update (e.g. ``lr=inf``) cannot be skipped after the fact: the run stops in
    either mode.
    """
    run = run or RunDir(cfg.output_dir)
    skip = _on_nonfinite(cfg) == "skip"
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    tb_dir = os.path.join(cfg.output_dir, "tensorboard") if cfg.tensorboard else None
    end = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    logger = None
    try:
        if engine.rank == 0:
            wandb = ({"output_dir": cfg.output_dir, "config": cfg.to_dict()}
                     if "wandb" in cfg.report_to else None)
            logger = MetricsLogger(metrics_path, start, cfg.max_steps, cfg.progress, tb_dir,
                                   wandb)
        for step in range(start, end):
            micro, extra_metrics, extra_state, *rest = batches(step)
            origin = rest[0] if rest else None
            # the loss's own metrics win a name clash (online DPO: rewards/chosen is DPO's
            # implicit reward, as in TRL, not the sampled response's score)
            out, skipped = _run_step(engine, micro, cfg, step, origin, skip)
            run.skipped_steps += skipped
            metrics = {**extra_metrics, **out}
            if skip:
                metrics["train/skipped_steps"] = float(run.skipped_steps)
            if logger and ((step + 1) % cfg.log_steps == 0 or step + 1 == cfg.max_steps):
                logger.log(step + 1, metrics)
            if (cfg.save_steps and (step + 1) % cfg.save_steps == 0) or step + 1 == end:
                if not engine.state_finite():
                    raise TrainingDiverged(
                        f"non-finite values in the parameters or optimizer state at step "
                        f"{step + 1}; checkpoint-{step + 1} was not written")
                run.last_checkpoint = save_checkpoint(
                    cfg.output_dir, step + 1, engine, cfg.fingerprint(), cfg.save_total_limit,
                    extra_state=extra_state, run_id=run.run_id,
                    info={"skipped_steps": run.skipped_steps})
        if end < cfg.max_steps:
            return TrainResult(end, "", metrics_path, *counts)
        final = save_final(cfg.output_dir, engine, tokenizer, end, cfg.fingerprint(), run.run_id)
    except TrainingDiverged as err:
        hint = (" (resume=auto with on_nonfinite=skip skips such steps)"
                if getattr(err, "skippable", False) and run.last_checkpoint else "")
        raise TrainingDiverged(f"{err}; {run.checkpoint_note()}{hint}") from None
    except NoSpaceLeft as err:
        raise NoSpaceLeft(f"{err}; {run.checkpoint_note()}", err.filename) from err
    finally:
        if logger:
            logger.close()
    return TrainResult(end, final, metrics_path, *counts)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002
    torch.manual_seed(seed)


def maybe_resume(cfg: TrainConfig, engine: Engine, run: RunDir | None = None
                 ) -> tuple[int, dict | None]:
    """``(step, extra_state)`` restored per ``cfg.resume`` (``(0, None)`` for a fresh start).

    Tries ``run.resume_candidates`` (from :func:`prepare_run`; found here when ``run`` is None)
    in order: a checkpoint whose files load but hold NaN/inf (written before checkpoints were
    checked) is passed over with one printed line under ``resume=auto``, a
    :class:`CheckpointError` when named explicitly. The run continues the checkpoint's run id
    and skipped-step count.
    """
    if cfg.resume is None:
        return 0, None
    if run is None:
        run = RunDir(cfg.output_dir)
        run.resume_candidates = resume_candidates(cfg.resume, cfg.output_dir, cfg.fingerprint(),
                                                  log=engine.rank == 0)
    for path in run.resume_candidates:
        step, extra = load_checkpoint(path, engine, cfg.fingerprint())
        if not engine.state_finite():
            if cfg.resume != "auto":
                raise CheckpointError(f"resume: checkpoint {path!r} holds non-finite parameters "
                                      "or optimizer state")
            if engine.rank == 0:
                print(f"[drorebel] resume=auto: skipping {path} (non-finite parameters or "
                      "optimizer state)")
            continue
        run.adopt(path, read_state(path))
        if engine.rank == 0:
            print(f"[drorebel] resumed from {path} at step {step}")
        return step, extra
    if run.resume_candidates:
        raise CheckpointError(f"resume=auto: no checkpoint in {cfg.output_dir!r} holds finite "
                              "values")
    return 0, None  # "auto" with nothing saved yet: a fresh start


def run_step(engine: Engine, micro_batches: list[PairBatch], cfg: TrainConfig, step: int,
             origin: BatchOrigin | None = None) -> dict[str, float]:
    """One optimiser step over ``micro_batches`` (this rank's shares, one per accumulation).

    Each micro-batch's loss is ``world·Σ_{i local} p_i ℓ_i`` with weights over the global
    micro-batch; gradients are averaged over micro-batches and ranks. Raises
    :class:`TrainingDiverged` on a NaN/inf loss, gradient norm or updated parameter (naming
    ``step + 1`` and, with ``origin``, the pairs). Returns the step's metrics: micro-batch
    averages of the (global) loss metrics, ``num_tokens`` summed over micro-batches and ranks,
    ``grad_norm``, ``lr``, ``tokens_per_s``, ``peak_memory_gb``.
    """
    return _run_step(engine, micro_batches, cfg, step, origin, skip=False)[0]


def _run_step(engine: Engine, micro_batches: list[PairBatch], cfg: TrainConfig, step: int,
              origin: BatchOrigin | None, skip: bool) -> tuple[dict[str, float], bool]:
    """:func:`run_step`; with ``skip`` a step with a non-finite loss or gradient norm is
    skipped instead (returns ``(metrics, True)``). A non-finite micro-batch loss is still
    back-propagated, times NaN: every gradient becomes NaN, so the engines' gradient check
    (DeepSpeed's own overflow check included) skips the update and every rank keeps the same
    sequence of collectives."""
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
                where = f"; {origin.describe(m)}" if origin else ""
                if not skip:
                    raise _skippable(f"non-finite loss ({loss_value}) at step {step + 1}{where}")
                loss = loss * float("nan")
            engine.backward(loss, n)
        for k, v in to_floats({"loss": loss_value, **out}).items():
            sums[k] = sums.get(k, 0.0) + v / n
    lr = engine.lr()  # the rate this step used
    skipped = False
    try:
        gnorm = engine.step(step)
    except NonFiniteStep as err:
        where = f"; {origin.describe()}" if origin else ""
        if err.updated:
            raise TrainingDiverged(f"{err}{where}; the update was applied anyway, so "
                                   "on_nonfinite=skip cannot undo it") from None
        if not skip:
            raise _skippable(f"{err}{where}") from None
        engine.skip_step()
        gnorm, skipped = err.value, True
    if not skipped and not engine.parameters_finite():
        where = f"; {origin.describe()}" if origin else ""
        raise TrainingDiverged(
            f"non-finite parameters after the optimizer update of step {step + 1} (gradient "
            f"norm {gnorm:.4g}, lr {lr:.4g}){where}; an applied update cannot be skipped")
    elapsed = time.perf_counter() - t0
    return ({**sums, "num_tokens": ntok, "grad_norm": gnorm, "lr": lr,
             "tokens_per_s": ntok / elapsed, "peak_memory_gb": peak_memory_gb(engine.device)},
            skipped)


def _skippable(message: str) -> TrainingDiverged:
    """A divergence found before the update (on_nonfinite=skip would have skipped the step)."""
    err = TrainingDiverged(message)
    err.skippable = True
    return err


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
