"""Training configuration: one dataclass, loaded from YAML and ``key=value`` overrides.

``drorebel train --config run.yaml lr=1e-5 divergence=chi2`` and
``TrainConfig.from_yaml("run.yaml", ["lr=1e-5"])`` build the same object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["TrainConfig", "ConfigError", "parse_overrides", "read_yaml_mapping"]

DIVERGENCES = ("none", "chi2", "kl", "wasserstein")
W_TARGETS = ("hidden", "embeddings")
LOSS_IMPLS = ("fused", "materialized")
LOSSES = ("rebel", "dpo")
OVERLONG = ("truncate", "drop")
SCHEDULERS = ("constant", "linear", "cosine")
# fields that may change between a run and its resumption without invalidating the checkpoint
_RESUME_FREE = ("stop_at_step", "resume", "progress", "save_steps", "save_total_limit", "log_steps",
                "tensorboard")


class ConfigError(ValueError):
    """A configuration value is missing, mistyped, out of range or points to nothing."""


@dataclass
class TrainConfig:
    """Every setting of a DRO-REBEL run (see ``configs/*.yaml`` for examples).

    The loss is DRO-REBEL (arXiv 2509.19104): ``L = Σ_i p_i ℓ_i``, ``ℓ_i = Δ_i²`` with the
    REBEL residual (arXiv 2404.16767) and ``p`` uniform (``divergence="none"``) or the worst case
    of a χ² / KL ball of radius ``rho`` (KL: or a fixed temperature ``tau``); or the
    Wasserstein penalty ``L_W = mean ℓ + ρ·sqrt(mean_i ‖∇_z ℓ_i‖²)`` with z the final hidden
    states (``w_target="hidden"``, fused) or the input embeddings (``"embeddings"``, double
    backward). ``batch_size`` is the GLOBAL micro-batch (all ranks together); the weights cover
    each micro-batch. ``mode="online"`` samples the pairs from the policy (see online.py).

    ``loss="dpo"`` trains the DPO baseline instead (arXiv 2305.18290):
    ``ℓ_i = −log σ(β·[(π_c − ref_c) − (π_r − ref_r)])`` with the chosen response c the one of
    higher reward (offline: ``reward_a``/``reward_b``; online: the sampled pair's scores); tied
    pairs are masked out (no loss, no gradient) and ``L`` is the mean over the untied pairs of
    the global micro-batch. It needs ``divergence="none"``; ``eta`` is unused.
    """

    # model
    model: str | None = None  # local path or hub id of an AutoModelForCausalLM
    model_config: dict[str, Any] | None = None  # build from AutoConfig.for_model(**this) instead
    tokenizer: str | None = None  # defaults to ``model``
    trust_remote_code: bool = False
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when installed, else sdpa
    dtype: str = "float32"
    # data
    train_file: str | None = None  # local json / jsonl / parquet file
    max_length: int = 64  # prompt + response tokens
    max_prompt_length: int = 32
    overlong: str = "truncate"  # what to do with prompts longer than max_prompt_length
    # loss
    loss: str = "rebel"  # rebel: DRO-REBEL; dpo: the DPO baseline (chosen = higher reward)
    beta: float = 0.1  # DPO β > 0 (loss=dpo only)
    divergence: str = "none"
    rho: float | None = None
    tau: float | None = None
    eta: float = 1.0
    temperature: float = 1.0
    loss_impl: str = "fused"
    w_target: str = "hidden"  # wasserstein: perturb final hidden states (fused) or input embeddings
    # optimisation
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    max_steps: int = 10  # sets the schedule; part of the checkpoint fingerprint
    stop_at_step: int | None = None  # end early (as if interrupted) after this step; resumable
    seed: int = 0
    # output
    output_dir: str = "runs/default"
    save_steps: int = 0  # 0: save only at the end
    save_total_limit: int = 2
    resume: str | None = None  # "auto" (latest in output_dir), a checkpoint path, or None
    log_steps: int = 1
    progress: bool = True
    tensorboard: bool = False  # also write scalars to output_dir/tensorboard (needs tensorboard)
    # distributed / performance
    deepspeed: str | None = None  # DeepSpeed JSON config (configs/ds_zero{2,3}*.json); "auto"
    #   values are filled from this config. batch_size is the GLOBAL micro-batch (split over ranks)
    gradient_checkpointing: bool = False  # recompute activations in backward (non-reentrant)
    liger_kernel: bool = False  # Liger-Kernel RMSNorm/RoPE/SwiGLU patches (CUDA only)
    # online (REBEL iterations: sample two responses per prompt, score, K passes; see online.py)
    mode: str = "offline"  # offline: pairs from train_file; online: pairs sampled from the policy
    prompt_file: str | None = None  # json/jsonl/parquet, column `prompt` (+ columns for the reward)
    reward_fn: str | None = None  # "module:function" with the contract of trainer/rewards.py
    reward_model: str | None = None  # AutoModelForSequenceClassification path (safetensors)
    reward_trust_remote_code: bool = False
    reward_weights: list[float] | None = None  # mixture α of a k-objective reward: r = Σ α_j r_j
    reference: str = "sampling"  # sampling: π_t, the sampling policy (REBEL); initial: frozen start
    rollout_batch_size: int = 8  # prompts per iteration (two responses each)
    num_passes: int = 1  # K optimiser passes over each rollout batch
    max_new_tokens: int = 16  # sampling uses `temperature` too (the log-prob temperature T)
    do_sample: bool = True
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    generation_batch_size: int | None = None  # prompts per generate call (None: a rank's share);
    #   samples depend only on the chunk, so equal values give equal runs on any number of ranks

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        _choice("divergence", self.divergence, DIVERGENCES)
        _choice("loss_impl", self.loss_impl, LOSS_IMPLS)
        _validate_loss(self)
        _choice("overlong", self.overlong, OVERLONG)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _validate_online(self)  # online
        if (self.model is None) == (self.model_config is None):
            raise ConfigError("set exactly one of `model` (a path or hub id) or `model_config`")
        if self.model_config is None and self.tokenizer is None:
            self.tokenizer = self.model
        if self.tokenizer is None:
            raise ConfigError("`tokenizer` is required when the model is built from model_config")
        if self.divergence != "none" and self.rho is None and self.tau is None:
            raise ConfigError(f"divergence={self.divergence!r} needs `rho` (or `tau` for kl)")
        _choice("w_target", self.w_target, W_TARGETS)
        if self.tensorboard and not _has_tensorboard():
            raise ConfigError("tensorboard=true needs the tensorboard package "
                              "(pip install tensorboard)")
        if self.divergence == "wasserstein":
            if self.rho is None or self.tau is not None:
                raise ConfigError("divergence='wasserstein' takes `rho` (the radius), not `tau`")
            if self.loss_impl == "materialized" and self.w_target == "hidden":
                raise ConfigError("divergence='wasserstein' with w_target='hidden' is fused "
                                  "only; loss_impl='materialized' has no Wasserstein twin here")
            if self.w_target == "embeddings" and self.attn_implementation == "auto":
                self.attn_implementation = "eager"  # SDPA / flash kernels have no double backward
            if self.w_target == "embeddings" and self.attn_implementation != "eager":
                raise ConfigError("w_target='embeddings' differentiates twice through attention: "
                                  "it needs attn_implementation='eager' (or 'auto')")
            if self.w_target == "embeddings" and self.deepspeed is not None:
                raise ConfigError("w_target='embeddings' (a double backward through the model) "
                                  "is not supported under DeepSpeed; use w_target='hidden'")
        for name in ("max_length", "max_prompt_length", "batch_size", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError("`max_prompt_length` must be < `max_length`")
        if not self.eta > 0:
            raise ConfigError(f"`eta` must be > 0, got {self.eta}")

    def check_paths(self) -> None:
        """Refuse local paths that do not exist (hub ids without a slash-prefix are allowed)."""
        for name in ("prompt_file",) if self.mode == "online" else ("train_file",):  # online
            value = getattr(self, name)
            if value is None or not os.path.exists(value):
                raise ConfigError(f"`{name}`: file {value!r} does not exist")
        for name in ("model", "tokenizer"):
            value = getattr(self, name)
            if value and _looks_local(value) and not os.path.exists(value):
                raise ConfigError(f"`{name}`: path {value!r} does not exist")

    def fingerprint(self) -> str:
        """Hash of the settings a checkpoint depends on (resume refuses a different one).

        ``loss`` and ``beta`` count only for ``loss="dpo"`` (REBEL ignores β, and REBEL
        checkpoints written before these fields existed keep their fingerprint).
        """
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _RESUME_FREE}
        if self.loss == "rebel":
            del d["loss"], d["beta"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | None, overrides: list[str] | None = None) -> TrainConfig:
        """Load ``path`` (may be None) and apply ``key=value`` overrides (YAML-parsed values)."""
        data = read_yaml_mapping(path)
        data.update(parse_overrides(overrides or []))
        _check_types(data)
        return cls.from_dict(data)


def read_yaml_mapping(path: str | None) -> dict[str, Any]:
    """The mapping in YAML file ``path`` (``{}`` for None); a missing file or a top level that is
    not a mapping is a :class:`ConfigError`."""
    if path is None:
        return {}
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-5", "model_config={hidden_size: 32}"]`` → dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = yaml.safe_load(value) if value != "" else None
    return out


def _check_types(data: dict[str, Any]) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for key, value in data.items():
        if key in hints and isinstance(value, str) and _matches(1.5, hints[key]):
            try:  # YAML 1.1 reads "3e-5" as a string
                value = data[key] = float(value)
            except ValueError:
                pass
        if key in hints and not _matches(value, hints[key]):
            raise ConfigError(f"`{key}` must be {hints[key]}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"`{name}` must be one of {allowed}, got {value!r}")


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or os.sep in value and value.count("/") != 1


def _validate_loss(cfg: TrainConfig) -> None:
    """Checks of ``loss`` and ``beta`` (DPO: β > 0 and finite, no DRO divergence)."""
    _choice("loss", cfg.loss, LOSSES)
    if cfg.loss != "dpo":
        return
    beta = cfg.beta
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < math.inf:
        raise ConfigError(f"`beta` (DPO β) must be a finite number > 0, got {beta!r}")
    if cfg.divergence != "none":
        raise ConfigError(f"loss='dpo' needs divergence='none', got {cfg.divergence!r} "
                          "(robust DPO variants are not part of the trainer)")


# online
MODES = ("offline", "online")
REFERENCES = ("sampling", "initial")


def _validate_online(cfg: TrainConfig) -> None:
    """Checks of the ``mode``/online fields (see :mod:`drorebel.trainer.online`)."""
    _choice("mode", cfg.mode, MODES)
    _choice("reference", cfg.reference, REFERENCES)
    if cfg.mode != "online":
        return
    if cfg.prompt_file is None:
        raise ConfigError("mode=online needs `prompt_file` (a dataset with a `prompt` column)")
    if (cfg.reward_fn is None) == (cfg.reward_model is None):
        raise ConfigError("mode=online needs exactly one of `reward_fn` ('module:function') or "
                          "`reward_model` (a sequence-classification model path)")
    if cfg.reward_fn is not None and not all(cfg.reward_fn.partition(":")[::2]):
        raise ConfigError(f"`reward_fn` must look like 'module:function', got {cfg.reward_fn!r}")
    for name in ("rollout_batch_size", "num_passes", "max_new_tokens", "generation_batch_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"`{name}` must be >= 1, got {getattr(cfg, name)}")
    per_step = cfg.batch_size * cfg.grad_accum
    if cfg.rollout_batch_size % per_step:
        raise ConfigError(f"`rollout_batch_size`={cfg.rollout_batch_size} must be a multiple of "
                          f"batch_size*grad_accum={per_step} (pairs per optimiser step)")
    g = cfg.generation_batch_size
    if g is not None and cfg.rollout_batch_size % g:
        raise ConfigError(f"`rollout_batch_size`={cfg.rollout_batch_size} must be a multiple of "
                          f"`generation_batch_size`={g}")
    if cfg.max_prompt_length + cfg.max_new_tokens > cfg.max_length:
        raise ConfigError(f"max_prompt_length + max_new_tokens = "
                          f"{cfg.max_prompt_length + cfg.max_new_tokens} exceeds `max_length`="
                          f"{cfg.max_length}")
    if not 0.0 < cfg.top_p <= 1.0 or cfg.top_k < 0 or not cfg.temperature > 0:
        raise ConfigError(f"need 0 < top_p <= 1, top_k >= 0 and temperature > 0; got top_p="
                          f"{cfg.top_p}, top_k={cfg.top_k}, temperature={cfg.temperature}")
    w = cfg.reward_weights
    if w is not None and (not w or not all(_matches(x, float) and math.isfinite(x) for x in w)):
        raise ConfigError(f"`reward_weights` must be a non-empty list of finite numbers, got {w!r}")
