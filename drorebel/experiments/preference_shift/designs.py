"""Who scores a pair: the reward designs of the preference-shift experiments.

* ``homogeneous`` (the demo's default): every pair is scored by the same mixture
  ``α·joy + (1 − α)·formal``; one group.
* ``groups``: a population of users. Each sampled prompt is scored by ONE objective drawn for it:
  the majority (group 0, share ``1 − minority``) by joy, the minority (group 1, share
  ``minority``) by formal. The prompt does not reveal the group (it is drawn independently of the
  prompt), so a policy cannot serve both; the population's mean reward is the homogeneous mixture
  with ``α = 1 − minority``. This is where a worst-case distribution has an under-served part of
  the data to find (DRO-REBEL, arXiv 2509.19104, motivates robustness by such preference shift).
* ``armorm``: each prompt is scored by its own random mixture ``a·joy + (1 − a)·formal`` with
  ``a ~ U(0, 1)`` (the ArmoRM-like design of the paper's §5: mixtures of objectives); groups
  ``a ≥ ½`` (0: joy-leaning) and ``a < ½`` (1: formal-leaning).

The draws use their own random stream (seeded from the run's seed), so the prompts and the
policy's samples are the same under every design: designs compare paired by seed.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

__all__ = ["DESIGNS", "design_rng", "score_weights"]

DESIGNS = ("homogeneous", "groups", "armorm")


def design_rng(seed: int) -> random.Random:
    """The design's own random stream for a run seeded by ``seed``."""
    return random.Random(f"design-{seed}")


def score_weights(design: str, n: int, rng: random.Random, *, alpha: float,
                  minority: float) -> tuple[Tensor | None, Tensor | None]:
    """Per-pair objective weights ``[n, 3]`` (float64, over joy, formal, calm) and group ids
    ``[n]`` (int64) for ``n`` prompts. ``homogeneous``: ``(None, None)`` — the scalar mixture of
    the training config, and no draw from ``rng``."""
    if design == "homogeneous":
        return None, None
    w = torch.zeros(n, 3, dtype=torch.float64)
    if design == "groups":
        groups = torch.tensor([int(rng.random() < minority) for _ in range(n)])
        w[torch.arange(n), groups] = 1.0  # group 0 -> joy, group 1 -> formal
        return w, groups
    if design == "armorm":
        a = torch.tensor([rng.random() for _ in range(n)], dtype=torch.float64)
        w[:, 0], w[:, 1] = a, 1.0 - a
        return w, (a < 0.5).long()
    raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
