"""Reward mixtures of the preference-shift experiments: the evaluation grid and mixture rewards.

Both experiments (the laptop demo and ``preference-shift-real``) train at ONE mixture of ``k``
objectives and evaluate at (DRO-REBEL, arXiv 2509.19104 §5, Emotion protocol)

* ``seen`` mixtures ``w = a·e_s0 + (1 − a)·e_s1`` of the two seen objectives ``s0, s1``;
* ``unseen`` mixtures ``w = (1 − β)·(a·e_s0 + (1 − a)·e_s1) + β·e_u`` for every objective ``u``
  outside training.

A mixture reward is linear in the objectives, so the mean reward of every mixture is
``w · E[r_1..r_k]`` from one set of scored samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

__all__ = ["Mixtures", "mixture_grid", "mixture_rewards", "mixture_value"]

# {"seen": {label: w}, "unseen": {label: w}}, each w a k-vector of objective weights
Mixtures = dict[str, dict[str, list[float]]]
Total = Callable[[Iterable[float]], float]


def mixture_grid(names: Sequence[str], seen: Sequence[int], unseen: Sequence[int], *,
                 seen_alphas: Iterable[float], unseen_betas: Sequence[float],
                 unseen_alphas: Sequence[float], seen_label: str = "a={a:g}",
                 unseen_label: str = "+{name} b={b:g},a={a:g}") -> Mixtures:
    """The evaluation mixtures over the objectives ``names`` (see the module docstring).

    ``seen`` is the pair ``(s0, s1)``; labels are ``str.format`` templates with the fields
    ``a`` (and ``b``, ``name`` of the unseen objective for ``unseen_label``). The unseen
    mixtures are ordered by objective, then β, then a."""
    k = len(names)
    s0, s1 = seen

    def two(a: float) -> list[float]:
        w = [0.0] * k
        w[s0], w[s1] = a, 1.0 - a
        return w

    seen_w = {seen_label.format(a=a): two(a) for a in seen_alphas}
    unseen_w = {}
    for u in unseen:
        for b in unseen_betas:
            for a in unseen_alphas:
                w = [(1.0 - b) * x for x in two(a)]
                w[u] += b
                unseen_w[unseen_label.format(name=names[u], b=b, a=a)] = w
    return {"seen": seen_w, "unseen": unseen_w}


def mixture_value(weights: Sequence[float], objective_means: Sequence[float],
                  total: Total = math.fsum) -> float:
    """``E r_w = Σ_j w_j E r_j``, summed by ``total`` (``math.fsum``: correctly rounded; the
    demo passes the builtin ``sum``, left to right, which its published numbers used)."""
    return total(wj * oj for wj, oj in zip(weights, objective_means))


def mixture_rewards(objective_means: Sequence[float], mixtures: Mixtures,
                    total: Total = math.fsum) -> dict[str, dict[str, float]]:
    """``E r_w = Σ_j w_j E r_j`` for every mixture ``w`` of every group (see
    :func:`mixture_value` for ``total``)."""
    return {group: {label: mixture_value(w, objective_means, total) for label, w in ws.items()}
            for group, ws in mixtures.items()}
