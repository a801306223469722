"""Training configuration: one dataclass, loaded from YAML and ``key=value`` overrides.

``drorebel train --config run.yaml lr=1e-5 divergence=chi2`` and
``TrainConfig.from_yaml("run.yaml", ["lr=1e-5"])`` build the same object.

Every field carries its meaning in ``metadata["help"]`` and its group in ``metadata["group"]``
(:data:`GROUPS`); ``drorebel train --help`` prints them (:func:`format_fields_help`). The
Hugging Face ``TrainingArguments`` / TRL spellings of fields we have are accepted in the YAML
file and on the command line through one table, :data:`ALIASES`; HF/TRL settings with no
equivalent here are refused with what to use instead (:data:`UNSUPPORTED`).

``batch_size`` is the GLOBAL micro-batch: pairs per forward/backward summed over all ranks, not
per GPU (see :func:`drorebel.trainer.loop.micro_batch`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from drorebel.losses.options import DIVERGENCES, W_TARGETS
from drorebel.trainer import config_aliases as _aliases
from drorebel.trainer.config_aliases import (
    ALIASES,
    DTYPES,
    SCHEDULERS,
    UNSUPPORTED,
    Alias,
    matches_type,
)
from drorebel.trainer.errors import ConfigError

__all__ = ["TrainConfig", "ConfigError", "parse_overrides", "read_yaml_mapping", "Alias",
           "ALIASES", "UNSUPPORTED", "GROUPS", "resolve_aliases", "format_fields_help",
           "BATCH_SIZE_RULE"]

LOSS_IMPLS = ("fused", "materialized")  # → impl "auto" / "materialized" of the public losses
LOSSES = ("rebel", "dpo")
OVERLONG = ("truncate", "drop")
MODES = ("offline", "online")
REFERENCES = ("sampling", "initial")
# fields that may change between a run and its resumption without invalidating the checkpoint
_RESUME_FREE = ("stop_at_step", "resume", "progress", "save_steps", "save_total_limit", "log_steps",
                "tensorboard")
GROUPS = ("model", "data", "loss", "optimisation", "online", "distributed",
          "checkpoints/logging")

BATCH_SIZE_RULE = (
    "batch_size is the GLOBAL micro-batch: pairs per forward/backward summed over ALL ranks "
    "(not per GPU); each of the WORLD_SIZE ranks takes batch_size / WORLD_SIZE pairs, the DRO "
    "weights cover the whole global micro-batch and an optimiser step sees batch_size x "
    "grad_accum pairs. global_batch_size is accepted for it; HF's "
    "per_device_train_batch_size is converted to batch_size = per_device_train_batch_size x "
    "WORLD_SIZE, WORLD_SIZE read from the launcher's environment (torchrun, deepspeed, "
    "accelerate; 1 without a launcher) - give batch_size instead when a run must resume on "
    "another number of GPUs.")


def _in(group: str) -> Callable[..., Any]:
    """``field`` factory of one :data:`GROUPS` entry: ``_in("loss")(default, "help")``."""
    assert group in GROUPS

    def make(default: Any = None, help: str = "", *, factory: Callable[[], Any] | None = None
             ) -> Any:
        meta = {"group": group, "help": " ".join(help.split())}
        if factory is not None:
            return field(default_factory=factory, metadata=meta)
        return field(default=default, metadata=meta)

    return make


_model, _data, _loss, _opt = _in("model"), _in("data"), _in("loss"), _in("optimisation")
_online, _dist, _out = _in("online"), _in("distributed"), _in("checkpoints/logging")


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

    Each field's meaning (units, allowed values, the loss/mode it applies to) is its
    ``metadata["help"]``; ``drorebel train --help`` lists them by group.
    """

    # model
    model: str | None = _model(None, """Hub id or local directory of an AutoModelForCausalLM
        (safetensors weights only). Set exactly one of `model` / `model_config`.""")
    model_config: dict[str, Any] | None = _model(None, """Build a freshly initialised model from
        AutoConfig.for_model(**model_config) instead of loading weights: a mapping with
        `model_type` (e.g. {model_type: llama, hidden_size: 32, ...}); needs `tokenizer`.""")
    tokenizer: str | None = _model(None, """Tokenizer hub id or local path; default: `model`.
        Required with `model_config`.""")
    trust_remote_code: bool = _model(False, """Allow custom modelling code from the hub for
        `model` and `tokenizer`.""")
    attn_implementation: str = _model("auto", """Attention kernel passed to transformers: auto
        (flash_attention_2 on CUDA when flash-attn is installed, else sdpa), sdpa, eager,
        flash_attention_2, ... ; w_target=embeddings needs eager (auto picks it).""")
    dtype: str = _model("float32", f"""dtype the model's weights are loaded in: one of
        {', '.join(DTYPES)}; under DeepSpeed it also switches DeepSpeed's bf16/fp16 mode on.
        HF `bf16: true` / `fp16: true` and TRL `torch_dtype` set it.""")
    # data
    train_file: str | None = _data(None, """mode=offline: local .json/.jsonl/.parquet file of
        pairs with columns prompt, response_a, response_b, reward_a, reward_b (TRL's chosen,
        rejected, chosen_reward, rejected_reward accepted), optionally ref_logp_a/ref_logp_b
        from `drorebel precompute-ref`.""")
    max_length: int = _data(64, """Tokens per sequence, prompt + response (the same meaning as
        TRL DPOConfig's max_length). Offline responses are cut to max_length minus the prompt's
        tokens; mode=online needs max_prompt_length + max_new_tokens <= max_length.""")
    max_prompt_length: int = _data(32, """Prompt tokens kept (< max_length); longer prompts
        follow `overlong`.""")
    overlong: str = _data("truncate", f"""What to do with a prompt longer than
        max_prompt_length: one of {', '.join(OVERLONG)} (truncate keeps its last
        max_prompt_length tokens; drop skips the row, the count is printed).""")
    # loss
    loss: str = _loss("rebel", f"""One of {', '.join(LOSSES)}. rebel: DRO-REBEL, the squared
        REBEL residual weighted per `divergence`; dpo: the DPO baseline -log sigmoid(beta *
        margin) with chosen = the higher-reward response, tied pairs masked out (needs
        divergence=none).""")
    beta: float = _loss(0.1, """DPO beta > 0, the scale of the implicit-reward margin (loss=dpo
        only; TRL DPOConfig's beta). loss=rebel ignores it.""")
    divergence: str = _loss("none", f"""loss=rebel: robust weighting of the pair losses over
        each GLOBAL micro-batch, one of {', '.join(DIVERGENCES)}. none: uniform (plain REBEL);
        chi2: worst case in a chi-square ball of radius rho; kl: worst case in a KL ball of
        radius rho, or softmax weights at fixed temperature tau; wasserstein: a gradient
        penalty of radius rho (see w_target).""")
    rho: float | None = _loss(None, """Radius >= 0 of the ambiguity set: the chi2/KL ball radius
        (divergence=chi2|kl, in units of the divergence) or the Wasserstein radius, the
        coefficient of sqrt(mean_i |grad_z loss_i|^2) (divergence=wasserstein). Required unless
        divergence=none (kl: or tau).""")
    tau: float | None = _loss(None, """divergence=kl only: fixed temperature > 0 of the weights
        p = softmax(loss_i / tau), instead of the radius rho (give exactly one).""")
    eta: float = _loss(1.0, """REBEL's eta > 0 (loss=rebel): the residual is
        (1/eta)*[(log pi - log pi_ref)(a) - (log pi - log pi_ref)(b)] - (r_a - r_b), so 1/eta
        converts nats of log-ratio into reward units. loss=dpo ignores it.""")
    temperature: float = _loss(1.0, """Log-prob temperature T > 0: policy and reference
        log-probs are computed from logits / T (both losses); mode=online also samples at this
        temperature (TRL's temperature). 1.0: plain log-probs.""")
    loss_impl: str = _loss("fused", f"""One of {', '.join(LOSS_IMPLS)}. fused: log-probs from
        the final hidden states without materialising the tokens x vocab logits; materialized:
        full logits (more memory; a reference path; not for divergence=wasserstein with
        w_target=hidden).""")
    w_target: str = _loss("hidden", f"""divergence=wasserstein only, one of
        {', '.join(W_TARGETS)}: perturb the final hidden states (hidden; fused, one backward) or
        the input embeddings (embeddings; a double backward: needs attn_implementation
        eager/auto, no DeepSpeed).""")
    # optimisation
    lr: float = _opt(1e-4, """Peak AdamW learning rate (reached after warm-up). HF:
        learning_rate.""")
    weight_decay: float = _opt(0.0, "AdamW decoupled weight decay (HF: weight_decay).")
    adam_betas: list[float] = _opt(factory=lambda: [0.9, 0.999], help="""AdamW (beta1, beta2)
        as a two-element list (HF's adam_beta1 / adam_beta2 go here).""")
    scheduler: str = _opt("constant", f"""Learning-rate schedule after the linear warm-up, one
        of {', '.join(SCHEDULERS)} (linear and cosine decay to 0 at max_steps). HF:
        lr_scheduler_type (constant_with_warmup = constant).""")
    warmup_steps: int = _opt(0, """Optimiser steps of linear warm-up, for every scheduler
        (0: none).""")
    batch_size: int = _opt(4, """GLOBAL micro-batch: pairs per forward/backward summed over ALL
        ranks, NOT per GPU. Each of the WORLD_SIZE ranks takes batch_size / WORLD_SIZE pairs
        (must divide); the DRO weights cover the whole global micro-batch. Aliases:
        global_batch_size; HF per_device_train_batch_size (x WORLD_SIZE).""")
    grad_accum: int = _opt(1, """Global micro-batches per optimiser step: a step sees
        batch_size x grad_accum pairs. HF: gradient_accumulation_steps.""")
    max_grad_norm: float | None = _opt(1.0, """Clip the gradient's global L2 norm to this
        before each optimiser step; null: no clipping (0 also means no clipping under
        DeepSpeed and is refused without it).""")
    max_steps: int = _opt(10, """Optimiser steps of the whole run; sets the schedule and is
        part of the checkpoint fingerprint. There is no epoch setting: one epoch of N pairs is
        N / (batch_size x grad_accum) steps.""")
    stop_at_step: int | None = _opt(None, """End early, as if interrupted, after this step
        (a checkpoint is written; resume with resume=auto); the schedule still follows
        max_steps. null: run to max_steps.""")
    seed: int = _opt(0, "Seeds the data order, a model_config model's initialisation and sampling.")
    # output
    output_dir: str = _out("runs/default", """Directory of the checkpoints (checkpoint-<step>),
        metrics.jsonl, tensorboard/ and the final model.""")
    save_steps: int = _out(0, """Save a checkpoint every this many optimiser steps; 0: only at
        the end.""")
    save_total_limit: int | None = _out(2, """Keep this many newest checkpoints (older ones are
        deleted); 0 or null: keep all.""")
    resume: str | None = _out(None, """auto: continue from the newest complete checkpoint in
        output_dir (a fresh start when there is none); a checkpoint path; null: start fresh. A
        checkpoint written with different training settings is refused. HF:
        resume_from_checkpoint.""")
    log_steps: int = _out(1, """Write metrics (metrics.jsonl, tensorboard) every this many
        optimiser steps (>= 1; the last step is always written). HF: logging_steps.""")
    progress: bool = _out(True, "Show a progress bar with ETA (rank 0).")
    tensorboard: bool = _out(False, """Also write the scalars to output_dir/tensorboard (needs
        the tensorboard package).""")
    # distributed / performance
    deepspeed: str | None = _dist(None, """DeepSpeed JSON config (configs/ds_zero{2,3}*.json;
        launch with `deepspeed`); its "auto" values are filled from this config, explicit batch
        size / clipping / precision values must agree with it. null: DDP under torchrun, else
        one process.""")
    gradient_checkpointing: bool = _dist(False, """Recompute activations in the backward
        (non-reentrant): less activation memory, more compute.""")
    liger_kernel: bool = _dist(False, """Apply Liger-Kernel's RMSNorm/RoPE/SwiGLU patches to
        the model (CUDA only; skipped with a warning on CPU). HF: use_liger_kernel.""")
    # online (REBEL iterations: sample two responses per prompt, score, K passes; see online.py)
    mode: str = _online("offline", f"""One of {', '.join(MODES)}. offline: pairs from
        train_file; online: REBEL iterations - sample two responses per prompt of prompt_file
        from the policy, score them with the reward, train num_passes passes.""")
    prompt_file: str | None = _online(None, """mode=online: local json/jsonl/parquet file with a
        `prompt` column (plus any columns the reward reads).""")
    reward_fn: str | None = _online(None, """mode=online: 'module:function' with the contract of
        drorebel/trainer/rewards.py; exactly one of reward_fn / reward_model.""")
    reward_model: str | None = _online(None, """mode=online: AutoModelForSequenceClassification
        hub id or path (safetensors) scoring prompt + response; exactly one of reward_fn /
        reward_model.""")
    reward_trust_remote_code: bool = _online(False, "Allow custom modelling code for reward_model.")
    reward_weights: list[float] | None = _online(None, """mode=online, k-objective reward: the
        mixture alpha, r = sum_j alpha_j r_j (k finite numbers); null for a single objective.""")
    reference: str = _online("sampling", f"""mode=online reference policy, one of
        {', '.join(REFERENCES)}: sampling (pi_t, the policy that sampled the batch; REBEL) or
        initial (a frozen copy of the starting model).""")
    rollout_batch_size: int = _online(8, """mode=online: prompts per iteration (two responses
        each, so that many pairs); a multiple of batch_size x grad_accum.""")
    num_passes: int = _online(1, """mode=online: optimiser passes K over each rollout batch.
        TRL: num_ppo_epochs.""")
    max_new_tokens: int = _online(16, """mode=online: response tokens sampled per completion
        (max_prompt_length + max_new_tokens <= max_length). TRL: max_new_tokens,
        max_completion_length.""")
    do_sample: bool = _online(True, "mode=online: sample (true) or decode greedily (false).")
    top_p: float = _online(1.0, "mode=online: nucleus sampling, 0 < top_p <= 1 (1: off).")
    top_k: int = _online(0, "mode=online: top-k sampling, >= 0 (0: off).")
    generation_batch_size: int | None = _online(None, """mode=online: prompts per generate call
        (null: a rank's whole share), a divisor of rollout_batch_size; samples depend only on
        the chunk, so equal values give equal runs on any number of ranks.""")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        _choice("divergence", self.divergence, DIVERGENCES)
        _choice("loss_impl", self.loss_impl, LOSS_IMPLS)
        _validate_loss(self)
        _choice("overlong", self.overlong, OVERLONG)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("dtype", self.dtype, DTYPES)
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
        if self.batch_size < 1:
            raise ConfigError(f"`batch_size` (the GLOBAL micro-batch: pairs over all ranks, not "
                              f"per GPU) must be >= 1, got {self.batch_size}")
        for name in ("max_length", "max_prompt_length", "grad_accum", "max_steps", "log_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if self.save_total_limit is None:
            self.save_total_limit = 0  # HF's "keep all"
        _validate_clipping(self)
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
            if value and looks_local(value) and not os.path.exists(value):
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
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> TrainConfig:
        """Build from one mapping of field names or their :data:`ALIASES` (types checked)."""
        values, origins = resolve_aliases(data, where)
        _aliases.check_alias_requirements(values, origins, cls)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | None, overrides: list[str] | None = None) -> TrainConfig:
        """Load ``path`` (may be None) and apply ``key=value`` overrides (YAML-parsed values).

        Each layer may use :data:`ALIASES`; within a layer an alias and its field with different
        values is an error, across layers the command line wins."""
        values, origins = resolve_aliases(read_yaml_mapping(path), path or "config")
        over, over_origins = resolve_aliases(parse_overrides(overrides or []), "the command line")
        values.update(over)
        origins.update(over_origins)
        _aliases.check_alias_requirements(values, origins, cls)
        return cls(**values)


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


