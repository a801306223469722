"""The rules of :class:`~drorebel.trainer.config.TrainConfig`: allowed values, ranges, settings
that contradict each other, and the checks against the file system and the launcher.

Each check raises ONE :class:`ConfigError` line naming the setting, its value and what is
allowed; :meth:`TrainConfig.validate` runs the value checks on construction and
:meth:`TrainConfig.check_paths` the file-system ones before any model loads.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Callable
from typing import Any

from drorebel.losses.options import DIVERGENCES, W_TARGETS
from drorebel.trainer.config_aliases import DTYPES, SCHEDULERS
from drorebel.trainer.errors import ConfigError

#: a :class:`drorebel.trainer.config.TrainConfig` (not imported: that module imports this one)
TrainConfig = Any

LOSS_IMPLS = ("fused", "materialized")  # → impl "auto" / "materialized" of the public losses
LOSSES = ("rebel", "dpo")
OVERLONG = ("truncate", "drop")
MODES = ("offline", "online")
REFERENCES = ("sampling", "initial")
ON_NONFINITE = ("stop", "skip")
DRO_OVER = ("pairs", "groups")  # what the chi2/KL ball perturbs: the pairs or their groups
SEED_MAX = 2**32 - 1  # numpy's seed range (seed_all seeds numpy with it)
REPORT_TO = ("jsonl", "tensorboard", "wandb")


CHOICES = {"divergence": DIVERGENCES, "w_target": W_TARGETS, "loss_impl": LOSS_IMPLS,
            "loss": LOSSES, "overlong": OVERLONG, "scheduler": SCHEDULERS, "dtype": DTYPES,
            "mode": MODES, "reference": REFERENCES, "on_nonfinite": ON_NONFINITE,
            "dro_over": DRO_OVER}
_UNSUPPORTED_DTYPES = {"float64": "float64 is not supported: use float32 for full precision"}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        why = f"; {_UNSUPPORTED_DTYPES[value]}" if name == "dtype" and \
            value in _UNSUPPORTED_DTYPES else ""
        raise ConfigError(f"`{name}` must be one of {allowed}, got {value!r}{why}")


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or os.sep in value and value.count("/") != 1


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gz", ".bz2", ".xz", ".arrow")


def hub_dataset_name(value: str) -> bool:
    """Whether a data setting (``train_file``, ``prompt_file``) that names no existing path is
    to be tried as a Hugging Face Hub dataset: ``name`` or ``owner/name``, not a local-looking
    path and without a data-file extension (``pairs.jsonl`` that is missing stays a missing
    file)."""
    import re

    if os.path.exists(value) or looks_local(value) or value.lower().endswith(DATA_SUFFIXES):
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", value) is not None


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _number(cfg: TrainConfig, name: str, rule: str, ok: Callable[[Any], bool],
            why: str = "") -> None:
    """``getattr(cfg, name)`` (a number, or None: not checked) must be finite and ``ok``; else
    ``"`name` must be <rule>[ (why)], got <value>"``."""
    value = getattr(cfg, name)
    if value is not None and not (_finite(value) and ok(value)):
        raise ConfigError(f"`{name}` must be {rule}{f' ({why})' if why else ''}, got {value!r}")


def _at_least(cfg: TrainConfig, low: int, *names: str) -> None:
    for name in names:
        _number(cfg, name, f">= {low}" + (" (or null)" if _optional(cfg, name) else ""),
                lambda v: v >= low)


def _optional(cfg: TrainConfig, name: str) -> bool:
    """Whether field ``name`` may be null (its type hint admits None)."""
    return type(None) in typing.get_args(typing.get_type_hints(type(cfg))[name])


def _validate_model(cfg: TrainConfig) -> None:
    """``model`` xor ``model_config`` (with a ``model_type``), the tokenizer, non-empty paths."""
    if (cfg.model is None) == (cfg.model_config is None):
        raise ConfigError("set exactly one of `model` (a path or hub id) or `model_config`")
    if cfg.model_config is None and cfg.tokenizer is None:
        cfg.tokenizer = cfg.model
    if cfg.tokenizer is None:
        raise ConfigError("`tokenizer` is required when the model is built from model_config")
    mc = cfg.model_config
    if mc is not None and not (isinstance(mc.get("model_type"), str) and mc["model_type"]):
        raise ConfigError(f"`model_config` needs a `model_type` (e.g. {{model_type: llama, "
                          f"hidden_size: 32, ...}}), got {mc!r}")
    for name in ("model", "tokenizer", "attn_implementation", "train_file", "output_dir",
                 "resume", "deepspeed", "prompt_file", "reward_model"):
        value = getattr(cfg, name)
        if value is not None and not value.strip():
            raise ConfigError(f"`{name}` must not be empty, got {value!r}"
                              + (" (null: unset)" if _optional(cfg, name) else ""))


_LORA_OPTIONS = ("lora_alpha", "lora_dropout", "lora_target_modules", "lora_save_merged")


def _validate_lora(cfg: TrainConfig) -> None:
    """``lora_*`` (:mod:`drorebel.trainer.lora`): ``lora_r`` >= 0 (null → 0 = off); with LoRA
    off the other lora settings would have no effect and are refused; with it on, ranges, the
    target list and the peft package."""
    if cfg.lora_r is None:
        cfg.lora_r = 0
    _at_least(cfg, 0, "lora_r")
    if not cfg.lora_r:
        for name in _LORA_OPTIONS:
            if getattr(cfg, name) not in (None, False):
                raise ConfigError(f"`{name}`={getattr(cfg, name)!r} has no effect without LoRA: "
                                  f"set `lora_r` > 0 (the adapter rank), or remove `{name}`")
        return
    _number(cfg, "lora_alpha", "> 0 and finite", lambda v: v > 0, "the LoRA scale is alpha / r")
    _number(cfg, "lora_dropout", "in [0, 1)", lambda v: 0 <= v < 1)
    t = cfg.lora_target_modules
    if isinstance(t, str) and t != "all-linear" or isinstance(t, list) and not (
            t and all(isinstance(x, str) and x.strip() for x in t)):
        raise ConfigError(f"`lora_target_modules` must be a non-empty list of module names "
                          f"(e.g. [q_proj, v_proj]) or 'all-linear', got {t!r}")
    if not _has_package("peft"):
        raise ConfigError("lora_r needs the peft package (pip install drorebel[peft])")


def _validate_loss(cfg: TrainConfig) -> None:
    """``loss``, ``beta``, ``eta``, ``temperature`` and the divergence's ``rho``/``tau``/
    ``w_target``: finite and in range, and no setting that the chosen loss would ignore."""
    _number(cfg, "beta", "> 0 and finite", lambda v: v > 0, "DPO beta")
    _number(cfg, "eta", "> 0 and finite", lambda v: v > 0, "REBEL's eta")
    _number(cfg, "temperature", "> 0 and finite", lambda v: v > 0, "the log-prob temperature")
    _number(cfg, "rho", ">= 0 and finite", lambda v: v >= 0, "the radius")
    _number(cfg, "tau", "> 0 and finite", lambda v: v > 0, "the KL temperature")
    d, rho, tau = cfg.divergence, cfg.rho, cfg.tau
    _validate_softmax_cache(cfg)
    if cfg.loss == "dpo" and d != "none":
        raise ConfigError(f"loss='dpo' needs divergence='none', got {d!r} "
                          "(robust DPO variants are not part of the trainer)")
    if d == "none":
        for name, value in (("rho", rho), ("tau", tau)):
            if value is not None:
                raise ConfigError(
                    f"`{name}`={value!r} has no effect with divergence='none' (uniform "
                    f"weights{', loss=dpo' if cfg.loss == 'dpo' else ''}): set divergence to "
                    f"{'chi2, kl or wasserstein' if name == 'rho' else 'kl'}, or remove "
                    f"`{name}`")
    elif rho is None and tau is None:
        raise ConfigError(f"divergence={d!r} needs `rho` (or `tau` for kl)")
    elif d == "chi2" and tau is not None:
        raise ConfigError(f"`tau`={tau!r} is used by divergence='kl' only; divergence='chi2' "
                          "takes `rho` (the radius): remove `tau`")
    elif d == "kl" and rho is not None and tau is not None:
        raise ConfigError(f"divergence='kl' takes exactly one of `rho` (the radius) or `tau` "
                          f"(a fixed temperature), got rho={rho!r} and tau={tau!r}")
    if cfg.w_target == "embeddings" and d != "wasserstein":
        raise ConfigError(f"`w_target`='embeddings' applies to divergence='wasserstein' only, "
                          f"got divergence={d!r}")
    if d == "wasserstein":
        _validate_wasserstein(cfg)
    if cfg.dro_over == "groups" and (cfg.loss != "rebel" or d not in ("chi2", "kl")):
        raise ConfigError(f"`dro_over`='groups' (group-level DRO) needs loss='rebel' and "
                          f"divergence='chi2' or 'kl', got loss={cfg.loss!r} and "
                          f"divergence={d!r}")


def _validate_softmax_cache(cfg: TrainConfig) -> None:
    """``softmax_cache``: a byte budget >= 0 or "auto", only where the fused op runs."""
    sc = cfg.softmax_cache
    if sc != "auto" and not (isinstance(sc, int) and sc >= 0):
        raise ConfigError(f"`softmax_cache` must be a byte budget >= 0 or 'auto', got {sc!r}")
    if sc != 0 and (cfg.loss_impl == "materialized" or cfg.divergence == "wasserstein"):
        raise ConfigError(f"`softmax_cache`={sc!r} has no effect with loss_impl="
                          f"{cfg.loss_impl!r} and divergence={cfg.divergence!r}: it applies "
                          "to the fused log-probs of loss_impl=fused without a Wasserstein "
                          "penalty")


def _validate_wasserstein(cfg: TrainConfig) -> None:
    if cfg.rho is None or cfg.tau is not None:
        raise ConfigError("divergence='wasserstein' takes `rho` (the radius), not `tau`")
    if cfg.loss_impl == "materialized" and cfg.w_target == "hidden":
        raise ConfigError("divergence='wasserstein' with w_target='hidden' is fused only; "
                          "loss_impl='materialized' has no Wasserstein twin here")
    if cfg.w_target == "embeddings" and cfg.attn_implementation == "auto":
        cfg.attn_implementation = "eager"  # SDPA / flash kernels have no double backward
    if cfg.w_target == "embeddings" and cfg.attn_implementation != "eager":
        raise ConfigError("w_target='embeddings' differentiates twice through attention: it "
                          f"needs attn_implementation='eager' (or 'auto'), got "
                          f"{cfg.attn_implementation!r}")
    if cfg.w_target == "embeddings" and cfg.deepspeed is not None:
        raise ConfigError("w_target='embeddings' (a double backward through the model) is not "
                          "supported under DeepSpeed; use w_target='hidden'")


def _validate_optimisation(cfg: TrainConfig) -> None:
    """The optimiser, schedule, batch, clipping, length and seed settings."""
    _number(cfg, "lr", "> 0 and finite", lambda v: v > 0, "the peak AdamW learning rate")
    _number(cfg, "weight_decay", ">= 0 and finite", lambda v: v >= 0)
    b = cfg.adam_betas
    if len(b) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                              and _finite(x) and 0 <= x < 1 for x in b):
        raise ConfigError(f"`adam_betas` must be two numbers [beta1, beta2], each in [0, 1), "
                          f"got {b!r}")
    if cfg.batch_size < 1:
        raise ConfigError(f"`batch_size` (the GLOBAL micro-batch: pairs over all ranks, not "
                          f"per GPU) must be >= 1, got {cfg.batch_size}")
    _at_least(cfg, 1, "grad_accum", "max_steps", "stop_at_step", "max_length",
              "max_prompt_length")
    _at_least(cfg, 0, "warmup_steps")
    _validate_clipping(cfg)
    if not 0 <= cfg.seed <= SEED_MAX:
        raise ConfigError(f"`seed` must be an integer in [0, {SEED_MAX}] (numpy's seed range), "
                          f"got {cfg.seed}")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(f"`max_prompt_length` must be < `max_length` (max_length counts "
                          f"prompt + response tokens), got max_prompt_length="
                          f"{cfg.max_prompt_length} and max_length={cfg.max_length}")


def _validate_clipping(cfg: TrainConfig) -> None:
    """``max_grad_norm``: null or 0 = no clipping (DeepSpeed's 0, on every engine), > 0 = clip;
    negative, NaN and inf are refused (a negative norm would step up the gradient)."""
    _number(cfg, "max_grad_norm", "> 0 to clip, or 0 / null for no clipping", lambda v: v >= 0,
            "negative, NaN and inf are refused")


def _validate_outputs(cfg: TrainConfig) -> None:
    """Checkpoints and logging: counts in range, ``tensorboard`` installed."""
    _at_least(cfg, 0, "save_steps", "save_total_limit")
    _at_least(cfg, 1, "log_steps")
    if cfg.save_total_limit is None:
        cfg.save_total_limit = 0  # HF's "keep all"
    if cfg.tensorboard and not _has_tensorboard():
        raise ConfigError("tensorboard=true needs the tensorboard package "
                          "(pip install tensorboard)")
    _validate_report_to(cfg)


def _validate_report_to(cfg: TrainConfig) -> None:
    """``report_to``: names of :data:`REPORT_TO` (a single name or ``none`` accepted), jsonl
    always included; ``tensorboard: true`` and ``tensorboard`` in the list mean the same; each
    package installed (checked here, before the model loads)."""
    given = cfg.report_to
    names = [given] if isinstance(given, str) else list(given)
    if names == ["none"]:
        names = []
    bad = [n for n in names if n not in REPORT_TO]
    if bad or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"`report_to` must be a list of {REPORT_TO} (or none), got {given!r}")
    if cfg.tensorboard:
        names.append("tensorboard")
    cfg.report_to = [n for n in REPORT_TO if n == "jsonl" or n in names]
    cfg.tensorboard = "tensorboard" in cfg.report_to
    if cfg.tensorboard and not _has_tensorboard():
        raise ConfigError("report_to includes tensorboard, which needs the tensorboard package "
                          "(pip install tensorboard)")
    if "wandb" in cfg.report_to and not _has_package("wandb"):
        raise ConfigError("report_to includes wandb, which needs the wandb package (pip install "
                          "wandb; WANDB_MODE=offline logs without an account or network)")


def _has_package(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# columns a `column_map` may name: offline pairs (ours and TRL's) and online prompts
PAIR_COLUMNS = ("prompt", "response_a", "response_b", "reward_a", "reward_b", "ref_logp_a",
                "ref_logp_b", "chosen", "rejected", "chosen_reward", "rejected_reward", "group")
TRL_COLUMNS = {"chosen": "response_a", "rejected": "response_b",
               "chosen_reward": "reward_a", "rejected_reward": "reward_b"}
PROMPT_COLUMNS = ("prompt",)


def _validate_data_source(cfg: TrainConfig) -> None:
    """``train_split`` / ``prompt_split`` (non-empty names) and ``column_map`` (a mapping of
    canonical names of this mode to distinct column names)."""
    for name in ("train_split", "prompt_split"):
        value = getattr(cfg, name)
        if not value.strip():
            raise ConfigError(f"`{name}` must be a split name such as 'train', got {value!r}")
    cm = cfg.column_map
    if cm is None:
        return
    if not cm:
        cfg.column_map = None
        return
    online = cfg.mode == "online"
    allowed = PROMPT_COLUMNS if online else PAIR_COLUMNS
    for key, column in cm.items():
        if key not in allowed:
            raise ConfigError(f"`column_map`: {key!r} is not a column the trainer reads with "
                              f"mode={cfg.mode} (canonical names: {', '.join(allowed)}); the "
                              "form is {canonical_name: column_in_file}")
        if not isinstance(column, str) or not column.strip():
            raise ConfigError(f"`column_map`: {key!r} must map to a column name (a non-empty "
                              f"string), got {column!r}")
    for trl, ours in TRL_COLUMNS.items():
        if trl in cm and ours in cm:
            raise ConfigError(f"`column_map` gives both {trl!r} (TRL name) and {ours!r}, which "
                              "are the same field; keep one")
    columns = list(cm.values())
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise ConfigError(f"`column_map` maps several fields to the column(s) {twice}; each "
                          "field needs its own column")


def _check_output_dir(path: str) -> None:
    """``output_dir`` must be a writable directory, or creatable (its nearest existing ancestor
    a writable directory)."""
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(full):
        if not os.path.isdir(full):
            raise ConfigError(f"`output_dir`: {path!r} exists and is not a directory")
        if not os.access(full, os.W_OK | os.X_OK):
            raise ConfigError(f"`output_dir`: directory {path!r} is not writable")
        return
    if os.path.lexists(full):
        raise ConfigError(f"`output_dir`: {path!r} is a broken symbolic link")
    parent = os.path.dirname(full)
    while parent != os.path.dirname(parent) and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"`output_dir`: cannot create {path!r}: {parent!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"`output_dir`: cannot create {path!r}: directory {parent!r} is not "
                          "writable")


class MissingPathError(ConfigError, FileNotFoundError):
    """A configured path that does not exist (``resume``): a :class:`ConfigError` (one line,
    exit 2) that is also the ``FileNotFoundError`` ``train()`` raised for it before the check
    moved ahead of the model load."""


def _check_resume(resume: str | None) -> None:
    """``resume``: null, ``auto`` or a checkpoint directory that exists."""
    if resume is None or resume == "auto":
        return
    if not os.path.exists(resume):
        raise MissingPathError(f"`resume`: checkpoint {resume!r} does not exist (give a "
                          "checkpoint-<step> directory, auto for the newest one in output_dir, "
                          "or null to start fresh)")
    if not os.path.isdir(resume):
        raise ConfigError(f"`resume`: {resume!r} is not a checkpoint directory "
                          "(checkpoint-<step>)")


def _check_world_size(cfg: TrainConfig) -> None:
    """Under a launcher (WORLD_SIZE set), the global batch and the generation chunks must split
    over the ranks (the engine would refuse them only after loading the model)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return  # not a launcher's value; the engine reports it
    if world <= 1:
        return
    if cfg.batch_size % world:
        raise ConfigError(f"`batch_size`={cfg.batch_size} (the GLOBAL micro-batch) must be a "
                          f"multiple of WORLD_SIZE={world} (each rank takes batch_size / "
                          "WORLD_SIZE pairs)")
    g = cfg.generation_batch_size
    if cfg.mode == "online" and g is not None and (cfg.rollout_batch_size // world) % g:
        raise ConfigError(f"`generation_batch_size`={g} must divide each rank's share of the "
                          f"rollout ({cfg.rollout_batch_size // world} prompts on {world} ranks)")


# online


def _validate_online(cfg: TrainConfig) -> None:
    """The ``mode``/online fields (see :mod:`drorebel.trainer.online`): ranges always (a bad
    value is never meaningful), the rest with ``mode=online``."""
    _at_least(cfg, 1, "rollout_batch_size", "num_passes", "max_new_tokens",
              "generation_batch_size")
    _at_least(cfg, 0, "top_k")
    _number(cfg, "top_p", "in (0, 1]", lambda v: 0 < v <= 1, "1: off")
    w = cfg.reward_weights
    if w is not None and (not w or not all(isinstance(x, (int, float)) and
                                           not isinstance(x, bool) and _finite(x) for x in w)):
        raise ConfigError(f"`reward_weights` must be a non-empty list of finite numbers, got {w!r}")
    _number(cfg, "kl_coef", ">= 0 and finite", lambda v: v >= 0, "0: no KL shaping")
    if cfg.mode != "online" and cfg.kl_coef > 0:
        raise ConfigError(f"`kl_coef`={cfg.kl_coef!r} shapes the rewards of sampled responses "
                          "(mode=online only); offline rewards come from train_file: set "
                          "mode=online or remove kl_coef")
    if cfg.mode != "online":
        return
    if cfg.dro_over == "groups":
        raise ConfigError("`dro_over`='groups' needs a group per pair, which online rollouts do "
                          "not have (the reward function gives scores only): use mode=offline "
                          "with a `group` column in train_file, or dro_over=pairs")
    if cfg.prompt_file is None:
        raise ConfigError("mode=online needs `prompt_file` (a dataset with a `prompt` column)")
    if (cfg.reward_fn is None) == (cfg.reward_model is None):
        raise ConfigError("mode=online needs exactly one of `reward_fn` ('module:function') or "
                          "`reward_model` (a sequence-classification model path)")
    if cfg.reward_fn is not None and not all(cfg.reward_fn.partition(":")[::2]):
        raise ConfigError(f"`reward_fn` must look like 'module:function', got {cfg.reward_fn!r}")
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


def validate_values(cfg: TrainConfig) -> None:
    """The value checks of :meth:`TrainConfig.validate`, in order (types are checked before)."""
    for name, allowed in CHOICES.items():
        _choice(name, getattr(cfg, name), allowed)
    _validate_model(cfg)
    _validate_loss(cfg)
    _validate_optimisation(cfg)
    _validate_outputs(cfg)
    _validate_data_source(cfg)
    _validate_lora(cfg)
    _validate_online(cfg)  # online


def check_paths(cfg: TrainConfig, outputs: bool = True) -> None:
    """:meth:`TrainConfig.check_paths`: files, output folder, resume target, launcher."""
    for name in ("prompt_file",) if cfg.mode == "online" else ("train_file",):  # online
        value = getattr(cfg, name)
        if value is None or not (os.path.exists(value) or hub_dataset_name(value)):
            raise ConfigError(f"`{name}`: file {value!r} does not exist")
    for name in ("model", "tokenizer"):
        value = getattr(cfg, name)
        if value and looks_local(value) and not os.path.exists(value):
            raise ConfigError(f"`{name}`: path {value!r} does not exist")
    if cfg.deepspeed is not None and not os.path.isfile(cfg.deepspeed):
        what = "is not a file" if os.path.exists(cfg.deepspeed) else "does not exist"
        raise ConfigError(f"`deepspeed`: config file {cfg.deepspeed!r} {what}")
    if outputs:
        _check_output_dir(cfg.output_dir)
        _check_resume(cfg.resume)
    _check_world_size(cfg)
