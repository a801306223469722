"""``drorebel train [--config] run.yaml [key=value ...]``: offline or online DRO-REBEL training
(one process, ``torchrun`` or ``deepspeed``)."""

from __future__ import annotations

import argparse
import os

__all__ = ["add_train_arguments", "run_train", "add_precompute_arguments", "run_precompute",
           "load_config", "yaml_error_message"]

_TRAIN_DESCRIPTION = (
    "Train from a YAML file of TrainConfig fields plus key=value overrides (values parsed as "
    "YAML; the command line wins). The config file is --config FILE or the first positional "
    "argument when it ends in .yaml/.yml. Launch with torchrun or deepspeed for several "
    "GPUs. HF TrainingArguments / TRL spellings are accepted (table below). Every field, its "
    "default and its meaning follow.")


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML file with TrainConfig fields (or give it as the first "
                             "positional argument)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override a config field or its HF/TRL alias (value parsed as YAML)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--config`` and the free ``key=value`` overrides of :class:`TrainConfig`; the
    help lists every field (group, default, meaning) and the accepted HF/TRL aliases."""
    import shutil
    import textwrap

    from drorebel.trainer.config import format_fields_help

    _config_arguments(parser)
    # the `deepspeed` launcher appends --local_rank=N unless given --no_local_rank; the rank is
    # read from the environment (LOCAL_RANK), so the flag is accepted and ignored
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    width = min(max(shutil.get_terminal_size().columns - 2, 70), 120)
    parser.usage = "%(prog)s [-h] [--config CONFIG.yaml | CONFIG.yaml] [key=value ...]"
    parser.description = textwrap.fill(_TRAIN_DESCRIPTION, width)
    parser.epilog = format_fields_help(width)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """``(config path, overrides)``: a first positional ``*.yaml``/``*.yml`` without ``=`` is the
    config file (``drorebel train run.yaml lr=1e-5``), unless ``--config`` is given."""
    from drorebel.trainer.config import ConfigError

    items = list(args.overrides or [])
    if items and "=" not in items[0] and items[0].endswith((".yaml", ".yml")):
        if args.config is not None:
            raise ConfigError(f"two config files: --config {args.config!r} and {items[0]!r}; "
                              "give one")
        return items[0], items[1:]
    return args.config, items


def yaml_error_message(err: Exception, overrides: list[str] | None = None) -> str:
    """One line for a ``yaml.YAMLError``: ``file:line:column: invalid YAML: <problem>``, or the
    ``key=value`` override whose value is not YAML (when ``overrides`` holds it)."""
    import yaml

    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = "; ".join(p for p in (getattr(err, "context", None), getattr(err, "problem", None))
                       if p) or str(err)
    if mark is None:
        return f"invalid YAML: {problem}"
    name = str(getattr(mark, "name", "") or "")
    if name and not name.startswith("<"):
        return f"{name}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}"
    for item in overrides or []:  # parsed from a string: find the override it came from
        value = item.partition("=")[2]
        try:
            yaml.safe_load(value)
        except yaml.YAMLError:
            return f"override {item!r}: the value is not valid YAML: {problem}"
    return f"invalid YAML in a command-line value at line {mark.line + 1}, column " \
           f"{mark.column + 1}: {problem}"


def load_config(args: argparse.Namespace):
    """The :class:`TrainConfig` of ``args``; a config file or override that is not YAML, that
    cannot be read or decoded, is a :class:`ConfigError` (one line naming the file and place)."""
    import yaml

    from drorebel.trainer.config import ConfigError, TrainConfig

    path, overrides = _config_and_overrides(args)
    try:
        return TrainConfig.from_yaml(path, overrides)
    except yaml.YAMLError as err:
        raise ConfigError(yaml_error_message(err, overrides)) from err
    except UnicodeDecodeError as err:
        if path is None:
            raise
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {err.start}: "
                          f"{err.reason})") from err
    except OSError as err:
        if path is None or err.filename is None or \
                os.path.abspath(str(err.filename)) != os.path.abspath(path):
            raise
        raise ConfigError(f"cannot read config file {path!r}: "
                          f"{err.strerror or type(err).__name__}") from err


def run_train(args: argparse.Namespace) -> int:
    """Build the config, train, print where the final model went. Errors propagate:
    :func:`drorebel.cli.main` reports a :class:`~drorebel.trainer.errors.UserError` as one line
    and exits 2."""
    cfg = load_config(args)
    args._output_dir = cfg.output_dir  # for the Ctrl-C message (the last checkpoint)
    from drorebel.trainer.loop import train

    result = train(cfg)
    if int(os.environ.get("RANK", "0") or 0) == 0:
        where = result.final_dir or "(stopped early; resumable from the last checkpoint)"
        print(f"[drorebel] done: {result.steps} steps, final model in {where}")
    return 0


def add_precompute_arguments(parser: argparse.ArgumentParser) -> None:
    """``drorebel precompute-ref --out cached.jsonl [--config] [run.yaml] [key=value ...]``."""
    parser.add_argument("--out", required=True, help="output JSONL path")
    _config_arguments(parser)


def run_precompute(args: argparse.Namespace) -> int:
    """Write the kept rows with ``ref_logp_a``/``ref_logp_b`` (log-probs of the config's model).
    Errors propagate to :func:`drorebel.cli.main` (a UserError: one line, exit 2)."""
    from drorebel.trainer.precompute import precompute_reference

    n = precompute_reference(load_config(args), args.out)
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"[drorebel] wrote {n} rows with ref_logp_a/ref_logp_b to {args.out}")
    return 0