# ---- checks ---------------------------------------------------------------------------------

_CHOICES = {"divergence": DIVERGENCES, "w_target": W_TARGETS, "loss_impl": LOSS_IMPLS,
            "loss": LOSSES, "overlong": OVERLONG, "scheduler": SCHEDULERS, "dtype": DTYPES,
            "mode": MODES, "reference": REFERENCES}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"`{name}` must be one of {allowed}, got {value!r}")


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or os.sep in value and value.count("/") != 1


def _validate_clipping(cfg: TrainConfig) -> None:
    """``max_grad_norm``: null or > 0; 0 only under DeepSpeed (its "no clipping")."""
    g = cfg.max_grad_norm
    if g is None:
        return
    if not g >= 0 or (g == 0 and cfg.deepspeed is None):
        raise ConfigError(f"`max_grad_norm` must be > 0 (or null: no clipping), got {g!r}")


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
                          f"batch_size*grad_accum={per_step} (GLOBAL pairs per optimiser step)")
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
    if w is not None and (not w or not all(matches_type(x, float) and math.isfinite(x) for x in w)):
        raise ConfigError(f"`reward_weights` must be a non-empty list of finite numbers, got {w!r}")


def resolve_aliases(data: dict[str, Any], where: str = "config"
                    ) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`drorebel.trainer.config_aliases.resolve_aliases` for :class:`TrainConfig`."""
    return _aliases.resolve_aliases(data, TrainConfig, _CHOICES, where)


def format_fields_help(width: int = 100) -> str:
    """The epilog of ``drorebel train --help``: every field by group, the batch-size rule and
    the HF/TRL spellings (:func:`drorebel.trainer.config_aliases.format_fields_help`)."""
    return _aliases.format_fields_help(TrainConfig, GROUPS, BATCH_SIZE_RULE, width)
