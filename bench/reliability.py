"""The trainer attacked as its users' mistakes and machines would: a catalogue of bad inputs.

Each case builds a tiny run (the tokenizer, model config and pairs of ``tests/trainer_fixtures``)
with one thing wrong — a data row or file, a setting, a checkpoint, the run directory, a kill —
runs ``drorebel train`` (in-process through :func:`drorebel.cli.main`, or as a subprocess for
the kills) and classifies what happened:

- ``clear error``: exit code 2, exactly one ``drorebel …: error: …`` line on stderr, no
  traceback, and the message names what the case expects (the file and line, the row and field,
  or the setting);
- ``correct run``: exit code 0 and the case's own check of the result holds (e.g. a resumed run
  equals an uninterrupted one bit for bit, the other run's files are all still there);
- ``traceback``: an exception escaped (a bug);
- ``wrong``: anything else (a run that should have failed, an error that names the wrong thing).

    python bench/reliability.py [--out DIR] [--only SUBSTRING]

prints a table and, with ``--out``, writes ``reliability.md`` and ``reliability.json``.
``tests/test_reliability_matrix.py`` runs the whole catalogue and requires every case to be a
clear error or a correct run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from trainer_fixtures.tiny import base_overrides  # noqa: E402

GOOD_ROW = {"prompt": "the cat is", "response_a": "good nice", "response_b": "bad",
            "reward_a": 1.0, "reward_b": -0.5}


@dataclass
class Case:
    """One attack: ``setup(tmp) -> (argv overrides, env)``; ``expect`` is "error" (with
    ``names``: fragments the one-line message must contain) or "run" (with ``check``)."""

    name: str
    group: str
    setup: Callable[[str], list[str]]
    expect: str = "error"
    names: tuple[str, ...] = ()
    check: Callable[[str], bool] | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    case: str
    group: str
    verdict: str
    detail: str
    seconds: float


# ---- building blocks ----------------------------------------------------------------------

def _args(tmp: str, **kw: Any) -> list[str]:
    """``key=value`` overrides of the tiny offline run under ``tmp`` (two quick steps)."""
    cfg = base_overrides(tmp, max_steps=2, save_steps=1)
    cfg.update(kw)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in cfg.items()]


def _file(tmp: str, name: str, content: str | bytes) -> str:
    path = os.path.join(tmp, name)
    with open(path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    return path


def _rows(*rows: dict, n_good: int = 7) -> str:
    return "".join(json.dumps(r) + "\n" for r in [GOOD_ROW] * n_good + list(rows))


def _data_case(name: str, content: str | bytes, names: tuple[str, ...], ext: str = "jsonl",
               expect: str = "error") -> Case:
    def setup(tmp: str) -> list[str]:
        return _args(tmp, train_file=_file(tmp, f"data.{ext}", content))
    return Case(name, "data", setup, expect, names)


def _config_case(name: str, names: tuple[str, ...], **kw: Any) -> Case:
    return Case(name, "config", lambda tmp: _args(tmp, **kw), "error", names)


def _row(**changes: Any) -> dict:
    row = dict(GOOD_ROW)
    for k, v in changes.items():
        if v is _DROP:
            row.pop(k)
        else:
            row[k] = v
    return row


_DROP = object()


# ---- the catalogue -------------------------------------------------------------------------

def data_cases() -> list[Case]:
    bad = 'line 8'  # the bad line is the 8th (7 good rows first)
    return [
        _data_case("malformed JSON line", _rows() + '{"prompt": "a", \n', (bad,)),
        _data_case("truncated last line", _rows() + '{"prompt": "a", "response_a": "go', (bad,)),
        _data_case("duplicate key", _rows() + '{"prompt": "a", "prompt": "b", "response_a": "x",'
                   ' "response_b": "y", "reward_a": 1, "reward_b": 0}\n', (bad, "prompt")),
        _data_case("non-UTF-8 bytes", _rows().encode() + b'{"prompt": "\xff\xfe"}\n',
                   ("data.jsonl",)),
        _data_case("empty file", "", ("empty",)),
        _data_case("blank lines only", "\n\n  \n", ("data.jsonl",)),
        _data_case("csv file", "prompt,response_a\nhi,there\n", (".csv",), ext="csv"),
        Case("directory as train_file", "data", lambda tmp: _args(tmp, train_file=tmp), "error",
             ("train_file",)),
        Case("missing train_file", "data", lambda tmp: _args(tmp, train_file=f"{tmp}/none.jsonl"),
             "error", ("none.jsonl",)),
        Case("column_map to a missing column", "data",
             lambda tmp: _args(tmp, column_map={"prompt": "question"}), "error",
             ("column_map", "question")),
        Case("train_split the data lacks", "data",
             lambda tmp: _args(tmp, train_split="test"), "error", ("train_split", "test")),
        _data_case("ref_logp_a without ref_logp_b", _rows(_row(ref_logp_a=-3.0)), ("ref_logp",)),
        _data_case("string reward", _rows(_row(reward_a="1.5")), ("row 7", "reward_a")),
        _data_case("NaN reward", _rows().replace('"reward_b": -0.5}', '"reward_b": NaN}', 1),
                   ("row 0", "reward_b")),
        _data_case("infinite reward", _rows(_row(reward_a=float("inf"))), ("row 7", "reward_a")),
        _data_case("boolean reward", _rows(_row(reward_b=True)), ("row 7", "reward_b")),
        _data_case("missing reward", _rows(_row(reward_b=_DROP)), ("row 7", "reward_b")),
        _data_case("empty response", _rows(_row(response_b="")), ("row 7", "response_b")),
        _data_case("number as prompt", _rows(_row(prompt=3)), ("row 7", "prompt")),
        _data_case("TRL and native columns together",
                   _rows(_row(chosen="good", rejected="bad")), ("chosen", "response_a")),
        _data_case("positive reference log-prob",
                   _rows(*[_row(ref_logp_a=-1.0, ref_logp_b=-2.0)] * 2,
                         _row(ref_logp_a=0.5, ref_logp_b=-1.0), n_good=0),
                   ("row 2", "ref_logp_a")),
        _data_case("malformed chat messages", _rows(_row(prompt=[{"role": "user"}])),
                   ("row 7", "prompt")),
    ]


def config_cases() -> list[Case]:
    nan, inf = float("nan"), float("inf")
    return [
        _config_case("lr NaN", ("lr",), lr=nan),
        _config_case("lr negative", ("lr",), lr=-1e-3),
        _config_case("lr infinite", ("lr",), lr=inf),
        _config_case("eta infinite", ("eta",), eta=inf),
        _config_case("eta zero", ("eta",), eta=0.0),
        _config_case("rho with divergence none", ("rho",), rho=0.5),
        _config_case("rho negative", ("rho",), divergence="chi2", rho=-0.1),
        _config_case("rho boolean", ("rho",), divergence="chi2", rho=True),
        _config_case("tau with chi2", ("tau",), divergence="chi2", rho=0.1, tau=1.0),
        _config_case("kl with rho and tau", ("tau",), divergence="kl", rho=0.1, tau=1.0),
        _config_case("unknown divergence", ("divergence",), divergence="tv"),
        _config_case("bad Adam betas", ("adam_betas",), adam_betas=[0.9, 1.5]),
        _config_case("dtype float64", ("dtype",), dtype="float64"),
        _config_case("log_steps zero", ("log_steps",), log_steps=0),
        _config_case("negative seed", ("seed",), seed=-1),
        _config_case("max_grad_norm negative", ("max_grad_norm",), max_grad_norm=-1.0),
        _config_case("max_steps zero", ("max_steps",), max_steps=0),
        _config_case("batch_size zero", ("batch_size",), batch_size=0),
        _config_case("temperature zero", ("temperature",), temperature=0.0),
        _config_case("weight decay negative", ("weight_decay",), weight_decay=-0.1),
        _config_case("unknown field", ("lerning_rate",), lerning_rate=1e-3),
        _config_case("beta zero for dpo", ("beta",), loss="dpo", beta=0.0),
        _config_case("kl_coef with mode offline", ("kl_coef",), kl_coef=0.1),
        _config_case("kl_coef negative", ("kl_coef",), kl_coef=-0.1),
        _config_case("column_map unknown field", ("column_map", "answer"),
                     column_map={"answer": "text"}),
        _config_case("report_to unknown sink", ("report_to",), report_to=["mlflow"]),
        Case("YAML syntax error", "config",
             lambda tmp: ["--config", _file(tmp, "bad.yaml", "lr: [1e-3\nmax_steps: 2\n")],
             "error", ("bad.yaml",)),
        Case("missing config file", "config",
             lambda tmp: ["--config", os.path.join(tmp, "nope.yaml")], "error", ("nope.yaml",)),
        Case("alias and field disagree", "config",
             lambda tmp: _args(tmp, lr=1e-3, learning_rate=2e-3), "error",
             ("learning_rate", "lr")),
        Case("output_dir is a file", "config",
             lambda tmp: _args(tmp, output_dir=_file(tmp, "out", "x")), "error", ("output_dir",)),
        Case("resume path missing", "config",
             lambda tmp: _args(tmp, resume=os.path.join(tmp, "checkpoint-9")), "error",
             ("checkpoint-9",)),
        Case("missing deepspeed config", "config",
             lambda tmp: _args(tmp, deepspeed=os.path.join(tmp, "ds.json")), "error",
             ("ds.json",)),
    ]


def _train_once(tmp: str, **kw: Any) -> None:
    from drorebel.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if main(["train", *_args(tmp, **kw)]) != 0:
            raise RuntimeError("the preparatory run failed")


def _previous_run(tmp: str) -> list[str]:
    _train_once(tmp)
    return _args(tmp)


def _files_of(tmp: str) -> set[str]:
    run = os.path.join(tmp, "run")
    return {os.path.relpath(os.path.join(d, f), run) for d, _, fs in os.walk(run) for f in fs}


def _corrupt(kind: str) -> Callable[[str], list[str]]:
    """A 3-step run stopped after step 2 whose newest checkpoint is then damaged, resumed
    with ``resume=auto``: it must fall back to checkpoint-1 and finish."""
    def setup(tmp: str) -> list[str]:
        _train_once(tmp, max_steps=3, stop_at_step=2, save_steps=1)
        ckpt = os.path.join(tmp, "run", "checkpoint-2")
        target = {"model": "model.safetensors", "optimizer": "optimizer.pt",
                  "state": "trainer_state.json"}[kind]
        path = os.path.join(ckpt, target)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(0 if kind == "state" else size // 2)
        return _args(tmp, max_steps=3, save_steps=1, resume="auto")
    return setup


def run_cases() -> list[Case]:
    def keeps_previous(tmp: str) -> bool:
        return {"checkpoint-1", "checkpoint-2"} <= {p.split(os.sep)[0] for p in _files_of(tmp)}

    def overwrite(tmp: str) -> list[str]:
        _train_once(tmp)
        return _args(tmp, overwrite_output_dir=True, max_steps=1)

    def symlink_final(tmp: str) -> list[str]:
        victim = os.path.join(tmp, "victim")
        os.makedirs(victim)
        _file(victim, "keep.txt", "precious")
        os.makedirs(os.path.join(tmp, "run"), exist_ok=True)
        os.symlink(victim, os.path.join(tmp, "run", "final"))
        return _args(tmp)

    def victim_intact(tmp: str) -> bool:
        victim = os.path.join(tmp, "victim")
        return os.listdir(victim) == ["keep.txt"]

    def partial_metrics(tmp: str) -> list[str]:
        _train_once(tmp, max_steps=3, stop_at_step=2, save_steps=1, log_steps=1)
        with open(os.path.join(tmp, "run", "metrics.jsonl"), "a") as f:
            f.write('{"step": 3, "lo')
        return _args(tmp, max_steps=3, resume="auto", log_steps=1)

    return [
        Case("new run in another run's output_dir", "run", _previous_run, "error",
             ("output_dir",)),
        Case("overwrite_output_dir keeps the old checkpoints", "run", overwrite, "run",
             check=keeps_previous),
        Case("symlink planted at output_dir/final", "run", symlink_final, "run",
             check=victim_intact),
        Case("truncated model.safetensors in the newest checkpoint", "run", _corrupt("model"),
             "run"),
        Case("truncated optimizer.pt in the newest checkpoint", "run", _corrupt("optimizer"),
             "run"),
        Case("empty trainer_state.json in the newest checkpoint", "run", _corrupt("state"),
             "run"),
        Case("partial last line in metrics.jsonl", "run", partial_metrics, "run"),
        Case("lr=1e30 diverges", "run", lambda tmp: _args(tmp, lr=1e30), "error",
             ("step",)),
    ]


def catalogue() -> list[Case]:
    return data_cases() + config_cases() + run_cases()


# ---- running ------------------------------------------------------------------------------

_ERROR_LINE = re.compile(r"^drorebel [\w-]+: error: ")


def run_case(case: Case) -> Outcome:
    """Set the case up in a fresh temp dir, run ``drorebel train`` in-process, classify."""
    from drorebel.cli import main

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        err, out = io.StringIO(), io.StringIO()
        old_env = {k: os.environ.get(k) for k in case.env}
        os.environ.update(case.env)
        try:
            argv = case.setup(tmp)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(["train", *argv])
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - a traceback is the finding
            return Outcome(case.name, case.group, "traceback",
                           f"{type(exc).__name__}: {str(exc)[:160]}", time.perf_counter() - t0)
        finally:
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        verdict, detail = _classify(case, rc, err.getvalue(), tmp)
    return Outcome(case.name, case.group, verdict, detail, time.perf_counter() - t0)


def _classify(case: Case, rc: int, stderr: str, tmp: str) -> tuple[str, str]:
    lines = [ln for ln in stderr.splitlines() if _ERROR_LINE.match(ln)]
    if "Traceback" in stderr:
        return "traceback", stderr.strip().splitlines()[-1][:160]
    if case.expect == "error":
        if rc == 2 and len(lines) == 1:
            missing = [n for n in case.names if n not in lines[0]]
            if not missing:
                return "clear error", lines[0][:200]
            return "wrong", f"message lacks {missing}: {lines[0][:160]}"
        return "wrong", f"expected an error, got exit {rc}"
    if rc != 0:
        return "wrong", f"expected a run, got exit {rc}: {(lines or [''])[0][:160]}"
    if case.check is not None and not case.check(tmp):
        return "wrong", "the run finished but its check failed"
    return "correct run", ""


def kill_case(tmp: str, save_kill: bool) -> Outcome:
    """SIGKILL a training subprocess (half-way through writing a checkpoint, or at a random
    point between steps) and resume with ``resume=auto``: the resumed run must equal an
    uninterrupted one bit for bit."""
    t0 = time.perf_counter()
    name = "SIGKILL while writing a checkpoint" if save_kill else "SIGKILL during training"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))
    steps = 4 if save_kill else 30
    killed = _args(tmp, max_steps=steps, save_steps=1, output_dir=os.path.join(tmp, "killed"))
    cli = [sys.executable, "-m", "drorebel.cli", "train"]
    if save_kill:  # the test hook kills the process inside save_checkpoint of step 2
        subprocess.run(cli + killed, env={**env, "DROREBEL_TEST_KILL_DURING_SAVE": "2"},
                       capture_output=True, timeout=600)
    else:
        proc = subprocess.Popen(cli + killed, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        marker = os.path.join(tmp, "killed", "checkpoint-3")
        while proc.poll() is None and not os.path.exists(marker):
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere in the steps after checkpoint-3
        proc.kill()
        proc.wait()
    r = subprocess.run(cli + killed + ["resume=auto"], env=env, capture_output=True, text=True,
                       timeout=600)
    ref = _args(tmp, max_steps=steps, save_steps=1, output_dir=os.path.join(tmp, "ref"))
    subprocess.run(cli + ref, env=env, capture_output=True, timeout=600)
    same = _same_final(os.path.join(tmp, "killed"), os.path.join(tmp, "ref"))
    verdict = "correct run" if r.returncode == 0 and same else "wrong"
    detail = "resumed run equals the uninterrupted one" if same else \
        f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:] if r.stderr else ''}"
    return Outcome(name, "kill", verdict, detail, time.perf_counter() - t0)


def _same_final(a: str, b: str) -> bool:
    from safetensors.torch import load_file

    fa = os.path.join(a, "final", "model.safetensors")
    fb = os.path.join(b, "final", "model.safetensors")
    if not (os.path.exists(fa) and os.path.exists(fb)):
        return False
    x, y = load_file(fa), load_file(fb)
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


def run_all(only: str = "", kills: bool = True) -> list[Outcome]:
    outcomes = [run_case(c) for c in catalogue() if only in c.name]
    if kills and (not only or "SIGKILL" in only):
        for save_kill in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                outcomes.append(kill_case(tmp, save_kill))
    return outcomes


def summary(outcomes: list[Outcome]) -> dict[str, int]:
    counts = {"cases": len(outcomes)}
    for v in ("clear error", "correct run", "traceback", "wrong"):
        counts[v] = sum(o.verdict == v for o in outcomes)
    counts["kills survived"] = sum(o.group == "kill" and o.verdict == "correct run"
                                   for o in outcomes)
    return counts


def to_markdown(outcomes: list[Outcome]) -> str:
    s = summary(outcomes)
    head = (f"{s['cases']} cases: {s['clear error']} clear errors, {s['correct run']} correct "
            f"runs ({s['kills survived']} after a SIGKILL), {s['traceback']} tracebacks, "
            f"{s['wrong']} wrong.\n\n")
    rows = ["| group | case | verdict | message / detail |", "|---|---|---|---|"]
    rows += [f"| {o.group} | {o.case} | {o.verdict} | {o.detail.replace('|', '/')} |"
             for o in outcomes]
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write reliability.md / .json here")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--no-kills", action="store_true", help="skip the SIGKILL subprocess cases")
    args = ap.parse_args(argv)
    outcomes = run_all(args.only, kills=not args.no_kills)
    text = to_markdown(outcomes)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "reliability.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, "reliability.json"), "w") as f:
            json.dump({"summary": summary(outcomes), "cases": [o.__dict__ for o in outcomes]},
                      f, indent=1)
    bad = summary(outcomes)
    return 0 if bad["traceback"] == 0 and bad["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
