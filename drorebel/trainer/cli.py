"""``drorebel train [--config] run.yaml [key=value ...]``: offline or online DRO-REBEL training
(one process, ``torchrun`` or ``deepspeed``)."""

from __future__ import annotations

import argparse

__all__ = ["add_train_arguments", "run_train", "add_precompute_arguments", "run_precompute"]

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


def run_train(args: argparse.Namespace) -> int:
    """Build the config, train, print where the final model went; config/data errors exit 2."""
    import os
    import sys

    from drorebel.trainer.config import TrainConfig
    from drorebel.trainer.errors import UserError

    try:
        cfg = TrainConfig.from_yaml(*_config_and_overrides(args))
        from drorebel.trainer.loop import train

        result = train(cfg)
    except UserError as err:
        print(f"drorebel train: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        where = result.final_dir or "(stopped early; resumable from the last checkpoint)"
        print(f"[drorebel] done: {result.steps} steps, final model in {where}")
    return 0


def add_precompute_arguments(parser: argparse.ArgumentParser) -> None:
    """``drorebel precompute-ref --out cached.jsonl [--config] [run.yaml] [key=value ...]``."""
    parser.add_argument("--out", required=True, help="output JSONL path")
    _config_arguments(parser)


def run_precompute(args: argparse.Namespace) -> int:
    """Write the kept rows with ``ref_logp_a``/``ref_logp_b`` (log-probs of the config's model);
    config/data errors exit 2."""
    import sys

    from drorebel.trainer.config import TrainConfig
    from drorebel.trainer.errors import UserError
    from drorebel.trainer.precompute import precompute_reference

    try:
        n = precompute_reference(TrainConfig.from_yaml(*_config_and_overrides(args)), args.out)
    except UserError as err:
        print(f"drorebel precompute-ref: error: {err}", file=sys.stderr)
        return 2
    print(f"[drorebel] wrote {n} rows with ref_logp_a/ref_logp_b to {args.out}")
    return 0
