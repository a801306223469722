"""Single-process offline DRO-REBEL training loop (CPU or one GPU).

Each optimiser step takes ``grad_accum`` micro-batches of ``batch_size`` pairs and minimises
``L = Σ_i p_i.detach()·Δ_i²`` (DRO-REBEL, arXiv 2509.19104; REBEL, arXiv 2404.16767) with the
DRO weights over each micro-batch. The data order is a function of the seed and the step only,
so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from drorebel.losses.rebel import rebel_loss
from drorebel.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from drorebel.trainer.config import TrainConfig
from drorebel.trainer.data import PairBatchData, load_rows, normalise_rows, tokenise_pairs
from drorebel.trainer.metrics import MetricsLogger, to_floats
from drorebel.trainer.model import load_model, load_tokenizer, sequence_logps_of

__all__ = ["TrainingDiverged", "TrainResult", "train"]


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the message names the step."""


@dataclass
class TrainResult:
    steps: int
    final_dir: str
    metrics_path: str
    n_truncated: int
    n_dropped: int


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; returns where the outputs went."""
    cfg.check_paths()
    _seed_all(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(cfg)
    rows = normalise_rows(load_rows(cfg.train_file))
    data = tokenise_pairs(rows, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.overlong)
    if data.n_truncated or data.n_dropped:
        print(f"[drorebel] prompts over max_prompt_length={cfg.max_prompt_length}: "
              f"{data.n_truncated} truncated, {data.n_dropped} dropped")
    model = load_model(cfg, device)
    if data.ref_a is None:  # reference = the initial policy, computed once before any update
        data.ref_a, data.ref_b = _reference_logps(model, data, cfg, device)
    model.train()
    opt, sched = _optimizer(model, cfg)
    start = _maybe_resume(cfg, model, opt, sched)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    logger = MetricsLogger(metrics_path, start, cfg.max_steps, cfg.progress)
    try:
        end = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
        for step in range(start, end):
            metrics = _train_step(model, opt, sched, data, cfg, step, device)
            if (step + 1) % cfg.log_steps == 0 or step + 1 == cfg.max_steps:
                logger.log(step + 1, metrics)
            if (cfg.save_steps and (step + 1) % cfg.save_steps == 0) or step + 1 == end:
                save_checkpoint(cfg.output_dir, step + 1, model, opt, sched, cfg.fingerprint(),
                                cfg.save_total_limit)
    finally:
        logger.close()
    if end < cfg.max_steps:
        return TrainResult(end, "", metrics_path, data.n_truncated, data.n_dropped)
    final = os.path.join(cfg.output_dir, "final")
    model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    return TrainResult(end, final, metrics_path, data.n_truncated, data.n_dropped)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002
    torch.manual_seed(seed)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, object]:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=tuple(cfg.adam_betas))
    warm, total = cfg.warmup_steps, cfg.max_steps

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        frac = (s - warm) / max(1, total - warm)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - frac)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _maybe_resume(cfg: TrainConfig, model: torch.nn.Module, opt: object, sched: object) -> int:
    if cfg.resume is None:
        return 0
    path = latest_checkpoint(cfg.output_dir) if cfg.resume == "auto" else cfg.resume
    if path is None:
        return 0  # "auto" with nothing saved yet: a fresh start
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume: checkpoint {path!r} does not exist")
    step = load_checkpoint(path, model, opt, sched, cfg.fingerprint())
    print(f"[drorebel] resumed from {path} at step {step}")
    return step


def _batch_indices(n: int, batch_size: int, seed: int, micro: int) -> torch.Tensor:
    """Indices of micro-batch ``micro`` in the stream of seeded per-epoch permutations."""
    pos = torch.arange(micro * batch_size, (micro + 1) * batch_size)
    out = torch.empty_like(pos)
    for epoch in pos.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        sel = pos // n == epoch
        out[sel] = perm[pos[sel] % n]
    return out


@torch.no_grad()
def _reference_logps(model: torch.nn.Module, data: PairBatchData, cfg: TrainConfig,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    outs = []
    for ids, mask, lab in ((data.ids_a, data.mask_a, data.labels_a),
                           (data.ids_b, data.mask_b, data.labels_b)):
        parts = [sequence_logps_of(model, ids[i:i + 64].to(device), mask[i:i + 64].to(device),
                                   lab[i:i + 64].to(device), cfg.temperature).double().cpu()
                 for i in range(0, len(ids), 64)]
        outs.append(torch.cat(parts))
    return outs[0], outs[1]


def _micro_loss(model: torch.nn.Module, data: PairBatchData, idx: torch.Tensor,
                cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, dict]:
    mat = cfg.loss_impl == "materialized"

    def get(t: torch.Tensor) -> torch.Tensor:
        return t[idx].to(device)

    pa = sequence_logps_of(model, get(data.ids_a), get(data.mask_a), get(data.labels_a),
                           cfg.temperature, mat)
    pb = sequence_logps_of(model, get(data.ids_b), get(data.mask_b), get(data.labels_b),
                           cfg.temperature, mat)
    out = rebel_loss(pa, pb, get(data.ref_a).float(), get(data.ref_b).float(),
                     get(data.rewards_a).float(), get(data.rewards_b).float(), eta=cfg.eta,
                     divergence=cfg.divergence, rho=cfg.rho, tau=cfg.tau)
    ntok = int((get(data.labels_a) != -100).sum() + (get(data.labels_b) != -100).sum())
    return out.loss, {**out.metrics, "num_tokens": ntok}


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: object,
                data: PairBatchData, cfg: TrainConfig, step: int, device: torch.device
                ) -> dict[str, float]:
    t0 = time.perf_counter()
    sums: dict[str, float] = {}
    for m in range(cfg.grad_accum):
        idx = _batch_indices(len(data), cfg.batch_size, cfg.seed, step * cfg.grad_accum + m)
        loss, metrics = _micro_loss(model, data, idx, cfg, device)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite loss ({loss.item()}) at step {step + 1}; "
                                   "the last saved checkpoint is intact")
        (loss / cfg.grad_accum).backward()
        for k, v in to_floats({"loss": loss, **metrics}).items():
            sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
    clip = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if not torch.isfinite(gnorm):
        raise TrainingDiverged(f"non-finite gradient norm at step {step + 1}; "
                               "the last saved checkpoint is intact")
    lr = sched.get_last_lr()[0]  # the rate this step used
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    sums["num_tokens"] *= cfg.grad_accum
    elapsed = time.perf_counter() - t0
    return {**sums, "grad_norm": float(gnorm), "lr": lr,
            "tokens_per_s": sums["num_tokens"] / elapsed,
            "peak_memory_gb": _peak_memory_gb(device)}


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0
