"""Evaluation of the preference-shift demo: mean reward at unseen mixtures, worst case over them.

A policy is sampled once on a fixed set of held-out prompts; since every mixture reward is linear
in the objectives, ``E r_w = w · E[r_joy, r_formal, r_calm]`` gives the mean reward of every
mixture ``w`` from the same samples. Mixtures (DRO-REBEL, arXiv 2509.19104 §5, Emotion protocol):

* ``seen``: ``w = (α, 1 − α, 0)`` for α ∈ {0, 0.1, …, 1} — shifted mixtures of the two objectives
  seen in training (training used one α);
* ``unseen``: ``w = (1 − β)·(α, 1 − α, 0) + β·(0, 0, 1)`` for β ∈ {0.25, 0.5}, α ∈ {0, 0.5, 1} —
  the third objective (calm), never rewarded in training, mixed in.

Per method and seed: the mean and the worst case (min) over each set; reported as mean ± std over
seeds.
"""

from __future__ import annotations

import random
import statistics

import torch

from drorebel.experiments.preference_shift_lang import PROMPT_LEN, sample_prompts
from drorebel.experiments.preference_shift_reward import OBJECTIVES, token_objectives
from drorebel.experiments.preference_shift_train import sample_responses

__all__ = ["SEEN_ALPHAS", "UNSEEN", "evaluate_policy", "format_table", "mixtures",
           "paired_worst_delta", "summarise"]

SEEN_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
UNSEEN = tuple((beta, alpha) for beta in (0.25, 0.5) for alpha in (0.0, 0.5, 1.0))


def mixtures() -> dict[str, dict[str, list[float]]]:
    """``{"seen": {label: w}, "unseen": {label: w}}`` with ``w`` over (joy, formal, calm)."""
    seen = {f"a={a:.1f}": [a, 1.0 - a, 0.0] for a in SEEN_ALPHAS}
    unseen = {f"b={b:.2f},a={a:.1f}": [(1 - b) * a, (1 - b) * (1 - a), b] for b, a in UNSEEN}
    return {"seen": seen, "unseen": unseen}


def evaluate_policy(model, prompts: int, seed: int) -> dict[str, float]:
    """Mean objectives of one sample per held-out prompt (prompt set and sampling seeded by
    ``seed``): ``{objective: mean}`` plus ``mean_words``."""
    held_out = torch.tensor(sample_prompts(prompts, random.Random(10_000 + seed)))
    torch.manual_seed(10_000 + seed)
    resp = sample_responses(model, held_out)[:, PROMPT_LEN:]
    objs = token_objectives(resp).mean(0)
    words = ((resp != 1).long().cumsum(1) == torch.arange(1, resp.shape[1] + 1)).sum(1)
    out = {name: float(objs[k]) for k, name in enumerate(OBJECTIVES)}
    out["mean_words"] = float(words.double().mean())
    return out


def mixture_rewards(objective_means: dict[str, float]) -> dict[str, dict[str, float]]:
    """Mean reward of every mixture from the objective means."""
    obj = [objective_means[name] for name in OBJECTIVES]
    return {group: {label: sum(wi * oi for wi, oi in zip(w, obj)) for label, w in ws.items()}
            for group, ws in mixtures().items()}


def _stats(values: list[float]) -> dict[str, float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": sd}


def summarise(per_seed: list[dict[str, float]], train_weights: list[float]) -> dict:
    """Per-method summary over seeds from per-seed objective means: mean ± std of the training
    mixture reward, of the mean and the worst case over ``seen``, ``unseen`` and ``all`` mixtures,
    and of every single mixture (``per_mixture``)."""
    rows = [mixture_rewards(obj) for obj in per_seed]
    summary: dict[str, dict] = {
        "train_mixture": _stats([sum(w * o[n] for w, n in zip(train_weights, OBJECTIVES))
                                 for o in per_seed]),
    }
    for group in ("seen", "unseen", "all"):
        vals = [list(r["seen"].values()) + list(r["unseen"].values()) if group == "all"
                else list(r[group].values()) for r in rows]
        summary[f"{group}_mean"] = _stats([statistics.fmean(v) for v in vals])
        summary[f"{group}_worst"] = _stats([min(v) for v in vals])
    summary["per_mixture"] = {
        group: {label: _stats([r[group][label] for r in rows]) for label in rows[0][group]}
        for group in ("seen", "unseen")
    }
    summary["objectives"] = {name: _stats([o[name] for o in per_seed])
                             for name in (*OBJECTIVES, "mean_words")}
    return summary


def paired_worst_delta(per_seed: list[dict[str, float]], ref: list[dict[str, float]]) -> dict:
    """Mean ± std over seeds of ``worst(method) − worst(ref)`` over all mixtures, paired by seed
    (the same seed shares the first sampled batch and the held-out prompts)."""
    worst = [min([*r["seen"].values(), *r["unseen"].values()])
             for r in map(mixture_rewards, per_seed)]
    worst_ref = [min([*r["seen"].values(), *r["unseen"].values()])
                 for r in map(mixture_rewards, ref)]
    return _stats([a - b for a, b in zip(worst, worst_ref)])


def format_table(summaries: dict[str, dict]) -> str:
    """Markdown table: one row per method, mean ± std over seeds; best mean per column in bold;
    a last column with the paired difference of the worst case to REBEL where present."""
    cols = [("train_mixture", "train mix"), ("seen_mean", "seen α: mean"),
            ("seen_worst", "seen α: worst"), ("unseen_mean", "+calm: mean"),
            ("unseen_worst", "+calm: worst"), ("all_worst", "all: worst")]
    best = {key: max(s[key]["mean"] for s in summaries.values()) for key, _ in cols}
    lines = ["| method | " + " | ".join(h for _, h in cols) + " | all: worst − REBEL (paired) |",
             "|---|" + "---|" * (len(cols) + 1)]
    for name, s in summaries.items():
        cells = []
        for key, _ in cols:
            text = f"{s[key]['mean']:.3f} ± {s[key]['std']:.3f}"
            cells.append(f"**{text}**" if s[key]["mean"] == best[key] else text)
        d = s.get("all_worst_minus_rebel")
        cells.append(f"{d['mean']:+.3f} ± {d['std']:.3f}" if d else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
