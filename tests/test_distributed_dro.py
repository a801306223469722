"""2 ranks (torchrun, gloo, CPU) == 1 process on the union batch, for none / χ² / KL, per pair
and over groups."""

from __future__ import annotations

from pathlib import Path

import pytest
from launch import torchrun_report

WORKER = Path(__file__).parent / "dist_workers" / "dro_worker.py"
TOL = 1e-12  # float64 throughout: only summation order differs


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("dist") / "report.json"
    return torchrun_report(WORKER, out)


@pytest.mark.slow
@pytest.mark.timeout(360)
@pytest.mark.parametrize("mode", ["none", "chi2", "kl_rho", "kl_tau", "group_chi2", "group_kl"])
def test_two_ranks_equal_one_process(report: dict, mode: str) -> None:
    assert report["world"] == 2
    res = report[mode]
    assert res["metric_keys_equal"] == 1.0
    assert res["grad_scale"] > 1e-3  # the gradient comparison is not vacuous
    for key, diff in res.items():
        if key in ("grad_scale", "metric_keys_equal", "local_only_weights"):
            continue
        assert diff <= TOL, (mode, key, diff)
    if mode != "none":  # per-rank weights would differ: the comparison can tell
        assert res["local_only_weights"] > 1e-3


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_objectives_and_size_check(report: dict) -> None:
    for key, diff in report["objectives"].items():
        assert diff <= TOL, (key, diff)
    assert "equal local batch sizes" in report["unequal_sizes"]
    assert "[4, 3]" in report["unequal_sizes"]
