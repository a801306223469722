"""Launching multi-process test runs (torchrun / deepspeed on CPU, gloo) from the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

#: the venv's bin folder (torchrun / deepspeed scripts); CI calls .venv/bin/pytest without
#: the venv on PATH
BIN = Path(sys.executable).parent


def launch_env() -> dict[str, str]:
    """One thread per rank, this interpreter's import path and the venv's scripts on PATH."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}


def launch(cmd: list[str], cwd: str | Path | None = None, timeout: int = 300) -> None:
    """Run ``cmd``; a non-zero exit fails the test with the tail of its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=launch_env(), cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def torchrun_report(worker: Path, out: Path, timeout: int = 300) -> dict:
    """``torchrun --standalone --nproc_per_node 2 worker out``; returns the JSON it wrote."""
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", str(worker), str(out)], timeout=timeout)
    return json.loads(out.read_text())
