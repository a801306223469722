"""The attack catalogue of ``bench/reliability.py``: every bad input is a clear error (exit 2,
one line naming the file/line, row/field or setting) or a correct run; no traceback, no
silent change, no lost file of another run, and runs killed with SIGKILL resume exactly."""

from __future__ import annotations

import tempfile

import pytest
from load_path import load_bench

reliability = load_bench("reliability", "drorebel_reliability")

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
