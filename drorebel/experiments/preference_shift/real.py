"""Preference shift on a real model: train at one reward mixture, evaluate at shifted ones.

``drorebel experiment preference-shift-real --config configs/preference_shift_gpu.yaml
[key=value ...] --out DIR``

The Emotion / ArmoRM protocol of DRO-REBEL (Sahu & Wells, arXiv 2509.19104 §5) with any causal
LM and a ``k``-objective reward (an ``AutoModelForSequenceClassification`` with
``num_labels = k``, or a ``reward_fn``): for every method (REBEL, χ²-, KL-, Wasserstein-REBEL
and the online DPO baseline, ``loss=dpo``: chosen = the sample of higher training-mixture
reward, arXiv 2305.18290) and seed, online training with
:func:`drorebel.trainer.loop.train` at the mixture ``r = Σ_j α_j r_j`` into
``DIR/<method>/seed<s>``; then two samples per held-out prompt, all ``k`` objectives scored once,
and the mean reward of every evaluation mixture ``w`` computed as ``w · E[r_1..r_k]`` (a mixture
reward is linear in the objectives). Reported per method: the mean and the worst case over the
seen / unseen / all mixtures, mean ± std over seeds, plus the untrained base model. Writes
``results.json``, ``table.md``, ``mixtures.png``, ``curves.png``; finished runs (a ``final``
directory) are not retrained.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from drorebel.experiments.preference_shift.mixtures import (
    Mixtures,
    mixture_rewards,
    mixture_value,
)
from drorebel.experiments.preference_shift.real_config import RealExperimentConfig, load_experiment
from drorebel.experiments.preference_shift.summary import (
    format_table,
    paired_worst_delta,
    stats,
    summarise_rows,
    worst,
)
from drorebel.trainer.config import ConfigError, TrainConfig

__all__ = ["add_arguments", "run", "run_experiment", "split_prompts", "evaluate_model",
           "summarise_real"]


def split_prompts(cfg: RealExperimentConfig, out: Path) -> tuple[str, str]:
    """(train prompt file, held-out prompt file). Without ``eval_prompt_file`` a fixed-seed
    ``eval_fraction`` of the ``prompt_file`` rows is held out (written under ``out/data``)."""
    from drorebel.trainer.data import load_rows

    src = cfg.train.get("prompt_file")
    if src is None or not os.path.exists(src):
        raise ConfigError(f"`prompt_file`: file {src!r} does not exist")
    if cfg.eval_prompt_file is not None:
        if not os.path.exists(cfg.eval_prompt_file):
            raise ConfigError(f"`eval_prompt_file`: file {cfg.eval_prompt_file!r} does not exist")
        return src, cfg.eval_prompt_file
    rows = load_rows(src)
    if len(rows) < 2:
        raise ConfigError(f"{src}: need at least 2 prompts to hold some out")
    order = list(range(len(rows)))
    random.Random(1234).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(cfg.eval_fraction * len(rows))))
    held, kept = sorted(order[:n_eval]), sorted(order[n_eval:])
    (out / "data").mkdir(parents=True, exist_ok=True)
    paths = []
    for name, idx in (("train_prompts.jsonl", kept), ("eval_prompts.jsonl", held)):
        path = out / "data" / name
        with open(path, "w") as f:
            for i in idx:
                f.write(json.dumps(rows[i], default=str) + "\n")
        paths.append(str(path))
    return paths[0], paths[1]


@torch.no_grad()
def evaluate_model(model: Any, tokenizer: Any, prompts: Any, reward: tuple[Any, str],
                   cfg: TrainConfig, seed: int, batch_size: int, device: torch.device
                   ) -> dict[str, Any]:
    """Two samples per held-out prompt (sampling seed ``seed``), all objectives scored once.

    Returns ``{"objective_means": [E r_1, …, E r_k], "n_responses", "mean_response_tokens"}``
    (float64 means over every response).
    """
    from drorebel.trainer.rewards import score_responses
    from drorebel.trainer.rollout import derive_seed, sample_responses

    model.eval()
    fn, name = reward
    tables, lengths = [], []
    for c in range(0, len(prompts), batch_size):
        idx = list(range(c, min(c + batch_size, len(prompts))))
        ra, rb = sample_responses(model, [prompts.ids[i] for i in idx], tokenizer, cfg,
                                  derive_seed(seed, 99, c), device)
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ra + rb]
        cols = {k: v + v for k, v in prompts.reward_columns(idx).items()}
        ptexts = [prompts.texts[i] for i in idx]
        rows = [prompts.rows[i] for i in idx]
        fields = ["eval_a"] * len(idx) + ["eval_b"] * len(idx)
        tables.append(score_responses(fn, ptexts + ptexts, texts, cols, rows + rows, fields,
                                      name))
        lengths += [len(r) for r in ra + rb]
    table = torch.cat(tables)
    return {"objective_means": table.mean(0).tolist(), "n_responses": int(table.shape[0]),
            "mean_response_tokens": statistics.fmean(lengths)}


def summarise_real(per_seed: list[dict], mixtures: Mixtures, train_weights: list[float],
                   ref: list[dict] | None = None) -> dict:
    """Mean ± std over seeds of the training-mixture reward, of the mean and worst case over the
    ``seen``, ``unseen`` and ``all`` mixtures, of each mixture and each objective; with ``ref``
    (REBEL's per-seed results) the seed-paired ``all_worst − REBEL`` difference too."""
    rows = [mixture_rewards(p["objective_means"], mixtures) for p in per_seed]
    out = summarise_rows(rows, [mixture_value(train_weights, p["objective_means"])
                                for p in per_seed])
    k = len(per_seed[0]["objective_means"])
    out["objectives"] = [stats([p["objective_means"][j] for p in per_seed]) for j in range(k)]
    if ref is not None:
        ref_rows = [mixture_rewards(p["objective_means"], mixtures) for p in ref]
        out["all_worst_minus_rebel"] = paired_worst_delta(rows, ref_rows)
    return out


def _curve(metrics_path: str) -> dict[str, list[float | None]]:
    """Per rollout iteration: the training-mixture reward of the sampled pairs and the mean
    loss of its steps (from ``metrics.jsonl``)."""
    from drorebel.trainer.metrics import read_jsonl

    by_it: dict[int, list[dict]] = {}
    for row in read_jsonl(metrics_path):
        by_it.setdefault(int(row.get("rollout/iteration", 0)), []).append(row)
    its = sorted(by_it)
    return {"train_reward": [by_it[i][-1].get("rewards/mean") for i in its],
            "loss": [statistics.fmean(r["loss"] for r in by_it[i]) for i in its]}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[preference-shift-real] {msg}", flush=True)


def _train_all(cfg: RealExperimentConfig, out: Path, train_file: str, progress: bool
               ) -> dict[str, list[dict]]:
    """Train every (method, seed) run that has no ``final`` model yet; returns run records."""
    from drorebel.trainer.loop import train

    runs: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    total, done = len(cfg.methods) * len(cfg.seeds), 0
    for seed in cfg.seeds:
        for method in cfg.methods:
            done += 1
            run_dir = out / method / f"seed{seed}"
            tcfg = cfg.run_config(method, seed, str(run_dir), train_file)
            final = run_dir / "final"
            t0 = time.perf_counter()
            if final.exists():
                _log(f"[{done}/{total}] {method} seed {seed}: already trained ({final})", progress)
            else:
                _log(f"[{done}/{total}] train {method} seed {seed} ({tcfg.max_steps} steps, "
                     f"divergence={tcfg.divergence}, rho={tcfg.rho}) -> {run_dir}", progress)
                train(tcfg)
                _free(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
            runs[method].append({"seed": seed, "dir": str(run_dir), "final": str(final),
                                 "train_s": time.perf_counter() - t0, "config": tcfg,
                                 "curve": _curve(str(run_dir / "metrics.jsonl"))})
    return runs


def _eval_prompts(cfg: RealExperimentConfig, first: TrainConfig, tokenizer: Any,
                  eval_file: str) -> Any:
    """The held-out prompts, capped at ``max_eval_prompts`` (the first ones kept)."""
    from drorebel.trainer.rollout import load_prompts

    prompts = load_prompts(eval_file, tokenizer, first.max_prompt_length, first.overlong)
    if cfg.max_eval_prompts is not None and len(prompts) > cfg.max_eval_prompts:
        m = cfg.max_eval_prompts
        prompts.ids, prompts.texts, prompts.messages, prompts.rows = (
            prompts.ids[:m], prompts.texts[:m], prompts.messages[:m], prompts.rows[:m])
        prompts.columns = {k: v[:m] for k, v in prompts.columns.items()}
    return prompts


def _evaluate_all(cfg: RealExperimentConfig, runs: dict[str, list[dict]], eval_file: str,
                  progress: bool) -> tuple[dict[str, list[dict]], list[dict]]:
    """Per-seed evaluations of every trained run and of the base model (one reward model)."""
    from drorebel.trainer.model import load_model, load_tokenizer
    from drorebel.trainer.online import build_reward

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    first = next(iter(runs.values()))[0]["config"]
    tokenizer = load_tokenizer(first)
    prompts = _eval_prompts(cfg, first, tokenizer, eval_file)
    reward = build_reward(first, device)
    _log(f"evaluating on {len(prompts)} held-out prompts x 2 samples ({eval_file})", progress)

    def one(tcfg: TrainConfig, seed: int, label: str) -> dict:
        model = load_model(dataclasses.replace(tcfg, gradient_checkpointing=False), device)
        t0 = time.perf_counter()
        res = evaluate_model(model, tokenizer, prompts, reward, cfg.eval_config(tcfg),
                             10_000 + seed, cfg.eval_batch_size, device)
        del model
        _free(device)
        low = worst(mixture_rewards(res["objective_means"], cfg.mixtures()))
        _log(f"eval {label} seed {seed}: objectives "
             f"{[round(x, 4) for x in res['objective_means']]}, worst mixture {low:.4f} "
             f"({time.perf_counter() - t0:.1f} s)", progress)
        return {"seed": seed, **res}

    base = []
    for r in runs[next(iter(runs))]:
        base.append(one(r["config"], r["seed"], "base"))
    per_seed: dict[str, list[dict]] = {m: [] for m in runs}
    for method, recs in runs.items():
        for r in recs:
            trained = TrainConfig.from_dict({**r["config"].to_dict(), "model": r["final"],
                                             "model_config": None, "tokenizer": r["final"],
                                             "resume": None})
            per_seed[method].append(one(trained, r["seed"], method))
    return per_seed, base


def run_experiment(cfg: RealExperimentConfig, out: str | Path, progress: bool = True) -> dict:
    """Train, evaluate and summarise every (method, seed); returns the results dict (keys:
    config, objectives, alpha_train, seen, unseen, seeds, mixtures, methods, base, per_seed,
    curves, runs, timing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_file, eval_file = split_prompts(cfg, out)
    runs = _train_all(cfg, out, train_file, progress)
    train_s = time.perf_counter() - start
    per_seed, base = _evaluate_all(cfg, runs, eval_file, progress)
    mix = cfg.mixtures()
    ref = per_seed[next(iter(per_seed))]
    summaries = {m: summarise_real(v, mix, cfg.alpha_train, None if v is ref else ref)
                 for m, v in per_seed.items()}
    config = {k: v for k, v in vars(cfg).items()}
    return {
        "config": config, "objectives": cfg.names(), "alpha_train": list(cfg.alpha_train),
        "seen": cfg.seen_pair(), "unseen": cfg.unseen_list(), "seeds": list(cfg.seeds),
        "mixtures": {"seen_alphas": list(cfg.seen_alphas), **mix},
        "methods": summaries, "base": summarise_real(base, mix, cfg.alpha_train, ref),
        "per_seed": per_seed | {"base": base},
        "curves": {m: [r["curve"] for r in recs] for m, recs in runs.items()},
        "runs": {m: [{"seed": r["seed"], "dir": r["dir"], "train_s": r["train_s"]}
                     for r in recs] for m, recs in runs.items()},
        "timing": {"total_s": time.perf_counter() - start, "train_s": train_s,
                   "prompt_files": {"train": train_file, "eval": eval_file}},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the CLI options of ``drorebel experiment preference-shift-real``."""
    parser.add_argument("--config", required=True,
                        help="experiment YAML (see configs/preference_shift_gpu.yaml)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="key=value: an experiment field, else a `train` (TrainConfig) "
                             "field; methods=[A, B] keeps only those methods (give all "
                             "key=value items in one group, not split by options)")
    parser.add_argument("--out", type=Path, default=Path("runs/preference-shift-real"),
                        help="output directory (runs, results.json, plots)")
    parser.add_argument("--no-progress", action="store_true", help="quiet: no progress output")


def run(args: argparse.Namespace) -> int:
    """Run the experiment; write ``results.json``, ``table.md``, ``mixtures.png`` and
    ``curves.png`` under ``--out``; print the table. Returns 0."""
    from drorebel.experiments.preference_shift.plot import plot_curves, plot_real_mixtures

    cfg = load_experiment(args.config, list(args.overrides))
    if args.no_progress:
        cfg.train = {**cfg.train, "progress": False}
    results = run_experiment(cfg, args.out, progress=not args.no_progress)
    out = Path(args.out)
    table = format_table(results["methods"] | {"base (no training)": results["base"]})
    table = table.replace("+calm", "+unseen")
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    (out / "table.md").write_text(table + "\n")
    plot_real_mixtures(results, out / "mixtures.png")
    plot_curves(results, out / "curves.png")
    print(table)
    t = results["timing"]
    print(f"\n{len(cfg.methods)} methods x {len(cfg.seeds)} seeds in {t['total_s']:.1f} s "
          f"(training {t['train_s']:.1f} s); wrote {out}")
    return 0
