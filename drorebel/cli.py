"""Command-line entry point: ``drorebel <command> ...``.

Each sub-command lives in its own module and registers itself through a small
``add_parser(subparsers)`` / ``run(args)`` pair, imported lazily so that ``drorebel --help``
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# experiment name -> module path; each module exposes add_arguments(parser) and run(args)
EXPERIMENTS: dict[str, str] = {
    "radius-coverage": "drorebel.experiments.radius_coverage.study",
    "preference-shift": "drorebel.experiments.preference_shift.demo",
    "preference-shift-real": "drorebel.experiments.preference_shift.real",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drorebel", description=__doc__.splitlines()[0])
    # `deepspeed --module drorebel.cli ...` puts --local_rank=N before the sub-command; the rank
    # is read from the environment, so the flag is accepted and ignored
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    exp = sub.add_parser("experiment", help="run a bundled experiment / reproduction")
    exp_sub = exp.add_subparsers(dest="experiment", required=True)
    for name, module_path in EXPERIMENTS.items():
        module = importlib.import_module(module_path)
        p = exp_sub.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)

    from drorebel.trainer.cli import (
        add_precompute_arguments,
        add_train_arguments,
        run_precompute,
        run_train,
    )

    train = sub.add_parser("train", help="offline or online DRO-REBEL training from a YAML config "
                           "(`drorebel train --help` lists every field)")
    add_train_arguments(train)
    train.set_defaults(_run=run_train)

    pre = sub.add_parser("precompute-ref", help="cache reference log-probs in a JSONL copy")
    add_precompute_arguments(pre)
    pre.set_defaults(_run=run_precompute)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
