"""Preference-shift demo: robustness of DRO-REBEL to reward mixtures it was not trained on.

``drorebel experiment preference-shift [--quick] [--seeds N] [--out DIR]``

The Emotion protocol of DRO-REBEL (Sahu & Wells, arXiv 2509.19104 §5) at laptop size: a tiny
Llama pretrained for seconds on a synthetic language
(:mod:`~drorebel.experiments.preference_shift.lang`, cached in ``--cache-dir``), a reward with
three objectives (:mod:`~drorebel.experiments.preference_shift.reward`: joy, formal, calm),
online training at ONE mixture ``α·joy + (1 − α)·formal`` with REBEL, χ²-REBEL, KL-REBEL,
Wasserstein-REBEL and DPO under an identical budget
(:mod:`~drorebel.experiments.preference_shift.train`), and evaluation at shifted mixtures of the
two seen objectives and with the unseen third one mixed in, reporting the mean and the worst case
over mixtures, mean ± std over seeds (:mod:`~drorebel.experiments.preference_shift.eval`).
REBEL is also evaluated at intermediate budgets: with the base model they trace REBEL's frontier
(worst case against training reward) per seed, and every method is reported as its paired gap
above that frontier (:mod:`~drorebel.experiments.preference_shift.frontier`) — robustness that
REBEL stopped earlier does not already give.
Writes ``results.json``, ``mixtures.png``, ``curves.png``, ``frontier.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from drorebel.experiments.preference_shift import mixtures as mx
from drorebel.experiments.preference_shift.eval import (
    SEEN_ALPHAS,
    evaluate_policy,
    mixture_rewards,
    mixtures,
    paired_worst_delta,
    summarise,
)
from drorebel.experiments.preference_shift.frontier import summarise_gaps
from drorebel.experiments.preference_shift.lang import BaseConfig, load_or_train_base
from drorebel.experiments.preference_shift.reward import OBJECTIVES
from drorebel.experiments.preference_shift.summary import format_table, worst
from drorebel.experiments.preference_shift.train import (
    TrainConfig,
    budgets,
    default_methods,
    train,
)

__all__ = ["QUICK", "FULL", "add_arguments", "run", "run_demo"]

# name -> (train iterations, prompts per iteration, seeds, held-out prompts, base steps)
FULL = {"iterations": 60, "prompts": 32, "seeds": 8, "eval_prompts": 512, "base_steps": 300}
QUICK = {"iterations": 6, "prompts": 16, "seeds": 2, "eval_prompts": 64, "base_steps": 120}
FRONTIER_BUDGETS = 5  # intermediate REBEL evaluations per seed (plus the base and the full run)


def _train_and_evaluate(base: Any, cfg: TrainConfig, seeds: list[int], eval_prompts: int,
                        progress: bool, frontier_at: list[int]
                        ) -> tuple[dict[str, list], dict[str, list]]:
    """Every (seed, method) run: ``(per_seed evaluations, training curves)`` by method name.
    The first method (REBEL) is also evaluated after every iteration count of ``frontier_at``
    (``curves[REBEL][seed]["snapshots"]``)."""
    from tqdm.auto import tqdm

    per_seed: dict[str, list] = {m.name: [] for m in cfg.methods}
    curves: dict[str, list] = {m.name: [] for m in cfg.methods}
    bar = tqdm(total=len(cfg.methods) * len(seeds) * cfg.iterations, desc="preference-shift",
               disable=not progress)
    for seed in seeds:
        for k, method in enumerate(cfg.methods):
            bar.set_postfix_str(f"{method.name} seed={seed}")
            snap = {} if k else {"evaluate_at": frontier_at,
                                 "evaluate": lambda m, s=seed: evaluate_policy(m, eval_prompts, s)}
            policy, curve = train(base, method, cfg, seed, progress=bar, **snap)
            per_seed[method.name].append(evaluate_policy(policy, eval_prompts, seed))
            curves[method.name].append(curve)
    bar.close()
    return per_seed, curves


def _point(objective_means: dict[str, float], weights: list[float]) -> list[float]:
    """``[training-mixture reward, worst case over all mixtures]`` of one evaluation."""
    train_reward = mx.mixture_value(weights, [objective_means[n] for n in OBJECTIVES], total=sum)
    return [train_reward, worst(mixture_rewards(objective_means))]


def _frontier(per_seed: dict[str, list], curves: dict[str, list], base_eval: list, ref: str,
              weights: list[float], frontier_at: list[int], iterations: int,
              summaries: dict[str, dict]) -> dict:
    """REBEL's frontier per seed (base, snapshots, full run) and every other method's paired gap
    above it (stored in ``summaries[name]["frontier_gap"]``); returns the frontier record."""
    evaluations = [[base_objs, *(ev for _, ev in curves[ref][s]["snapshots"]), per_seed[ref][s]]
                   for s, base_objs in enumerate(base_eval)]
    frontiers = [[_point(ev, weights) for ev in evals] for evals in evaluations]
    for name, evals in per_seed.items():
        if name != ref:
            points = [_point(ev, weights) for ev in evals]
            summaries[name]["frontier_gap"] = summarise_gaps(points, frontiers) | {
                "points": points}
    return {"reference": ref, "iterations": [0, *frontier_at, iterations],
            "per_seed": frontiers, "evaluations": evaluations}


def _summaries(per_seed: dict[str, list], base_eval: list, ref: str, weights: list[float]
               ) -> tuple[dict[str, dict], dict]:
    """Per-method and base-model summaries, with the seed-paired worst case minus ``ref``'s."""
    summaries = {name: summarise(v, weights) for name, v in per_seed.items()}
    for name, v in per_seed.items():
        if name != ref:
            summaries[name]["all_worst_minus_rebel"] = paired_worst_delta(v, per_seed[ref])
    base_summary = summarise(base_eval, weights)
    base_summary["all_worst_minus_rebel"] = paired_worst_delta(base_eval, per_seed[ref])
    return summaries, base_summary


