"""The prepared GPU run stays runnable: bench/run_gpu.sh parses, and its `drorebel train`
stage (bench/gpu_train_check.py) passes its CPU form — 20 steps, stop at 10, resume, the resumed
steps equal the uninterrupted run's bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_run_gpu_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "run_gpu.sh")], check=True)


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
