"""``drorebel train --config run.yaml [key=value ...]``: offline or online DRO-REBEL training
(one process, ``torchrun`` or ``deepspeed``)."""

from __future__ import annotations

import argparse

__all__ = ["add_train_arguments", "run_train", "add_precompute_arguments", "run_precompute"]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--config`` and the free ``key=value`` overrides of :class:`TrainConfig`."""
    parser.add_argument("--config", default=None, help="YAML file with TrainConfig fields")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override a config field (value parsed as YAML)")
    # the `deepspeed` launcher appends --local_rank=N unless given --no_local_rank; the rank is
    # read from the environment (LOCAL_RANK), so the flag is accepted and ignored
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)


def run_train(args: argparse.Namespace) -> int:
    """Build the config, train, print where the final model went; config/data errors exit 2."""
    import os
    import sys

    from drorebel.trainer.checkpoint import CheckpointError
    from drorebel.trainer.config import ConfigError, TrainConfig
    from drorebel.trainer.data import DataError

    try:
        cfg = TrainConfig.from_yaml(args.config, args.overrides)
        from drorebel.trainer.loop import train

        result = train(cfg)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"drorebel train: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        where = result.final_dir or "(stopped early; resumable from the last checkpoint)"
        print(f"[drorebel] done: {result.steps} steps, final model in {where}")
    return 0


def add_precompute_arguments(parser: argparse.ArgumentParser) -> None:
    """``drorebel precompute-ref --out cached.jsonl [--config run.yaml] [key=value ...]``."""
    parser.add_argument("--config", default=None, help="YAML file with TrainConfig fields")
    parser.add_argument("--out", required=True, help="output JSONL path")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def run_precompute(args: argparse.Namespace) -> int:
    """Write the kept rows with ``ref_logp_a``/``ref_logp_b`` (log-probs of the config's model)."""
    from drorebel.trainer.config import TrainConfig
    from drorebel.trainer.precompute import precompute_reference

    n = precompute_reference(TrainConfig.from_yaml(args.config, args.overrides), args.out)
    print(f"[drorebel] wrote {n} rows with ref_logp_a/ref_logp_b to {args.out}")
    return 0
