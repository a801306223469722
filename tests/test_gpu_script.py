"""The prepared GPU run stays runnable: bench/run_gpu.sh parses, and its `drorebel train`
stage (bench/gpu_train_check.py) passes its CPU form — 20 steps, stop at 10, resume, the resumed
steps equal the uninterrupted run's bit for bit; gpu_check.py's sequence-epilogue and Wasserstein
cases pass in the Triton interpreter, and gpu_profile.py writes its categories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_run_gpu_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "run_gpu.sh")], check=True)


def test_cuda_stage_limits_fit_the_budget():
    # every required stage of the CUDA branch gets its full limit inside the 450 s budget
    # after ~30 s of set-up (a GPU loan is 15 minutes, one command at most 8)
    import re

    text = (ROOT / "bench" / "run_gpu.sh").read_text()
    cuda = text.split('if [ "$HAS_CUDA" = 1 ]; then', 1)[1].split("\nelse\n", 1)[0]
    limits = [int(x) for x in re.findall(r"^\s*\w+_LIMIT=(\d+)", cuda, re.M)]
    limits += [int(x) for x in re.findall(r':(\d+)"', cuda)]  # "shapes:limit_s" groups
    # gpu_check, train_check, profile, rebel loss, Wasserstein, max batch, linear, train step
    assert len(limits) >= 8, limits
    report = int(re.search(r"run_stage report (\d+)", text).group(1))
    budget = int(re.search(r"RUN_GPU_BUDGET_S:-(\d+)", text).group(1))
    assert budget <= 450
    assert 30 + sum(limits) + report <= budget, (limits, report)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_train_check_stop_and_resume_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train_check.py"), "--out",
                           str(tmp_path), "--small"], capture_output=True, text=True,
                          timeout=380)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "train_check.json").read_text())
    assert report["ok"] is True and report["cuda"] is False
    assert report["max_rel_diff_11_20"] == 0.0
    full, resumed = report["losses_full"], report["losses_resumed"]
    assert sorted(map(int, full)) == list(range(1, 21))
    assert all(full[k] == resumed[k] for k in full)


@pytest.mark.timeout(120)
def test_gpu_check_new_kernel_cases_on_cpu(tmp_path):
    """gpu_check.py's per-sequence epilogue and Wasserstein penalty cases, Triton in the
    interpreter, tiny shapes: every record passes the tolerance rule, in under 60 s."""
    out = tmp_path / "check.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--small",
                           "--only", "sequence,wasserstein", "--out", str(out)],
                          capture_output=True, text=True, timeout=110, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - start < 60
    report = json.loads(out.read_text())
    assert report["all_pass"] is True
    cases = report["cases"]
    assert {c["kind"] for c in cases} == {"sequence", "wasserstein"}
    assert len(cases) == 3 and all(c["pass"] and c["impl"] == "triton" for c in cases)
    names = {tuple(c["tensors"]) for c in cases}
    assert names == {("sums", "dH", "dW"), ("logp", "q", "dH", "dW"),
                     ("value", "dW", "dHa", "dHb")}


@pytest.mark.timeout(120)
def test_gpu_profile_small_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_profile.py"), "--small",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    cats = report["categories"]
    assert list(cats) == ["triton_forward", "triton_backward", "gemm", "other"]
    assert all({"ms", "pct", "kernels"} <= set(c) for c in cats.values())
    assert report["total_ms"] > 0 and cats["gemm"]["ms"] > 0  # impl torch: aten::mm
    assert abs(sum(c["pct"] for c in cats.values()) - 100.0) < 1e-6
    assert "triton_forward" in proc.stdout
