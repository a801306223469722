"""Import a repository script by path: bench/ and examples/ are not packages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_module(path: str | Path, name: str) -> ModuleType:
    """Execute ``path`` as module ``name``, registered in ``sys.modules`` first (dataclasses
    and pickling look a module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_bench(name: str, module: str | None = None) -> ModuleType:
    """``bench/<name>.py`` as ``module`` (default ``drorebel_bench_<name>``)."""
    return load_module(ROOT / "bench" / f"{name}.py", module or f"drorebel_bench_{name}")
