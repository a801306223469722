"""Robustness protocol: is a DRO variant above REBEL's own trade-off frontier?

``drorebel experiment robustness [--design groups] [--regime online|offline|fitting] [--quick]``

Training less is a way to be robust, so a robustness claim is measured against REBEL stopped
earlier (:mod:`~drorebel.experiments.preference_shift.frontier`). On the preference-shift demo's
tiny Llama and three-objective reward, for one reward design
(:mod:`~drorebel.experiments.preference_shift.designs`: homogeneous, a population of groups, or
an ArmoRM-like random mixture per prompt) and one regime (``online``: fresh on-policy pairs each
iteration, reference = the sampling policy; ``fitting``: the same with four times the passes at a
quarter of the step, so each batch's regression is nearly solved; ``offline``: pairs sampled once
from the initial model, reference fixed to it, several epochs):

1. **Radii on validation seeds.** Every DRO variant (χ², KL, Wasserstein per pair; χ²/KL over
   groups where the design has groups) is trained at each radius of its grid on the validation
   seeds; the radius with the largest mean frontier gap there is kept. The reported seeds are
   never used to choose.
2. **Reported seeds.** REBEL (evaluated at 5 intermediate budgets plus the base model and the
   full run: its frontier per seed), every variant at its chosen radius, and DPO. Each method is
   reported as its paired gap above REBEL's frontier, mean ± standard error over seeds and the
   number of seeds above, for the worst group (the design's groups) and for the worst case over
   all reward mixtures, next to the raw rewards and the DRO weight each group receives per pass.

Writes ``results.json``, ``table.md`` and ``frontier.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from drorebel.experiments.preference_shift.demo import positive
from drorebel.experiments.preference_shift.designs import DESIGNS
from drorebel.experiments.preference_shift.eval import evaluate_policy, mixture_rewards
from drorebel.experiments.preference_shift.frontier import mean_se, summarise_gaps
from drorebel.experiments.preference_shift.lang import BaseConfig, load_or_train_base
from drorebel.experiments.preference_shift.summary import worst
from drorebel.experiments.preference_shift.train import Method, TrainConfig, budgets, train

__all__ = ["RADII", "PRESETS", "REGIME_NAMES", "add_arguments", "group_rewards", "run",
           "run_protocol"]

REGIME_NAMES = ("online", "fitting", "offline")
RADII: dict[str, tuple[float, ...]] = {
    "chi2": (0.1, 0.5, 2.0),
    "kl": (0.01, 0.05, 0.2),
    "wasserstein": (0.03, 0.1, 0.3),
    "group-chi2": (0.05, 0.3, 1.5),
    "group-kl": (0.02, 0.15, 1.0),
}
LABELS = {"chi2": "chi2-REBEL", "kl": "KL-REBEL", "wasserstein": "W-REBEL",
          "group-chi2": "group-chi2-REBEL", "group-kl": "group-KL-REBEL"}
PRESETS = {
    "full": {"iterations": 30, "prompts": 32, "val_seeds": 8, "seeds": 12, "eval_prompts": 256,
             "base_steps": 300},
    "quick": {"iterations": 4, "prompts": 8, "val_seeds": 1, "seeds": 2, "eval_prompts": 32,
              "base_steps": 60},
}
FRONTIER_BUDGETS = 5


def group_rewards(design: str, objs: dict[str, float], alpha: float, minority: float
                  ) -> dict[str, float]:
    """Mean reward of each group of the design from a policy's objective means: homogeneous —
    the training mixture; groups — the majority's (joy) and the minority's (formal); armorm —
    the joy-leaning and formal-leaning halves (``E[a | a ≥ ½] = ¾``)."""
    joy, formal = objs["joy"], objs["formal"]
    if design == "homogeneous":
        return {"all": alpha * joy + (1 - alpha) * formal}
    if design == "groups":
        return {f"majority (joy, {1 - minority:.0%})": joy,
                f"minority (formal, {minority:.0%})": formal}
    return {"joy-leaning": 0.75 * joy + 0.25 * formal,
            "formal-leaning": 0.25 * joy + 0.75 * formal}


def _population_weights(design: str, alpha: float, minority: float) -> tuple[float, float]:
    """(joy, formal) weights of the population's mean reward under the design."""
    a = {"homogeneous": alpha, "groups": 1 - minority, "armorm": 0.5}[design]
    return a, 1 - a


