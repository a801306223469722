"""Radius–coverage study: estimation rate and coverage of DRO-REBEL vs the radius schedule.

``drorebel experiment radius-coverage --out DIR [--quick]`` (DRO-REBEL, arXiv 2509.19104 §4):
the study and its CLI (:mod:`.study`), the pair generator and radius schedules (:mod:`.data`),
the batched robust estimators (:mod:`.solvers`) and the plot (:mod:`.plot`, matplotlib imported
on use). Importing the package does not load matplotlib.
"""

from drorebel.experiments.radius_coverage.data import GENERATORS, SCHEDULES, Generator, radius
from drorebel.experiments.radius_coverage.plot import plot_results
from drorebel.experiments.radius_coverage.solvers import FitResult, fit
from drorebel.experiments.radius_coverage.study import (
    DIVERGENCES,
    StudyConfig,
    add_arguments,
    default_constants,
    format_table,
    loglog_slope,
    robust_at_truth,
    run,
    run_study,
)

__all__ = [
    "DIVERGENCES",
    "GENERATORS",
    "SCHEDULES",
    "FitResult",
    "Generator",
    "StudyConfig",
    "add_arguments",
    "default_constants",
    "fit",
    "format_table",
    "loglog_slope",
    "plot_results",
    "radius",
    "robust_at_truth",
    "run",
    "run_study",
]
