"""Other projects' spellings of the trainer's settings, and the key checks of a config mapping.

Users bring Hugging Face ``TrainingArguments`` and TRL names (``learning_rate``,
``gradient_accumulation_steps``, ``per_device_train_batch_size``, ...): :data:`ALIASES` maps
each to a :class:`~drorebel.trainer.config.TrainConfig` field (converting the value where the
meaning differs), :data:`UNSUPPORTED` names the settings with no equivalent and what to use
instead. :func:`resolve_aliases` turns one mapping (a YAML file or the command line) into
typed field values; unknown keys get the closest name. :func:`format_fields_help` writes the
``drorebel train --help`` epilog. :func:`load_yaml` parses a config file or a ``key=value``
value, refusing a key given twice and turning a syntax error into one line with the place;
:func:`check_types` checks every field's type. The functions take the config dataclass as an
argument so that this module does not import :mod:`drorebel.trainer.config` (which imports it).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from drorebel.trainer.errors import ConfigError

__all__ = ["Alias", "ALIASES", "UNSUPPORTED", "SAME_AS_HF", "DTYPES", "SCHEDULERS",
           "resolve_aliases", "check_alias_requirements", "format_fields_help", "matches_type",
           "check_types", "type_name", "load_yaml", "yaml_problem"]

# the value vocabularies that aliases convert into (TrainConfig validates against them too)
SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")

# ---- HF TrainingArguments / TRL spellings ---------------------------------------------------

_UNSET = object()  # a converter's "this value sets nothing" (bf16: false)


@dataclass(frozen=True)
class Alias:
    """Another project's spelling of a :class:`TrainConfig` field.

    ``convert(value)`` gives the field's value (default: unchanged; :data:`_UNSET`: sets
    nothing); ``requires = (field, value)``: the finished config must have that value, else
    ``why_not`` is the error."""

    field: str
    source: str  # where the spelling comes from (shown in --help and errors)
    note: str = ""  # how the value maps, when not 1:1
    convert: Callable[[Any], Any] | None = None
    requires: tuple[str, Any] | None = None
    why_not: str = ""


def _precision(dtype: str, key: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` must be true or false, got {value!r}")
        return dtype if value else _UNSET

    return convert


def _world_size() -> int:
    """``WORLD_SIZE`` of the launcher (torchrun, deepspeed, accelerate set it; 1 without one)."""
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
            if os.environ.get(var, "1") not in ("", "1"):
                raise ConfigError(f"`per_device_train_batch_size` needs WORLD_SIZE, which this "
                                  f"MPI launch ({var}={os.environ[var]}) does not set yet: give "
                                  "`batch_size` (the GLOBAL micro-batch over all ranks) instead")
        return 1
    try:
        world = int(raw)
    except ValueError:
        world = 0
    if world < 1:
        raise ConfigError(f"`per_device_train_batch_size`: WORLD_SIZE={raw!r} is not a positive "
                          "integer; give `batch_size` (the GLOBAL micro-batch) instead")
    return world


def _per_device(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"`per_device_train_batch_size` must be an integer >= 1, got {value!r}")
    return value * _world_size()


_HF_SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear",
                  "cosine": "cosine"}


def _hf_scheduler(value: Any) -> Any:
    if value not in _HF_SCHEDULERS:
        raise ConfigError(f"`lr_scheduler_type` must be one of {tuple(_HF_SCHEDULERS)} (our "
                          f"`scheduler`: {', '.join(SCHEDULERS)}), got {value!r}")
    return _HF_SCHEDULERS[value]


def _hf_resume(value: Any) -> Any:
    if isinstance(value, bool):
        return "auto" if value else None
    return value


_HF, _TRL = "HF TrainingArguments", "TRL"
ALIASES: dict[str, Alias] = {
    "learning_rate": Alias("lr", _HF),
    "gradient_accumulation_steps": Alias("grad_accum", _HF),
    "logging_steps": Alias("log_steps", _HF, "an integer number of steps"),
    "lr_scheduler_type": Alias("scheduler", _HF, "linear, cosine, constant, "
                               "constant_with_warmup (= constant: every scheduler warms up for "
                               "warmup_steps)", _hf_scheduler),
    "global_batch_size": Alias("batch_size", "drorebel", "the GLOBAL micro-batch"),
    "per_device_train_batch_size": Alias(
        "batch_size", _HF, "batch_size = per_device_train_batch_size x WORLD_SIZE (the "
        "launcher's; 1 without one)", _per_device),
    "bf16": Alias("dtype", _HF, "true: dtype=bfloat16 (the model is loaded in bfloat16); "
                  "false: sets nothing", _precision("bfloat16", "bf16")),
    "fp16": Alias("dtype", _HF, "true: dtype=float16 (the model is loaded in float16); false: "
                  "sets nothing", _precision("float16", "fp16")),
    "torch_dtype": Alias("dtype", f"{_TRL} ModelConfig", f"one of {', '.join(DTYPES)}"),
    "model_name_or_path": Alias("model", f"{_TRL} ModelConfig"),
    "resume_from_checkpoint": Alias("resume", _HF, "a path; true = auto; false = null",
                                    _hf_resume),
    "use_liger_kernel": Alias("liger_kernel", _HF),
    "num_ppo_epochs": Alias("num_passes", f"{_TRL} PPO/RLOO", "passes over each rollout batch"),
    "max_completion_length": Alias(
        "max_new_tokens", f"{_TRL} online trainers", "tokens generated per completion; "
        "mode=online only", requires=("mode", "online"),
        why_not="`max_completion_length` (TRL) maps to `max_new_tokens`, which only mode=online "
                "uses; offline responses are cut at max_length - prompt tokens (max_length = "
                "prompt + response): set `max_length` / `max_prompt_length` instead"),
}
# HF/TRL settings with no equivalent here: what to use instead (one-line errors)
UNSUPPORTED: dict[str, str] = {
    "num_train_epochs": "training length is `max_steps` optimiser steps (one epoch of N pairs "
                        "is N / (batch_size x grad_accum) steps)",
    "warmup_ratio": "give `warmup_steps` (= warmup_ratio x max_steps)",
    "adam_beta1": "give `adam_betas: [beta1, beta2]`",
    "adam_beta2": "give `adam_betas: [beta1, beta2]`",
    "use_peft": "LoRA is on when `lora_r` > 0 (TRL ModelConfig's lora_r, lora_alpha, "
                "lora_dropout and lora_target_modules are our names too): drop use_peft",
}


def resolve_aliases(data: dict[str, Any], cls: type, choices: dict[str, tuple[str, ...]],
                    where: str = "config") -> tuple[dict[str, Any], dict[str, str]]:
    """``(values, origins)``: ``data`` with :data:`ALIASES` mapped to their fields and values
    type-checked (YAML 1.1's ``"3e-5"`` strings read as floats); ``origins[field]`` is the key
    that set it. Unknown keys (with the closest name), :data:`UNSUPPORTED` ones and an alias
    and its field (or two aliases) with different values are a :class:`ConfigError`. ``cls``:
    the config dataclass; ``choices``: the allowed values of its choice fields."""
    fields = _fields(cls)
    for key in data:
        if key in UNSUPPORTED:
            raise ConfigError(f"{where}: `{key}` is not supported: {UNSUPPORTED[key]}")
    unknown = [key for key in data if key not in fields and key not in ALIASES]
    if unknown:
        raise ConfigError(f"{where}: unknown config field(s): "
                          f"{', '.join(_suggest(str(k), cls) for k in unknown)} "
                          "(`drorebel train --help` lists them)")
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    raw: dict[str, Any] = {}
    for key, given in data.items():
        alias = ALIASES.get(key)
        name, value = (alias.field if alias else key), given
        if alias and alias.convert is not None:
            value = alias.convert(value)
            if value is _UNSET:
                continue
        value = _typed(key, name, value, cls, choices)
        if not (alias and alias.convert):
            given = value  # shown as typed ("3e-5" → 3e-05)
        if name in values and values[name] != value:
            raise ConfigError(f"{where}: {_describe(origins[name], raw[name], values[name])} and "
                              f"{_describe(key, given, value)} both set `{name}`; give one")
        values[name], origins[name], raw[name] = value, key, given
    return values, origins


def _describe(key: str, raw: Any, value: Any) -> str:
    alias = ALIASES.get(key)
    if alias is None:
        return f"`{key}`={raw!r}"
    shown = f"`{key}`={raw!r}" + (f" (= {alias.field}={value!r})" if raw != value else "")
    return f"{shown} ({alias.source} spelling of `{alias.field}`)"


def check_alias_requirements(values: dict[str, Any], origins: dict[str, str], cls: type
                             ) -> None:
    """A :class:`ConfigError` when an alias that was used needs another field's value (e.g.
    ``max_completion_length`` only with ``mode=online``) and the finished config lacks it."""
    defaults = _defaults(cls)
    for key in origins.values():
        alias = ALIASES.get(key)
        if alias is not None and alias.requires is not None:
            other, want = alias.requires
            if values.get(other, defaults[other]) != want:
                raise ConfigError(alias.why_not)


def _suggest(key: str, cls: type) -> str:
    names = [*_fields(cls), *ALIASES]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not close:
        return f"`{key}`"
    hint = close[0]
    if hint in ALIASES:
        return f"`{key}` (did you mean `{hint}`, the {ALIASES[hint].source} spelling of " \
               f"`{ALIASES[hint].field}`?)"
    return f"`{key}` (did you mean `{hint}`?)"


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _defaults(cls: type) -> dict[str, Any]:
    return {name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for name, f in _fields(cls).items()}


def _typed(key: str, name: str, value: Any, cls: type, choices: dict[str, tuple[str, ...]]
           ) -> Any:
    """``value`` for field ``name`` (set by ``key``), type-checked; YAML 1.1 reads "3e-5" as a
    string, so strings of float fields are parsed as floats."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(value, str) and matches_type(1.5, hint):
        try:
            value = float(value)
        except ValueError:
            pass
    if not matches_type(value, hint):
        via = f" (→ `{name}`)" if key != name else ""
        raise ConfigError(f"`{key}`{via} must be {_type_name(hint)}, got {value!r}")
    if key != name and name in choices and value not in choices[name]:
        raise ConfigError(f"`{key}` (→ `{name}`) must be one of {choices[name]}, got {value!r}")
    return value


