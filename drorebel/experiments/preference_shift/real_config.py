"""Configuration of the real-model preference-shift experiment (``preference-shift-real``).

The experiment (DRO-REBEL, Sahu & Wells, arXiv 2509.19104 §5, Emotion / ArmoRM protocol) trains
one policy per method and seed with the online trainer at ONE mixture ``α_train`` of the ``k``
objectives of a multi-objective reward, and evaluates it at

* ``seen`` mixtures ``w = a·e_s0 + (1 − a)·e_s1`` of the two seen objectives ``s0, s1``
  (the support of ``α_train``), ``a`` in ``seen_alphas``;
* ``unseen`` mixtures ``w = (1 − β)·(a·e_s0 + (1 − a)·e_s1) + β·e_u`` for every objective ``u``
  outside training, ``β`` in ``unseen_betas``, ``a`` in ``unseen_alphas``.

A YAML file holds the experiment fields below plus a ``train:`` mapping of
:class:`~drorebel.trainer.config.TrainConfig` fields shared by every run; ``key=value``
overrides set an experiment field when ``key`` is one, else the ``train`` field of that name.
A method is a mapping of TrainConfig loss fields: the REBEL family sets ``divergence`` (and
``rho`` / ``tau`` / ``w_target``), the DPO baseline ``loss: dpo`` and its ``beta``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from drorebel.experiments.preference_shift.mixtures import Mixtures, mixture_grid
from drorebel.trainer.config import (
    ConfigError,
    TrainConfig,
    looks_local,
    parse_overrides,
    read_yaml_mapping,
)

__all__ = ["RealExperimentConfig", "DEFAULT_METHODS", "load_experiment", "reward_num_labels"]

DEFAULT_METHODS: dict[str, dict[str, Any]] = {
    "REBEL": {"divergence": "none"},
    "chi2-REBEL": {"divergence": "chi2", "rho": 0.5},
    "KL-REBEL": {"divergence": "kl", "rho": 0.05},
    "W-REBEL": {"divergence": "wasserstein", "rho": 0.1, "w_target": "hidden"},
    "DPO": {"loss": "dpo", "beta": 0.1},  # baseline: chosen = the higher-reward sample
}
# TrainConfig fields the experiment sets per run (a `train:` value for them is refused)
_PER_RUN = ("mode", "reward_weights", "seed", "output_dir")


@dataclass
class RealExperimentConfig:
    """Every setting of ``drorebel experiment preference-shift-real`` (see
    ``configs/preference_shift_gpu.yaml``)."""

    train: dict[str, Any]  # TrainConfig fields shared by every run (model, reward_model, ...)
    alpha_train: list[float]  # the training mixture α over the k objectives (reward_weights)
    objectives: list[str] | None = None  # names of the k objectives (default obj0..obj{k-1})
    seen: list[int] | None = None  # the two seen objectives (default: the support of α_train)
    unseen: list[int] | None = None  # objectives mixed in at evaluation (default: all others)
    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_prompt_file: str | None = None  # held-out prompts; None: split off the prompt_file
    eval_fraction: float = 0.1  # share of prompt_file held out when eval_prompt_file is None
    max_eval_prompts: int | None = None  # cap on held-out prompts (first ones kept)
    eval_batch_size: int = 32  # prompts per generate call at evaluation (2 samples each)
    eval_generation: dict[str, Any] = field(default_factory=dict)  # e.g. {temperature: 0.7}
    seen_alphas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1)
                                                              for i in range(11)])
    unseen_betas: list[float] = field(default_factory=lambda: [0.25, 0.5])
    unseen_alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])

    # ---- derived -------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """Number of objectives (the length of ``alpha_train``)."""
        return len(self.alpha_train)

    def names(self) -> list[str]:
        """Objective names (``objectives``, default ``obj0 .. obj{k-1}``)."""
        return list(self.objectives or [f"obj{j}" for j in range(self.k)])

    def seen_pair(self) -> list[int]:
        """The two seen objectives (``seen``, default: the support of ``alpha_train``)."""
        return list(self.seen if self.seen is not None
                    else [j for j, a in enumerate(self.alpha_train) if a != 0])

    def unseen_list(self) -> list[int]:
        """Objectives mixed in at evaluation (``unseen``, default: every unseen one)."""
        if self.unseen is not None:
            return list(self.unseen)
        return [j for j in range(self.k) if j not in self.seen_pair()]

    def mixtures(self) -> Mixtures:
        """``{"seen": {label: w}, "unseen": {label: w}}``, each ``w`` a k-vector (see module)."""
        return mixture_grid(self.names(), self.seen_pair(), self.unseen_list(),
                            seen_alphas=self.seen_alphas, unseen_betas=self.unseen_betas,
                            unseen_alphas=self.unseen_alphas)

    # ---- validation ----------------------------------------------------------------------
    def validate(self, num_labels: int | None = None) -> None:
        """Raise :class:`ConfigError` naming the first bad field (``num_labels``: the k of the
        reward model when known)."""
        t = self.train
        if t.get("reward_model") is None and t.get("reward_fn") is None:
            raise ConfigError("preference-shift-real needs a reward: set `reward_model` (an "
                              "AutoModelForSequenceClassification path with num_labels = k "
                              "objectives) or `reward_fn` ('module:function')")
        for name in _PER_RUN:
            if name in t:
                raise ConfigError(f"`{name}` is set by the experiment per run; remove it from "
                                  "`train` (the training mixture is `alpha_train`)")
        a = self.alpha_train
        if not a or not all(_number(x) and math.isfinite(x) and x >= 0 for x in a):
            raise ConfigError(f"`alpha_train` must be a list of k >= 2 non-negative numbers, "
                              f"got {a!r}")
        if num_labels is not None and len(a) != num_labels:
            raise ConfigError(f"`alpha_train` has {len(a)} entries but the reward model "
                              f"{t.get('reward_model')!r} has num_labels = k = {num_labels} "
                              "objectives; give one weight per objective")
        if self.objectives is not None and len(self.objectives) != self.k:
            raise ConfigError(f"`objectives` names {len(self.objectives)} objectives, "
                              f"`alpha_train` has k = {self.k}")
        seen, unseen = self.seen_pair(), self.unseen_list()
        if len(seen) != 2 or len(set(seen)) != 2:
            raise ConfigError(f"need exactly two seen objectives, got {seen} (set `seen: [i, j]` "
                              "when α_train does not have exactly two non-zero entries)")
        if not unseen or set(unseen) & set(seen):
            raise ConfigError(f"need at least one unseen objective outside `seen` {seen}, got "
                              f"{unseen} (k = {self.k})")
        if not all(isinstance(j, int) and 0 <= j < self.k for j in seen + unseen):
            raise ConfigError(f"objective indices must be in [0, {self.k}); seen={seen}, "
                              f"unseen={unseen}")
        if not self.methods or not self.seeds:
            raise ConfigError("`methods` and `seeds` must be non-empty")
        if not 0.0 < self.eval_fraction < 1.0 or self.eval_batch_size < 1:
            raise ConfigError("need 0 < eval_fraction < 1 and eval_batch_size >= 1")
        for name in ("seen_alphas", "unseen_betas", "unseen_alphas"):
            v = getattr(self, name)
            if not v or not all(_number(x) and 0.0 <= x <= 1.0 for x in v):
                raise ConfigError(f"`{name}` must be a non-empty list of numbers in [0, 1]")

    # ---- per-run trainer configs --------------------------------------------------------
    def run_config(self, method: str, seed: int, output_dir: str,
                   prompt_file: str | None = None) -> TrainConfig:
        """The :class:`TrainConfig` of one run: shared ``train`` fields, the method's loss
        fields, ``mode=online``, ``reward_weights = α_train``, ``seed``, ``output_dir``."""
        data = {"resume": "auto", **self.train, **self.methods[method], "mode": "online",
                "reward_weights": [float(x) for x in self.alpha_train], "seed": seed,
                "output_dir": output_dir}
        if prompt_file is not None:
            data["prompt_file"] = prompt_file
        try:
            return TrainConfig.from_dict(data)
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"method {method!r}: {err}") from err

    def eval_config(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` with the ``eval_generation`` overrides (sampling settings of evaluation)."""
        try:
            return dataclasses.replace(cfg, **self.eval_generation)
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"`eval_generation`: {err}") from err


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def reward_num_labels(train: dict[str, Any]) -> int | None:
    """``num_labels`` of the configured reward model (None for a ``reward_fn``)."""
    path = train.get("reward_model")
    if path is None:
        return None
    if looks_local(path) and not os.path.exists(path):
        raise ConfigError(f"`reward_model`: path {path!r} does not exist")
    from transformers import AutoConfig

    trust = bool(train.get("reward_trust_remote_code", False))
    return int(AutoConfig.from_pretrained(path, trust_remote_code=trust).num_labels)


