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
from typing import Any

import torch

from drorebel.experiments.preference_shift import mixtures as mx
from drorebel.experiments.preference_shift import summary
from drorebel.experiments.preference_shift.lang import PROMPT_LEN, sample_prompts
from drorebel.experiments.preference_shift.reward import OBJECTIVES, token_objectives
from drorebel.experiments.preference_shift.train import sample_responses

__all__ = ["SEEN_ALPHAS", "UNSEEN", "evaluate_policy", "mixture_rewards", "mixtures",
           "paired_worst_delta", "summarise"]

SEEN_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
UNSEEN_BETAS = (0.25, 0.5)
UNSEEN_ALPHAS = (0.0, 0.5, 1.0)
UNSEEN = tuple((beta, alpha) for beta in UNSEEN_BETAS for alpha in UNSEEN_ALPHAS)


def mixtures() -> mx.Mixtures:
    """``{"seen": {label: w}, "unseen": {label: w}}`` with ``w`` over (joy, formal, calm)."""
    return mx.mixture_grid(OBJECTIVES, (0, 1), (2,), seen_alphas=SEEN_ALPHAS,
                           unseen_betas=UNSEEN_BETAS, unseen_alphas=UNSEEN_ALPHAS,
                           seen_label="a={a:.1f}", unseen_label="b={b:.2f},a={a:.1f}")


def evaluate_policy(model: Any, prompts: int, seed: int) -> dict[str, float]:
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


def _means(objective_means: dict[str, float]) -> list[float]:
    return [objective_means[name] for name in OBJECTIVES]


def mixture_rewards(objective_means: dict[str, float]) -> dict[str, dict[str, float]]:
    """Mean reward of every demo mixture from the objective means ``{objective: mean}``
    (:func:`~drorebel.experiments.preference_shift.mixtures.mixture_rewards` over
    :func:`mixtures`, summed left to right)."""
    return mx.mixture_rewards(_means(objective_means), mixtures(), total=sum)


def summarise(per_seed: list[dict[str, float]], train_weights: list[float]) -> dict:
    """Per-method summary over seeds from per-seed objective means: mean ± std of the training
    mixture reward, of the mean and the worst case over ``seen``, ``unseen`` and ``all`` mixtures,
    of every single mixture (``per_mixture``) and of every objective (``objectives``)."""
    out = summary.summarise_rows([mixture_rewards(o) for o in per_seed],
                                 [mx.mixture_value(train_weights, _means(o), total=sum)
                                  for o in per_seed])
    out["objectives"] = {name: summary.stats([o[name] for o in per_seed])
                         for name in (*OBJECTIVES, "mean_words")}
    return out


def paired_worst_delta(per_seed: list[dict[str, float]], ref: list[dict[str, float]]) -> dict:
    """Mean ± std over seeds of ``worst(method) − worst(ref)`` over all mixtures, paired by seed
    (the same seed shares the first sampled batch and the held-out prompts)."""
    return summary.paired_worst_delta([mixture_rewards(o) for o in per_seed],
                                      [mixture_rewards(o) for o in ref])
