"""The attack catalogue of ``bench/reliability.py``: every bad input is a clear error (exit 2,
one line naming the file/line, row/field or setting) or a correct run; no traceback, no
silent change, no lost file of another run, and runs killed with SIGKILL resume exactly."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "reliability.py")
_spec = importlib.util.spec_from_file_location("drorebel_reliability", _PATH)
reliability = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = reliability  # dataclasses look their module up there
_spec.loader.exec_module(reliability)

CASES = reliability.catalogue()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_attack_case(case):
    outcome = reliability.run_case(case)
    want = "clear error" if case.expect == "error" else "correct run"
    assert outcome.verdict == want, outcome.detail


@pytest.mark.slow
@pytest.mark.parametrize("save_kill", [True, False], ids=["during-save", "during-training"])
def test_sigkill_then_resume_is_exact(save_kill):
    with tempfile.TemporaryDirectory() as tmp:
        outcome = reliability.kill_case(tmp, save_kill)
    assert outcome.verdict == "correct run", outcome.detail


def test_every_group_is_covered():
    groups = {c.group for c in CASES}
    assert {"data", "config", "run"} <= groups and len(CASES) >= 50
