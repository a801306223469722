"""Packaging guarantees: kernels/ is only importable as drorebel.kernels."""

from __future__ import annotations

import subprocess
import sys
import tempfile


def _run(code: str) -> str:
    # run from a neutral directory so that the repository root is not on sys.path
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, check=True
        )
    return out.stdout.strip()


def test_no_top_level_kernels_module_of_ours() -> None:
    code = (
        "import importlib.util, os\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print('none' if spec is None else (spec.origin or 'namespace'))\n"
    )
    origin = _run(code)
    # either absent, or the Hugging Face `kernels` package: never our kernels/ folder
    assert origin == "none" or "site-packages" in origin, origin


def test_kernels_installed_under_drorebel() -> None:
    origin = _run("import drorebel.kernels as k; print(k.__file__)")
    assert origin.replace("\\", "/").endswith("kernels/__init__.py")
