"""Online (DRO-)REBEL: sample, score, then K optimiser passes over each rollout batch.

One iteration t of REBEL (Gao et al., arXiv 2404.16767, Alg. 1) with the robust loss of
DRO-REBEL (Sahu & Wells, arXiv 2509.19104):

1. take the next ``rollout_batch_size`` prompts x (a seeded order: a function of seed and t);
2. sample two responses a, b ~ π_t(·|x) with ``generate`` in chunks of
   ``generation_batch_size`` prompts (chunk c seeded by a function of seed, t and c);
3. record ``log π_ref(a|x)``, ``log π_ref(b|x)`` without gradients — ``reference="sampling"``:
   π_ref = π_t, the sampling policy itself (REBEL proper); ``"initial"``: a frozen copy of the
   starting model;
4. score both responses, ``r = Σ_j α_j r_j`` (reward function or reward model, see
   :mod:`drorebel.trainer.rewards`); with ``kl_coef`` β > 0 the rewards are KL-shaped as in the
   official REBEL code, ``r − β·(log π_t(y|x) − log π_0(y|x))`` with sequence log-probs and
   π_0 the initial model (a frozen copy, loaded whatever ``reference`` is);
5. ``num_passes`` K passes over the batch; each pass is a seeded shuffle cut into optimiser steps
   of ``grad_accum`` micro-batches of ``batch_size`` pairs minimising
   ``Σ_i p_i·Δ_i²``, ``Δ_i = (1/η)[(log π_θ(a_i) − log π_ref(a_i)) − (log π_θ(b_i) −
   log π_ref(b_i))] − (r_a,i − r_b,i)``.

So an iteration is ``K·rollout_batch_size / (batch_size·grad_accum)`` optimiser steps and
``max_steps`` counts optimiser steps. The rollout buffer and its iteration go into every
checkpoint (``extra_state``), so a run resumed in the middle of an iteration continues bitwise
identically on the CPU. Data parallel: each rank samples and scores its contiguous share of the
prompts, the shares are all-gathered into the same global buffer on every rank, and each rank
trains on its slice of every global micro-batch (as offline); with the same
``generation_batch_size`` a run on N ranks equals a run on one process.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from drorebel.trainer.batch import PairBatch
from drorebel.trainer.checkpoint import CheckpointError
from drorebel.trainer.config import ConfigError, TrainConfig, looks_local
from drorebel.trainer.driver import (
    BatchOrigin,
    LogpFn,
    TrainResult,
    drive,
    maybe_resume,
    prepare_run,
    reference_logps,
)
from drorebel.trainer.engine import Engine, create_engine
from drorebel.trainer.model import load_model, load_tokenizer, sequence_logps, wrap_model
from drorebel.trainer.rewards import (
    RewardError,
    RewardModelScorer,
    combine_objectives,
    load_reward_fn,
    score_responses,
)
from drorebel.trainer.rollout import (
    PromptSet,
    derive_seed,
    iteration_prompts,
    load_prompts,
    pair_tensors,
    sample_responses,
)

__all__ = ["train_online", "build_reward", "make_rollout", "rollout_micro_batches",
           "rollout_indices", "steps_per_iteration", "initial_reference"]



def steps_per_iteration(cfg: TrainConfig) -> int:
    """Optimiser steps per rollout batch: ``K · rollout_batch_size / (batch_size·grad_accum)``."""
    return cfg.num_passes * cfg.rollout_batch_size // (cfg.batch_size * cfg.grad_accum)


def build_reward(cfg: TrainConfig, device: torch.device) -> tuple[Any, str]:
    """The reward callable and its name for messages; :class:`ConfigError` if it cannot load."""
    if cfg.reward_fn is not None:
        try:
            return load_reward_fn(cfg.reward_fn), f"reward_fn {cfg.reward_fn!r}"
        except ValueError as err:
            raise ConfigError(str(err)) from err
    path = cfg.reward_model
    if looks_local(path) and not os.path.exists(path):
        raise ConfigError(f"`reward_model`: path {path!r} does not exist")
    scorer = RewardModelScorer(path, device, getattr(torch, cfg.dtype),
                               trust_remote_code=cfg.reward_trust_remote_code)
    return scorer, f"reward model {path!r}"


def train_online(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) online DRO-REBEL as configured (``cfg.mode == "online"``).

    Under ``torchrun``/``deepspeed`` every rank calls it; rank 0 writes metrics and the model.
    """
    cfg.check_paths()
    run = prepare_run(cfg)  # output_dir / resume checks, before the model loads
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    prompts = load_prompts(cfg.prompt_file, tokenizer, cfg.max_prompt_length, cfg.overlong,
                           rollout_batch_size=cfg.rollout_batch_size, setting="prompt_file",
                           split=cfg.prompt_split, column_map=cfg.column_map)
    engine = create_engine(cfg)
    if (prompts.n_truncated or prompts.n_dropped) and engine.rank == 0:
        print(f"[drorebel] prompts over max_prompt_length={cfg.max_prompt_length}: "
              f"{prompts.n_truncated} truncated, {prompts.n_dropped} dropped")
    reward = build_reward(cfg, engine.device)
    if not cfg.do_sample and engine.rank == 0:
        print("[drorebel] warning: do_sample=false makes both responses the greedy one "
              "(r_a = r_b: REBEL learns nothing); set do_sample=true")
    # the initial model: the loss's reference (reference=initial) and/or the KL's (kl_coef > 0)
    need_initial = cfg.reference == "initial" or cfg.kl_coef > 0
    ref_logps = initial_reference(cfg, engine) if need_initial else None
    engine.train()
    start, extra = maybe_resume(cfg, engine, run)
    spi = steps_per_iteration(cfg)
    buffer = extra.get("rollout") if extra else None
    if start % spi and (buffer is None or buffer["iteration"] != start // spi):
        raise CheckpointError(f"the checkpoint at step {start} (inside rollout iteration "
                              f"{start // spi}) holds no rollout buffer for that iteration")
    state = {"buffer": buffer}

    def batches(step: int) -> tuple[list[PairBatch], dict, dict, BatchOrigin]:
        it, buf = step // spi, state["buffer"]
        if buf is None or buf["iteration"] != it:
            buf = state["buffer"] = make_rollout(engine, prompts, reward, tokenizer, cfg, it,
                                                 ref_logps)
            engine.train()
        micro = rollout_micro_batches(buf, cfg, step % spi, engine.rank, engine.world_size)
        origin = BatchOrigin(f"entries {{}} of the rollout buffer of iteration {it}",
                             lambda m: rollout_indices(it, cfg, step % spi)[m].tolist(),
                             cfg.grad_accum)
        return micro, buf["metrics"], {"rollout": buf}, origin

    return drive(cfg, engine, tokenizer, start, batches, (prompts.n_truncated, prompts.n_dropped),
                 run)


def rollout_micro_batches(buffer: dict, cfg: TrainConfig, j: int, rank: int = 0,
                          world_size: int = 1) -> list[PairBatch]:
    """This rank's micro-batches of step ``j`` of the iteration (pass ``j // steps_per_pass``,
    a seeded shuffle of the rollout per pass; rank ``r`` takes slice ``r`` of each micro-batch)."""
    share = cfg.batch_size // world_size
    return [PairBatch.select(buffer["tensors"], idx[rank * share:(rank + 1) * share]).trim()
            for idx in rollout_indices(buffer["iteration"], cfg, j)]  # trim: drop pad columns


def rollout_indices(iteration: int, cfg: TrainConfig, j: int) -> list[torch.Tensor]:
    """Rollout-buffer indices of each GLOBAL micro-batch of step ``j`` of ``iteration``."""
    per_step = cfg.batch_size * cfg.grad_accum
    pass_idx, m = divmod(j, cfg.rollout_batch_size // per_step)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 11, iteration, pass_idx))
    perm = torch.randperm(cfg.rollout_batch_size, generator=gen)
    return [perm[(m * cfg.grad_accum + u) * cfg.batch_size:][:cfg.batch_size]
            for u in range(cfg.grad_accum)]


def make_rollout(engine: Engine, prompts: PromptSet, reward: tuple[Any, str], tokenizer: Any,
                 cfg: TrainConfig, iteration: int, ref_logps: LogpFn | None = None) -> dict:
    """Sample, record reference log-probs, score: the global rollout buffer of ``iteration``.

    ``ref_logps``: log π_0 of the initial model (:func:`initial_reference`), the loss's
    reference when ``cfg.reference == "initial"`` (else π_t is) and the KL's when
    ``cfg.kl_coef`` > 0. Returns ``{"iteration", "tensors": {ids_*, mask_*, labels_*, ref_*,
    rewards_*, objectives_*[, scores_*, kl_*]}, "metrics": {...}}`` (CPU; identical on every
    rank); with ``kl_coef`` β > 0, ``rewards_* = scores_* − β·kl_*``, ``kl_* = log π_t −
    log π_0`` of the sampled response.
    """
    t0 = time.perf_counter()
    share = cfg.rollout_batch_size // engine.world_size
    idx = iteration_prompts(len(prompts), cfg.rollout_batch_size, cfg.seed, iteration)
    idx = idx[engine.rank * share:(engine.rank + 1) * share]
    engine.eval()
    pids = [prompts.ids[i] for i in idx]
    ra, rb = _generate(engine, pids, tokenizer, cfg, iteration)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tensors = pair_tensors(pids, ra, rb, pad)
    initial = cfg.reference == "initial" and ref_logps is not None
    ref_a, ref_b = reference_logps(ref_logps if initial else engine.sequence_logps, tensors,
                                   cfg.batch_size)
    local: dict[str, Any] = {"pids": pids, "ra": ra, "rb": rb, "ref_a": ref_a, "ref_b": ref_b}
    if cfg.kl_coef > 0:  # log π_t − log π_0 of the sampled responses; the side that the
        # reference already gave is reused, the other one costs one forward pass
        if ref_logps is None:
            raise ValueError("kl_coef > 0 needs the initial model's log-probs (ref_logps)")
        pol = reference_logps(engine.sequence_logps, tensors, cfg.batch_size) if initial \
            else (ref_a, ref_b)
        init = (ref_a, ref_b) if initial else reference_logps(ref_logps, tensors, cfg.batch_size)
        local["kl_a"], local["kl_b"] = pol[0] - init[0], pol[1] - init[1]
    try:
        local["table"] = _score(reward, prompts, idx, ra, rb, tokenizer)
        local["error"] = None
    except RewardError as err:
        local["error"] = err
    parts = _all_gather(local, engine.world_size)
    for p in parts:  # every rank raises the same error (no rank is left waiting)
        if p["error"] is not None:
            raise p["error"]
    return _assemble(parts, cfg, iteration, pad, tokenizer.eos_token_id,
                     time.perf_counter() - t0)


def _generate(engine: Engine, pids: list[list[int]], tokenizer: Any, cfg: TrainConfig,
              iteration: int) -> tuple[list[list[int]], list[list[int]]]:
    """Sample this rank's share in chunks of ``generation_batch_size`` prompts; chunk ``c`` of
    the global rollout is seeded with ``(seed, iteration, c)`` whatever rank samples it."""
    share = len(pids)
    g = cfg.generation_batch_size or share
    if share % g:
        raise ConfigError(f"`generation_batch_size`={g} must divide each rank's share of the "
                          f"rollout ({share} prompts on {engine.world_size} ranks)")
    synced = engine.world_size > 1 and getattr(engine, "stage", 0) == 3  # ZeRO-3: in lockstep
    ra: list[list[int]] = []
    rb: list[list[int]] = []
    for c in range(0, share, g):
        chunk = (engine.rank * share + c) // g
        a, b = sample_responses(engine.module, pids[c:c + g], tokenizer, cfg,
                                derive_seed(cfg.seed, iteration, chunk), engine.device,
                                synced_gpus=synced)
        ra, rb = ra + a, rb + b
    return ra, rb


def initial_reference(cfg: TrainConfig, engine: Engine) -> LogpFn:
    """``(ids, mask, labels) -> log π_0`` of a frozen copy of the starting model (no grad).

    One process / DDP: a whole copy on every rank. DeepSpeed ZeRO-3: the copy is partitioned
    like the policy (an optimizer-less DeepSpeed engine around the loss wrapper, so the
    LM head is gathered inside its forward); every rank must call it equally often. LoRA
    (``lora_r > 0``): no copy, the policy with its adapter disabled (:meth:`Engine.initial_logps`).
    """
    if getattr(engine, "lora", False):
        return engine.initial_logps
    wrapper = wrap_model(load_model(cfg, engine.device), cfg)
    if getattr(engine, "stage", 0) != 3:
        wrapper.eval().requires_grad_(False)

        def plain(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            dev = engine.device
            return sequence_logps(wrapper, ids.to(dev), mask.to(dev), labels.to(dev))

        return plain
    import deepspeed

    ds = engine.ds_cfg
    zero = {k: v for k, v in ds["zero_optimization"].items() if k != "offload_optimizer"}
    ref_cfg = {k: ds[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                  "train_batch_size", "bf16", "fp16") if k in ds}
    ref_cfg.update(zero_optimization=zero, steps_per_print=10**9)
    ref, *_ = deepspeed.initialize(model=wrapper, config=ref_cfg)
    ref.eval()

    def sharded(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dev = engine.device
        return sequence_logps(ref, ids.to(dev), mask.to(dev), labels.to(dev))

    return sharded


def _score(reward: tuple[Any, str], prompts: PromptSet, idx: list[int], ra: list[list[int]],
           rb: list[list[int]], tokenizer: Any) -> torch.Tensor:
    """Objective table ``[2n, k]`` of ``a`` responses then ``b`` responses."""
    fn, name = reward
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ra + rb]
    cols = prompts.reward_columns(idx)
    cols = {k: v + v for k, v in cols.items()}
    rows = [prompts.rows[i] for i in idx]
    fields = ["response_a"] * len(idx) + ["response_b"] * len(idx)
    ptexts = [prompts.texts[i] for i in idx]
    return score_responses(fn, ptexts + ptexts, texts, cols, rows + rows, fields, name)


def _all_gather(obj: dict, world_size: int) -> list[dict]:
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _assemble(parts: list[dict], cfg: TrainConfig, iteration: int, pad: int,
              eos: int | None, elapsed: float) -> dict:
    pids = [p for part in parts for p in part["pids"]]
    ra = [r for part in parts for r in part["ra"]]
    rb = [r for part in parts for r in part["rb"]]
    tables = [part["table"] for part in parts]
    n = len(pids)
    if len({t.shape[1] for t in tables}) != 1:
        raise RewardError("the reward returned different numbers of objectives on different ranks")
    tab_a = torch.cat([t[: len(t) // 2] for t in tables])
    tab_b = torch.cat([t[len(t) // 2:] for t in tables])
    tensors = pair_tensors(pids, ra, rb, pad)
    tensors["ref_a"] = torch.cat([part["ref_a"] for part in parts])
    tensors["ref_b"] = torch.cat([part["ref_b"] for part in parts])
    both = combine_objectives(torch.cat([tab_a, tab_b]), cfg.reward_weights)
    if cfg.kl_coef > 0:  # KL-shaped rewards (official REBEL): score − β·(log π_t − log π_0)
        tensors["scores_a"], tensors["scores_b"] = both[:n], both[n:]
        kl = torch.cat([torch.cat([part[f"kl_{s}"] for part in parts]) for s in ("a", "b")])
        tensors["kl_a"], tensors["kl_b"] = kl[:n], kl[n:]
        both = both - cfg.kl_coef * kl
    tensors["rewards_a"], tensors["rewards_b"] = both[:n], both[n:]
    tensors["objectives_a"], tensors["objectives_b"] = tab_a, tab_b
    metrics = _rollout_metrics(tensors, ra + rb, eos, cfg, iteration, elapsed)
    return {"iteration": iteration, "tensors": tensors, "metrics": metrics}


def _rollout_metrics(t: dict[str, torch.Tensor], responses: list[list[int]], eos: int | None,
                     cfg: TrainConfig, iteration: int, elapsed: float) -> dict[str, float]:
    """Environment rewards (TRL names: ``rewards/…``, ``logps/…``, ``completions/…``)."""
    ra, rb = t["rewards_a"], t["rewards_b"]
    both = torch.cat([ra, rb])
    a_wins = ra >= rb
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.float64)
    clipped = torch.tensor([not r or r[-1] != eos for r in responses], dtype=torch.float64)
    m = {"rewards/mean": both.mean(), "rewards/std": both.std(correction=0),
         "rewards/chosen": torch.where(a_wins, ra, rb).mean(),
         "rewards/rejected": torch.where(a_wins, rb, ra).mean(),
         "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
         "completions/max_length": lengths.max(), "completions/clipped_ratio": clipped.mean()}
    if cfg.reference == "sampling":  # log π_t of the sampled responses, at sampling time
        m["logps/chosen"] = torch.where(a_wins, t["ref_a"], t["ref_b"]).mean()
        m["logps/rejected"] = torch.where(a_wins, t["ref_b"], t["ref_a"]).mean()
    if "kl_a" in t:  # official REBEL / TRL names; rewards/* above are the shaped rewards
        kl = torch.cat([t["kl_a"], t["kl_b"]])
        m["objective/kl"] = kl.mean()
        m["objective/scores"] = torch.cat([t["scores_a"], t["scores_b"]]).mean()
        m["objective/non_score_reward"] = -cfg.kl_coef * kl.mean()
        m["objective/rlhf_reward"] = both.mean()
    objs = torch.cat([t["objectives_a"], t["objectives_b"]])
    if objs.shape[1] > 1:
        for j in range(objs.shape[1]):
            m[f"rewards/objective_{j}"] = objs[:, j].mean()
    out = {k: float(v) for k, v in m.items()}
    out.update({"rollout/iteration": float(iteration), "rollout/time_s": elapsed})
    return out
