"""Summaries over seeds of the preference-shift experiments (the demo and the real-model run).

Input: per seed, the mean reward of every mixture (:func:`~.mixtures.mixture_rewards`). Output:
mean ± std over seeds of the training-mixture reward, of the mean and the worst case (min) over
the ``seen``, ``unseen`` and ``all`` mixtures and of every single mixture, the seed-paired
difference of the worst case to a reference method (REBEL), and a Markdown table of them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["format_table", "paired_worst_delta", "stats", "summarise_rows", "worst"]

MixtureRewards = dict[str, dict[str, float]]  # {"seen": {label: E r_w}, "unseen": {...}}


def stats(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std"}`` of ``values`` (sample std; 0 for a single value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": sd}


def worst(rewards: MixtureRewards) -> float:
    """The worst case (min) over all mixtures, seen and unseen."""
    return min([*rewards["seen"].values(), *rewards["unseen"].values()])


def summarise_rows(rows: list[MixtureRewards], train_rewards: list[float]) -> dict[str, Any]:
    """Mean ± std over seeds (one entry of ``rows`` / ``train_rewards`` per seed) of the
    training-mixture reward (``train_mixture``), of the mean and the worst case over the
    ``seen``, ``unseen`` and ``all`` mixtures (``<group>_mean``, ``<group>_worst``) and of every
    single mixture (``per_mixture``)."""
    out: dict[str, Any] = {"train_mixture": stats(train_rewards)}
    for group in ("seen", "unseen", "all"):
        vals = [[*r["seen"].values(), *r["unseen"].values()] if group == "all"
                else list(r[group].values()) for r in rows]
        out[f"{group}_mean"] = stats([statistics.fmean(v) for v in vals])
        out[f"{group}_worst"] = stats([min(v) for v in vals])
    out["per_mixture"] = {g: {lab: stats([r[g][lab] for r in rows]) for lab in rows[0][g]}
                          for g in ("seen", "unseen")}
    return out


def paired_worst_delta(rows: list[MixtureRewards], ref_rows: list[MixtureRewards]
                       ) -> dict[str, float]:
    """Mean, std and standard error (std / sqrt(n)) over seeds of ``worst(method) −
    worst(ref)``, paired by seed (the same seed shares the first sampled batch and the held-out
    prompts)."""
    out = stats([worst(a) - worst(b) for a, b in zip(rows, ref_rows)])
    return out | {"se": out["std"] / math.sqrt(len(rows))}


def format_table(summaries: dict[str, dict]) -> str:
    """Markdown table: one row per method, mean ± std over seeds; best mean per column in bold;
    a column with the paired difference of the worst case to REBEL (mean ± standard error)
    where present, and, when any method has one, the gap to REBEL's frontier (mean ± s.e.,
    seeds above; :mod:`~drorebel.experiments.preference_shift.frontier`)."""
    cols = [("train_mixture", "train mix"), ("seen_mean", "seen α: mean"),
            ("seen_worst", "seen α: worst"), ("unseen_mean", "+calm: mean"),
            ("unseen_worst", "+calm: worst"), ("all_worst", "all: worst")]
    best = {key: max(s[key]["mean"] for s in summaries.values()) for key, _ in cols}
    frontier = any("frontier_gap" in s for s in summaries.values())
    extra = ["all: worst − REBEL (paired, ± s.e.)"]
    extra += ["gap to REBEL's frontier (± s.e., seeds above)"] if frontier else []
    lines = ["| method | " + " | ".join([*(h for _, h in cols), *extra]) + " |",
             "|---|" + "---|" * (len(cols) + len(extra))]
    for name, s in summaries.items():
        cells = []
        for key, _ in cols:
            text = f"{s[key]['mean']:.3f} ± {s[key]['std']:.3f}"
            cells.append(f"**{text}**" if s[key]["mean"] == best[key] else text)
        d = s.get("all_worst_minus_rebel")
        cells.append(f"{d['mean']:+.3f} ± {d.get('se', d['std']):.3f}" if d else "")
        if frontier:
            g = s.get("frontier_gap")
            cells.append(f"{g['mean']:+.3f} ± {g['se']:.3f} ({g['above']}/{g['n']})" if g else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