def _measures(objs: dict[str, float], cfg: TrainConfig) -> dict[str, float]:
    """Training reward (the population's), worst group and worst case over all mixtures."""
    wj, wf = _population_weights(cfg.design, cfg.alpha, cfg.minority)
    groups = group_rewards(cfg.design, objs, cfg.alpha, cfg.minority)
    return {"train": wj * objs["joy"] + wf * objs["formal"], "worst_group": min(groups.values()),
            "worst_mixture": worst(mixture_rewards(objs)), "groups": groups}


def _regime_config(regime: str, iterations: int, prompts: int, design: str,
                   minority: float) -> TrainConfig:
    cfg = TrainConfig(iterations=iterations, prompts=prompts, design=design, minority=minority)
    if regime == "fitting":
        return replace(cfg, passes=cfg.passes * 4, lr=cfg.lr / 4)
    if regime == "offline":
        return replace(cfg, regime="offline")
    return cfg


def _variants(design: str) -> list[str]:
    kinds = ["chi2", "kl", "wasserstein"]
    return kinds + (["group-chi2", "group-kl"] if design != "homogeneous" else [])


class _Runner:
    """Trains and evaluates (method, seed) runs with one progress bar."""

    def __init__(self, base: Any, cfg: TrainConfig, eval_prompts: int, total: int,
                 progress: bool) -> None:
        from tqdm.auto import tqdm

        self.base, self.cfg, self.eval_prompts = base, cfg, eval_prompts
        self.bar = tqdm(total=total, desc="robustness", disable=not progress)

    def evaluate(self, model: Any, seed: int) -> dict[str, float]:
        return evaluate_policy(model, self.eval_prompts, seed)

    def rebel(self, seed: int) -> tuple[list[dict], dict]:
        """REBEL's evaluations at 0, the intermediate budgets and the full run; its curves."""
        at = budgets(self.cfg.iterations, FRONTIER_BUDGETS)
        self.bar.set_postfix_str(f"REBEL seed={seed}")
        policy, curves = train(self.base, Method("REBEL", "rebel"), self.cfg, seed,
                               progress=self.bar, evaluate_at=at,
                               evaluate=lambda m: self.evaluate(m, seed))
        evals = [self.evaluate(self.base, seed), *(e for _, e in curves["snapshots"]),
                 self.evaluate(policy, seed)]
        return evals, curves

    def method(self, method: Method, seed: int) -> tuple[dict, dict]:
        self.bar.set_postfix_str(f"{method.name} seed={seed}")
        policy, curves = train(self.base, method, self.cfg, seed, progress=self.bar)
        return self.evaluate(policy, seed), curves


def _frontiers(rebel_evals: list[list[dict]], cfg: TrainConfig, key: str) -> list[list]:
    return [[(m["train"], m[key]) for m in (_measures(e, cfg) for e in evals)]
            for evals in rebel_evals]


def _gaps(evals: list[dict], rebel_evals: list[list[dict]], cfg: TrainConfig, key: str) -> dict:
    points = [(m["train"], m[key]) for m in (_measures(e, cfg) for e in evals)]
    return summarise_gaps(points, _frontiers(rebel_evals, cfg, key)) | {"points": points}


def _share(curves: list[dict]) -> dict[str, float] | None:
    """Mean over seeds and passes of the minority group's (group 1) DRO weight share and of its
    share of the pairs."""
    rows = [s for c in curves for s in c.get("group_share", []) if s is not None]
    if not rows:
        return None
    return {"weight": mean_se([r[1][0] for r in rows])["mean"],
            "pairs": mean_se([r[1][1] for r in rows])["mean"]}