def run_demo(cfg: TrainConfig, seeds: list[int], base_cfg: BaseConfig, cache_dir: str | Path,
             eval_prompts: int, progress: bool = True) -> dict:
    """Train every method of ``cfg`` on every seed, evaluate, summarise; returns the results dict
    (keys: config, base_model, seeds, mixtures, methods, base, frontier, per_seed, curves,
    timing)."""
    start = time.perf_counter()
    base, base_info = load_or_train_base(cache_dir, base_cfg, progress=progress)
    base_seconds = time.perf_counter() - start
    weights = [cfg.alpha, 1.0 - cfg.alpha, 0.0]
    base_eval = [evaluate_policy(base, eval_prompts, s) for s in seeds]
    frontier_at = budgets(cfg.iterations, FRONTIER_BUDGETS)
    per_seed, curves = _train_and_evaluate(base, cfg, seeds, eval_prompts, progress, frontier_at)
    # REBEL (the first method): the paired baseline and the frontier
    ref = cfg.methods[0].name
    summaries, base_summary = _summaries(per_seed, base_eval, ref, weights)
    frontier = _frontier(per_seed, curves, base_eval, ref, weights, frontier_at, cfg.iterations,
                         summaries)
    config = asdict(cfg) | {"eval_prompts": eval_prompts, "train_weights": weights}
    return {
        "config": config,
        "base_model": {k: v for k, v in base_info.items() if k not in ("trained", "path")},
        "seeds": list(seeds),
        "mixtures": {"seen_alphas": list(SEEN_ALPHAS), **mixtures()},
        "methods": summaries,
        "base": base_summary,
        "frontier": frontier,
        "per_seed": per_seed,
        "curves": curves,
        "timing": {"total_s": time.perf_counter() - start, "base_s": base_seconds,
                   "base_trained": base_info["trained"], "base_path": base_info["path"],
                   "threads": torch.get_num_threads()},
    }


