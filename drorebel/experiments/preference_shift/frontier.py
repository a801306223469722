"""REBEL's own trade-off frontier: the honest baseline for a robustness claim.

Training less is a way to be robust: in the preference-shift demo every trained model's worst
case is below the untrained model's, so a method that simply moves less from the base model
"wins" on the worst case. A robust variant earns a robustness claim only if it beats what REBEL
itself reaches when it is stopped earlier.

Per seed, REBEL is evaluated at several training budgets (the base model, intermediate
iterations, the full run). Each evaluation is a point

    (x, y) = (reward at the training mixture, worst case over all mixtures)

and the points, ordered by ``x``, joined by straight lines, are REBEL's frontier ``f_s`` on that
seed. A method's **frontier gap** on seed ``s`` is

    gap_s = y_method,s − f_s(x_method,s)

(positive: above REBEL's trade-off, a real robustness gain at that training reward; negative:
below it). Outside the range of REBEL's points ``f_s`` is held flat at the nearest end point,
which favours REBEL: its worst case falls with training reward in this demo. Reported: the mean
gap ± its standard error over seeds (the gap is paired: the same seed shares the sampled
batches' seeds and the held-out prompts), and how many seeds are above.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["frontier_points", "frontier_value", "frontier_gap", "mean_se", "summarise_gaps"]

Point = tuple[float, float]


def frontier_points(points: Sequence[Point]) -> list[Point]:
    """``points`` (x, y) sorted by x, with points of equal x merged into their mean y."""
    if not points:
        raise ValueError("a frontier needs at least one (train reward, worst case) point")
    by_x: dict[float, list[float]] = {}
    for x, y in points:
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"frontier point ({x}, {y}) is not finite")
        by_x.setdefault(float(x), []).append(float(y))
    return [(x, statistics.fmean(ys)) for x, ys in sorted(by_x.items())]


def frontier_value(points: Sequence[Point], x: float) -> float:
    """The frontier at ``x``: linear interpolation between the sorted points, flat outside."""
    pts = frontier_points(points)
    if x <= pts[0][0]:
        return pts[0][1]
    if x >= pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError("unreachable: x lies inside the sorted points")


def frontier_gap(point: Point, frontier: Sequence[Point]) -> float:
    """``y − f(x)`` of a method's point ``(x, y)`` against a frontier."""
    return float(point[1]) - frontier_value(frontier, float(point[0]))


def mean_se(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "se", "n"}``: the mean and its standard error (sample std / sqrt(n); 0 for a
    single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    se = statistics.stdev(values) / math.sqrt(n) if n > 1 else 0.0
    return {"mean": statistics.fmean(values), "se": se, "n": n}


def summarise_gaps(method_points: Sequence[Point], frontiers: Sequence[Sequence[Point]]
                   ) -> dict[str, float]:
    """Frontier gaps of one method over seeds (``method_points[s]`` against ``frontiers[s]``):
    mean ± s.e., the per-seed gaps, and the number of seeds with a positive gap."""
    if len(method_points) != len(frontiers):
        raise ValueError(f"{len(method_points)} method points but {len(frontiers)} frontiers")
    gaps = [frontier_gap(p, f) for p, f in zip(method_points, frontiers)]
    return mean_se(gaps) | {"gaps": gaps, "above": sum(g > 0 for g in gaps)}