def _report(name: str, evals: list[dict], curves: list[dict], rebel_evals: list[list[dict]],
            cfg: TrainConfig, primary: str, param: float | None = None) -> dict:
    ms = [_measures(e, cfg) for e in evals]
    out: dict[str, Any] = {
        "param": param,
        "train": mean_se([m["train"] for m in ms]),
        "worst_group": mean_se([m["worst_group"] for m in ms]),
        "worst_mixture": mean_se([m["worst_mixture"] for m in ms]),
        "groups": {g: mean_se([m["groups"][g] for m in ms]) for g in ms[0]["groups"]},
        "minority_share": _share(curves),
        "evaluations": evals,
    }
    if name != "REBEL":
        for key in ("worst_group", "worst_mixture"):
            out[f"gap_{key}"] = _gaps(evals, rebel_evals, cfg, key)
        out["frontier_gap"] = out[f"gap_{primary}"]  # what plot_frontier draws
    return out


def run_protocol(design: str, regime: str, val_seeds: list[int], seeds: list[int], *,
                 iterations: int, prompts: int, eval_prompts: int, base_cfg: BaseConfig,
                 cache_dir: str | Path, minority: float = 0.2, dpo_beta: float = 0.1,
                 radii: dict[str, tuple[float, ...]] | None = None, progress: bool = True
                 ) -> dict:
    """Choose each variant's radius on ``val_seeds``, then report every method on ``seeds``
    against REBEL's frontier (see the module docstring); returns the results dict."""
    start = time.perf_counter()
    radii = RADII if radii is None else radii
    cfg = _regime_config(regime, iterations, prompts, design, minority)
    primary = "worst_mixture" if design == "homogeneous" else "worst_group"
    base, _ = load_or_train_base(cache_dir, base_cfg, progress=progress)
    kinds = _variants(design)
    n_val = len(val_seeds) * (1 + sum(len(radii[k]) for k in kinds))
    runner = _Runner(base, cfg, eval_prompts, (n_val + len(seeds) * (len(kinds) + 2))
                     * cfg.iterations, progress)
    # 1. radii on the validation seeds
    val_rebel = [runner.rebel(s)[0] for s in val_seeds]
    validation: dict[str, dict] = {}
    chosen: dict[str, float] = {}
    for kind in kinds:
        validation[kind] = {}
        for rho in radii[kind]:
            evals = [runner.method(Method(LABELS[kind], kind, rho), s)[0] for s in val_seeds]
            g = _gaps(evals, val_rebel, cfg, primary)
            validation[kind][str(rho)] = {"mean": g["mean"], "se": g["se"], "above": g["above"]}
        chosen[kind] = max(radii[kind], key=lambda r, k=kind: validation[k][str(r)]["mean"])
    # 2. the reported seeds
    rebel_runs = [runner.rebel(s) for s in seeds]
    rebel_evals = [evals for evals, _ in rebel_runs]
    methods = {"REBEL": _report("REBEL", [e[-1] for e in rebel_evals],
                                [c for _, c in rebel_runs], rebel_evals, cfg, primary)}
    for method in [Method(LABELS[k], k, chosen[k]) for k in kinds] + [
            Method("DPO", "dpo", dpo_beta)]:
        runs = [runner.method(method, s) for s in seeds]
        methods[method.name] = _report(method.name, [e for e, _ in runs], [c for _, c in runs],
                                       rebel_evals, cfg, primary, method.param)
    runner.bar.close()
    return {
        "design": design, "regime": regime, "primary": primary,
        "config": asdict(replace(cfg, methods=[])) | {"eval_prompts": eval_prompts},
        "val_seeds": val_seeds, "seeds": seeds, "radii": {k: list(radii[k]) for k in kinds},
        "validation": validation, "chosen": chosen, "methods": methods,
        "frontier": {"reference": "REBEL",
                     "iterations": [0, *budgets(cfg.iterations, FRONTIER_BUDGETS),
                                    cfg.iterations],
                     "per_seed": _frontiers(rebel_evals, cfg, primary),
                     "evaluations": rebel_evals},
        "timing": {"total_s": time.perf_counter() - start, "threads": torch.get_num_threads()},
    }