def load_experiment(path: str | None, overrides: list[str] | None = None
                    ) -> RealExperimentConfig:
    """Read the YAML ``path`` and apply ``key=value`` overrides; validate (k from the reward
    model's config when it is a model). ``methods=[A, B]`` keeps only the named methods."""
    data = read_yaml_mapping(path)
    names = {f.name for f in dataclasses.fields(RealExperimentConfig)}
    data["train"] = dict(data.get("train") or {})
    keep = None
    for key, value in parse_overrides(overrides or []).items():
        if key == "methods" and isinstance(value, list):
            keep = value
        elif key in names and key != "train":
            data[key] = value
        else:
            data["train"][key.removeprefix("train.")] = value
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown experiment field(s): {', '.join(unknown)} (TrainConfig "
                          "fields go under `train:`)")
    if "alpha_train" not in data:
        raise ConfigError("`alpha_train` (the training mixture over the k objectives) is required")
    cfg = RealExperimentConfig(**data)
    if keep is not None:
        missing = [m for m in keep if m not in cfg.methods]
        if missing:
            raise ConfigError(f"methods {missing} are not configured (have {list(cfg.methods)})")
        cfg.methods = {m: cfg.methods[m] for m in keep}
    cfg.validate(reward_num_labels(cfg.train) if cfg.train.get("reward_model") else None)
    return cfg
