"""Preference-shift experiments: robustness of DRO-REBEL to reward mixtures it was not trained on.

DRO-REBEL (Sahu & Wells, arXiv 2509.19104 §5, Emotion / ArmoRM protocol): train at ONE mixture of
several reward objectives, evaluate at shifted mixtures of the seen objectives and with unseen
objectives mixed in; report the mean and the worst case over mixtures, mean ± std over seeds.

* the laptop demo (``drorebel experiment preference-shift``): :mod:`.demo` on a tiny Llama and a
  synthetic language (:mod:`.lang`), a three-objective reward (:mod:`.reward`), the training loop
  (:mod:`.train`), its evaluation (:mod:`.eval`) and REBEL's frontier (:mod:`.frontier`);
* the real-model run (``drorebel experiment preference-shift-real``): :mod:`.real`, configured
  by :mod:`.real_config`, training with the online trainer;
* shared by both: the mixture grid and mixture rewards (:mod:`.mixtures`), the summaries over
  seeds and the table (:mod:`.summary`), the plots (:mod:`.plot`, matplotlib imported on use).

Importing the package loads neither transformers nor matplotlib.
"""

from drorebel.experiments.preference_shift.demo import FULL, QUICK, add_arguments, run, run_demo
from drorebel.experiments.preference_shift.eval import evaluate_policy, summarise
from drorebel.experiments.preference_shift.frontier import (
    frontier_gap,
    frontier_value,
    summarise_gaps,
)
from drorebel.experiments.preference_shift.lang import BaseConfig, load_or_train_base
from drorebel.experiments.preference_shift.mixtures import (
    mixture_grid,
    mixture_rewards,
    mixture_value,
)
from drorebel.experiments.preference_shift.plot import (
    plot_curves,
    plot_frontier,
    plot_mixtures,
    plot_real_mixtures,
)
from drorebel.experiments.preference_shift.real import run_experiment, summarise_real
from drorebel.experiments.preference_shift.real_config import (
    RealExperimentConfig,
    load_experiment,
)
from drorebel.experiments.preference_shift.reward import OBJECTIVES, objectives
from drorebel.experiments.preference_shift.summary import format_table
from drorebel.experiments.preference_shift.train import Method, TrainConfig, default_methods

__all__ = [
    "FULL",
    "OBJECTIVES",
    "QUICK",
    "BaseConfig",
    "Method",
    "RealExperimentConfig",
    "TrainConfig",
    "add_arguments",
    "default_methods",
    "evaluate_policy",
    "format_table",
    "frontier_gap",
    "frontier_value",
    "load_experiment",
    "load_or_train_base",
    "mixture_grid",
    "mixture_rewards",
    "mixture_value",
    "objectives",
    "plot_curves",
    "plot_frontier",
    "plot_mixtures",
    "plot_real_mixtures",
    "run",
    "run_demo",
    "run_experiment",
    "summarise",
    "summarise_gaps",
    "summarise_real",
]