def positive(kind):
    """argparse ``type=``: ``kind(text)``, refused (exit code 2) unless > 0."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the CLI options of ``drorebel experiment preference-shift``."""
    parser.add_argument("--out", type=Path, default=Path("runs/preference-shift"),
                        help="output directory (default runs/preference-shift)")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/preference-shift/base"),
                        help="where the tiny base LM is saved and reused")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run (< 1 min): {QUICK}")
    parser.add_argument("--seeds", type=positive(int), default=None,
                        help=f"number of seeds (default {FULL['seeds']})")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds are first-seed .. first-seed+N-1 (the radius sweep used "
                             "validation seeds 1000, 1001)")
    parser.add_argument("--iterations", type=positive(int), default=None,
                        help=f"online iterations per run (default {FULL['iterations']})")
    parser.add_argument("--lr", type=positive(float), default=1e-3, help="Adam learning rate")
    parser.add_argument("--eta", type=positive(float), default=0.2, help="REBEL η")
    parser.add_argument("--alpha", type=float, default=0.8,
                        help="training mixture α·joy + (1 − α)·formal (default 0.8)")
    parser.add_argument("--chi2-rho", type=positive(float), default=0.5, help="χ² radius")
    parser.add_argument("--kl-rho", type=positive(float), default=0.05, help="KL radius")
    parser.add_argument("--wasserstein-rho", type=positive(float), default=0.1,
                        help="Wasserstein radius (hidden-state penalty)")
    parser.add_argument("--dpo-beta", type=positive(float), default=0.1, help="DPO β")
    parser.add_argument("--threads", type=positive(int), default=1,
                        help="torch threads (1 is fastest for this tiny model)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _configs(args: argparse.Namespace) -> tuple[TrainConfig, list[int], BaseConfig, int]:
    preset = QUICK if args.quick else FULL
    methods = default_methods(chi2=args.chi2_rho, kl=args.kl_rho,
                              wasserstein=args.wasserstein_rho, dpo_beta=args.dpo_beta)
    cfg = TrainConfig(iterations=args.iterations or preset["iterations"],
                      prompts=preset["prompts"], lr=args.lr, eta=args.eta, alpha=args.alpha,
                      methods=methods)
    seeds = [args.first_seed + i for i in range(args.seeds or preset["seeds"])]
    return cfg, seeds, BaseConfig(steps=preset["base_steps"]), preset["eval_prompts"]


def run(args: argparse.Namespace) -> int:
    """Run the demo; write ``results.json``, ``mixtures.png``, ``curves.png``,
    ``frontier.png`` and ``table.md`` under ``--out``; print the table. Returns 0."""
    from drorebel.experiments.preference_shift.plot import (
        plot_curves,
        plot_frontier,
        plot_mixtures,
    )

    if not 0.0 <= args.alpha <= 1.0:
        raise SystemExit(f"--alpha must be in [0, 1], got {args.alpha}")
    torch.set_num_threads(args.threads)
    cfg, seeds, base_cfg, eval_prompts = _configs(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_demo(cfg, seeds, base_cfg, args.cache_dir, eval_prompts,
                       progress=not args.no_progress)
    table = format_table(results["methods"] | {"base (no training)": results["base"]})
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    (out / "table.md").write_text(table + "\n")
    plot_mixtures(results, out / "mixtures.png")
    plot_curves(results, out / "curves.png")
    plot_frontier(results, out / "frontier.png")
    t = results["timing"]
    print(table)
    print(f"\n{len(cfg.methods)} methods x {len(seeds)} seeds x {cfg.iterations} iterations in "
          f"{t['total_s']:.1f} s (base LM {'trained' if t['base_trained'] else 'loaded'} in "
          f"{t['base_s']:.1f} s, {t['base_path']}); wrote {out}")
    return 0