def format_protocol_table(results: dict) -> str:
    """Markdown table of :func:`run_protocol`'s results (mean ± s.e. over the reported seeds)."""
    def ms(d: dict) -> str:
        return f"{d['mean']:.3f} ± {d['se']:.3f}"

    def gap(d: dict | None) -> str:
        return "" if d is None else f"{d['mean']:+.3f} ± {d['se']:.3f} ({d['above']}/{d['n']})"

    grouped = results["design"] != "homogeneous"  # one group: its reward is the train reward
    head = ["method", "radius / β", "train reward", "worst group", "worst mixture",
            "gap: worst group", "gap: worst mixture", "minority DRO weight (pairs)"]
    keep = [k for k, h in enumerate(head) if grouped or h not in (
        "worst group", "gap: worst group", "minority DRO weight (pairs)")]
    lines = ["| " + " | ".join(head[k] for k in keep) + " |", "|" + "---|" * len(keep)]
    for name, s in results["methods"].items():
        share = s["minority_share"]
        cells = [name, "" if s["param"] is None else f"{s['param']:g}", ms(s["train"]),
                 ms(s["worst_group"]), ms(s["worst_mixture"]), gap(s.get("gap_worst_group")),
                 gap(s.get("gap_worst_mixture")),
                 "" if share is None else f"{share['weight']:.3f} ({share['pairs']:.3f})"]
        lines.append("| " + " | ".join(cells[k] for k in keep) + " |")
    return "\n".join(lines)


def _share_arg(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"must be in (0, 0.5), got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the CLI options of ``drorebel experiment robustness``."""
    parser.add_argument("--design", choices=DESIGNS, default="groups",
                        help="who scores a pair (default groups: 80%% joy, 20%% formal)")
    parser.add_argument("--regime", choices=REGIME_NAMES, default="online",
                        help="online, fitting (4x passes at 1/4 step) or offline (fixed pairs "
                             "from the initial model, several epochs)")
    parser.add_argument("--minority", type=_share_arg, default=0.2,
                        help="the minority group's share (design groups)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {PRESETS['quick']}")
    count, full = positive(int), PRESETS["full"]
    parser.add_argument("--seeds", type=count, default=None,
                        help=f"number of reported seeds (default {full['seeds']})")
    parser.add_argument("--val-seeds", type=count, default=None, help="number of validation "
                        f"seeds (default {full['val_seeds']}; numbered from 1000)")
    parser.add_argument("--iterations", type=count, default=None,
                        help=f"iterations per run (default {full['iterations']})")
    parser.add_argument("--out", type=Path, default=Path("runs/robustness"),
                        help="output directory: results.json, table.md, frontier.png "
                             "(default runs/robustness)")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/preference-shift/base"),
                        help="where the tiny base LM is saved and reused")
    parser.add_argument("--threads", type=count, default=1, help="torch threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the protocol; write ``results.json``, ``table.md``, ``frontier.png``; print the
    table. Returns 0."""
    from drorebel.experiments.preference_shift.plot import plot_frontier

    preset = PRESETS["quick" if args.quick else "full"]
    torch.set_num_threads(args.threads)
    val_seeds = [1000 + i for i in range(args.val_seeds or preset["val_seeds"])]
    seeds = list(range(args.seeds or preset["seeds"]))
    results = run_protocol(args.design, args.regime, val_seeds, seeds,
                           iterations=args.iterations or preset["iterations"],
                           prompts=preset["prompts"], eval_prompts=preset["eval_prompts"],
                           base_cfg=BaseConfig(steps=preset["base_steps"]),
                           cache_dir=args.cache_dir, minority=args.minority,
                           progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_protocol_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    (out / "table.md").write_text(table + "\n")
    plot_frontier(results, out / "frontier.png")
    chosen = ", ".join(f"{LABELS[k]} {v:g}" for k, v in results["chosen"].items())
    print(table)
    print(f"\ndesign={args.design} regime={args.regime}: radii chosen on {len(val_seeds)} "
          f"validation seeds: {chosen}; {len(seeds)} reported seeds; "
          f"{results['timing']['total_s']:.0f} s; wrote {out}")
    return 0
