"""Fused (DRO-)REBEL loss, 2 ranks (torchrun, gloo, CPU) == 1 process on the union batch.

Loss, weights, metrics, the LM-head gradient (averaged over ranks, as DDP/ZeRO do) and the
hidden-state gradients, for none / χ² / KL (radius and temperature), functional and stacked
module forms. float64, so only the summation order differs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from launch import torchrun_report

WORKER = Path(__file__).parent / "dist_workers" / "fused_worker.py"
TOL = 1e-11
MODES = ["none", "chi2", "kl_rho", "kl_tau"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("fused_dist") / "report.json"
    return torchrun_report(WORKER, out)


@pytest.mark.slow
@pytest.mark.timeout(360)
@pytest.mark.parametrize("form", ["functional", "module"])
@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_equal_one_process(report: dict, mode: str, form: str) -> None:
    assert report["world"] == 2
    res = report[f"{mode}/{form}"]
    assert res["grad_scale"] > 1e-3  # the gradient comparisons are not vacuous
    assert any(k.startswith("metric:") for k in res)
    for key, diff in res.items():
        if key in ("grad_scale", "local_only_weights", "weight_max"):
            continue
        assert diff <= TOL, (mode, form, key, diff)
    if mode != "none":  # per-rank weights would differ: the comparison can tell them apart
        assert res["local_only_weights"] > 1e-3
        assert res["weight_max"] < 0.9  # and the robust weights are not degenerate
