"""Command-line entry point: ``drorebel [--debug] <command> ...``.

Each sub-command lives in its own module and registers itself through a small
``add_parser(subparsers)`` / ``run(args)`` pair, imported lazily so that ``drorebel --help``
stays fast.

Errors: a :class:`drorebel.trainer.errors.UserError` (a setting, a data row, a checkpoint, a
diverged run), a config file that is not valid YAML or cannot be read, and a full disk are
reported as ONE line on stderr, ``drorebel <command>: error: <message>``, with exit code 2
(Ctrl-C: one line naming the last checkpoint, exit code 130). Under ``torchrun``/``deepspeed``
only rank 0 prints; every rank exits with the same code. Anything else is a bug and keeps its
traceback. ``--debug`` (before or after the command) or ``DROREBEL_DEBUG=1`` re-raises every
error to show its traceback.
"""

from __future__ import annotations

import argparse
import errno
import gc
import importlib
import os
import re
import sys

# experiment name -> module path; each module exposes add_arguments(parser) and run(args)
EXPERIMENTS: dict[str, str] = {
    "radius-coverage": "drorebel.experiments.radius_coverage.study",
    "preference-shift": "drorebel.experiments.preference_shift.demo",
    "preference-shift-real": "drorebel.experiments.preference_shift.real",
    "robustness": "drorebel.experiments.preference_shift.protocol",
}

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention

#: set when a command tore down a process group it created (a torchrun/deepspeed launch)
_DISTRIBUTED_RUN = False
_DEBUG_HELP = "show the full traceback of any error (also DROREBEL_DEBUG=1)"


def _add_debug(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """``--debug`` on the top-level parser (default False) and on every sub-command (default
    SUPPRESS, so that a sub-parser never resets a ``--debug`` given before the command)."""
    parser.add_argument("--debug", action="store_true",
                        default=False if top else argparse.SUPPRESS,
                        help=_DEBUG_HELP if top else argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drorebel", description=__doc__.splitlines()[0])
    _add_debug(parser, top=True)
    # `deepspeed --module drorebel.cli ...` puts --local_rank=N before the sub-command; the rank
    # is read from the environment, so the flag is accepted and ignored
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    exp = sub.add_parser("experiment", help="run a bundled experiment / reproduction")
    _add_debug(exp)
    exp_sub = exp.add_subparsers(dest="experiment", required=True)
    for name, module_path in EXPERIMENTS.items():
        module = importlib.import_module(module_path)
        p = exp_sub.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        module.add_arguments(p)
        _add_debug(p)
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
    _add_debug(train)
    train.set_defaults(_run=run_train)

    pre = sub.add_parser("precompute-ref", help="cache reference log-probs in a JSONL copy")
    add_precompute_arguments(pre)
    _add_debug(pre)
    pre.set_defaults(_run=run_precompute)
    return parser


def _env_debug() -> bool:
    return os.environ.get("DROREBEL_DEBUG", "").strip().lower() not in ("", "0", "false", "no",
                                                                       "off")


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _one_line(text: str) -> str:
    """``text`` with every line break (and the blanks around it) collapsed to one space."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip()


def _command_name(args: argparse.Namespace) -> str:
    if args.command == "experiment":
        return f"experiment {args.experiment}"
    return args.command


def _config_paths(args: argparse.Namespace) -> set[str]:
    """The config file(s) named on the command line (``--config`` or a first ``*.yaml``)."""
    paths = {getattr(args, "config", None)}
    items = getattr(args, "overrides", None) or []
    if items and isinstance(items[0], str) and "=" not in items[0]:
        paths.add(items[0])
    return {os.path.abspath(str(p)) for p in paths if p}


def _is_yaml_error(err: BaseException) -> bool:
    yaml = sys.modules.get("yaml")  # not imported: nothing can have raised a YAMLError
    return yaml is not None and isinstance(err, yaml.YAMLError)


def user_message(err: BaseException, config_paths: set[str] = frozenset()) -> str | None:
    """The one-line message for an error the user can fix, None for a bug (keeps the
    traceback). ``config_paths``: the config files named on the command line, whose OS errors
    (missing, a directory, no permission) are the user's."""
    from drorebel.trainer.errors import UserError

    if isinstance(err, UserError):
        return _one_line(err) or type(err).__name__
    if _is_yaml_error(err):  # e.g. an experiment's own YAML file
        from drorebel.trainer.cli import yaml_error_message

        return _one_line(yaml_error_message(err))
    if isinstance(err, OSError):
        filename = err.filename if err.filename is not None else err.filename2
        if err.errno == errno.ENOSPC:
            return f"no space left on device at {filename}" if filename is not None else \
                _one_line(f"no space left on device ({err})")
        if filename is not None and os.path.abspath(str(filename)) in config_paths:
            reason = err.strerror or type(err).__name__
            return _one_line(f"cannot read config file {str(filename)!r}: {reason}")
    return None


def _interrupted_message(args: argparse.Namespace) -> str:
    output_dir = getattr(args, "_output_dir", None)
    if not output_dir:
        return "interrupted"
    from drorebel.trainer.checkpoint import latest_checkpoint

    last = latest_checkpoint(str(output_dir))
    if last is None:
        return f"interrupted; no checkpoint was written yet in {output_dir}"
    return f"interrupted; the last checkpoint is at {last} (continue with resume=auto)"


def main(argv: list[str] | None = None) -> int:
    global _DISTRIBUTED_RUN
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or _env_debug()
    finished = False
    try:
        code = int(args._run(args) or 0)
        finished = True
        return code
    except KeyboardInterrupt:
        if debug:
            raise
        _report(args, _interrupted_message(args), error=False)
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug:
            raise
        message = user_message(err, _config_paths(args))
        if message is None:
            raise
        _report(args, message)
        return EXIT_USER_ERROR
    finally:
        _DISTRIBUTED_RUN = _close_distributed(finished) or _DISTRIBUTED_RUN


def _close_distributed(finished: bool) -> bool:
    """Tear down a process group the trainer created (torchrun/deepspeed launches); True when
    there was one. The engine (DDP's reducer holds the group) is collected first, while the
    interpreter is fully alive: gloo's worker threads must not outlive it."""
    engine = sys.modules.get("drorebel.trainer.engine")
    if engine is None or not engine.owns_process_group():
        return False
    gc.collect()
    engine.close_process_group(synchronise=finished)
    return True


def run() -> None:
    """The ``drorebel`` console script and ``python -m drorebel.cli``: :func:`main`, then exit.

    After a torchrun/deepspeed launch the process leaves with ``os._exit`` once its outputs are
    written and the process group is destroyed: a gloo communicator's threads torn down during
    interpreter finalization can abort a rank (SIGABRT, "terminate called without an active
    exception") after the run finished, and the launcher then reports the whole run as failed.
    """
    code = main()
    if _DISTRIBUTED_RUN:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _report(args: argparse.Namespace, message: str, error: bool = True) -> None:
    """One line on stderr, from rank 0 only (every rank exits with the same code)."""
    if _rank() == 0:
        kind = "error: " if error else ""
        print(f"drorebel {_command_name(args)}: {kind}{message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    run()