def type_name(hint: Any) -> str:
    """``float``, ``int | None``, ``list[float]``: a type hint as the error messages show it."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


_type_name = type_name


def check_types(cfg: Any) -> None:
    """A :class:`ConfigError` for the first field of the dataclass instance ``cfg`` whose value
    does not fit its type hint (``rho: true`` is not the number 1; ``batch_size: 4.0`` is not an
    integer). ``resolve_aliases`` checks the values of a mapping; this checks a config built
    directly in Python too."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not matches_type(value, hints[f.name]):
            raise ConfigError(f"`{f.name}` must be {type_name(hints[f.name])}, got {value!r}")


def matches_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type hint ``hint`` (bools are not numbers)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint)


# ---- YAML -----------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML silently keeps
    the last one: ``lr`` written twice would train with whichever came last)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` merges; its keys may be overridden here
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable (complex) key: SafeLoader refuses it itself
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice (first on line "
                        f"{first.line + 1}); give it once", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def yaml_problem(err: yaml.YAMLError) -> tuple[str, Any]:
    """``(problem, mark)`` of a YAML error: what the parser expected (its context and problem
    on one line) and where (a mark with 0-based ``line``/``column``; None when unknown)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = " ".join(str(p) for p in (getattr(err, "context", None),
                                        getattr(err, "problem", None)) if p) or str(err)
    return " ".join(problem.split()), mark


def load_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML (safe: plain data only; a key given twice in one mapping is an
    error). A :class:`ConfigError` on one line for a syntax error: ``where`` is a file path
    (``path:line:column: invalid YAML: <problem>``) or ``override 'key=value'`` (a command-line
    value: ``override 'lr=[1,': the value is not valid YAML: <problem>``)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        problem, mark = yaml_problem(err)
        if where.startswith("override "):
            raise ConfigError(f"{where}: the value is not valid YAML: {problem}") from err
        if mark is None:
            raise ConfigError(f"{where}: invalid YAML: {problem}") from err
        raise ConfigError(f"{where}:{mark.line + 1}:{mark.column + 1}: invalid YAML: "
                          f"{problem}") from err


# ---- help -----------------------------------------------------------------------------------

def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def format_fields_help(cls: type, groups: tuple[str, ...], batch_rule: str, width: int = 100
                       ) -> str:
    """Every field of ``cls`` by group (name, default, meaning; the field metadata holds
    ``group`` and ``help``), the batch-size rule, the alias table and the refused HF/TRL
    settings: the epilog of ``drorebel train --help``."""
    def wrap(text: str, first: int = 6, rest: int = 6) -> list[str]:
        return textwrap.wrap(text, width, initial_indent=" " * first,
                             subsequent_indent=" " * rest, break_on_hyphens=False)

    defaults = _defaults(cls)
    lines = wrap("config fields: set them in the YAML file or as key=value (values are YAML; "
                 "the command line wins over the file).", 0, 0)
    for group in groups:
        lines += ["", f"{group}:"]
        for f in dataclasses.fields(cls):
            if f.metadata["group"] == group:
                lines.append(f"  {f.name} (default: {_show(defaults[f.name])})")
                lines += wrap(f.metadata["help"])
    lines += ["", "batch size:"] + wrap(batch_rule, 2, 2)
    lines += ["", "HF TrainingArguments / TRL spellings (YAML or key=value; an alias and its "
              "field", "with different values is an error):"]
    for key, alias in ALIASES.items():
        lines += wrap(f"{key} -> {alias.field}   [{alias.source}]"
                      + (f" {alias.note}" if alias.note else ""), 2, 6)
    lines += wrap("Same name, same meaning: " + ", ".join(SAME_AS_HF) + ".", 2, 6)
    lines += ["", "refused (no equivalent here):"]
    for key, why in UNSUPPORTED.items():
        lines += wrap(f"{key}: {why}", 2, 6)
    return "\n".join(lines)


# HF TrainingArguments / TRL names that are our field names too
SAME_AS_HF = ("warmup_steps", "weight_decay", "max_grad_norm", "max_steps", "save_steps",
               "save_total_limit", "output_dir", "seed", "gradient_checkpointing", "deepspeed",
               "beta", "temperature", "max_length", "max_prompt_length", "max_new_tokens",
               "top_p", "top_k", "trust_remote_code", "attn_implementation",
               "overwrite_output_dir", "report_to")
# TRL ModelConfig's LoRA names (same meaning; LoRA is on when lora_r > 0)
SAME_AS_HF += ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


