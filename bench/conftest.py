"""Shared fixtures of the benchmark suites: device, device-dependent shape grid, memory probe.

Run (``--benchmark-enable`` is needed because pyproject's addopts disables benchmarks, and
pytest-benchmark refuses ``--benchmark-only`` together with ``--benchmark-disable``)::

    pytest bench/ --benchmark-enable --benchmark-only --benchmark-json=results.json

Environment knobs:

* ``DROREBEL_BENCH_DEVICE``   ``cpu`` / ``cuda`` (default: CUDA when available)
* ``DROREBEL_BENCH_SHAPES``   ``"N,H,V,dtype;N,H,V,dtype"`` replaces the default grid
* ``DROREBEL_BENCH_ROUNDS``   ``"rounds,warmup"`` replaces the default rounds
* ``DROREBEL_BENCH_DEADLINE`` Unix time after which benchmarks that have not started yet are
  skipped, so that a time-boxed run (bench/run_gpu.sh) ends by itself and still writes its JSON
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _load_local(name: str) -> Any:
    """Import ``bench/<name>.py`` by path (bench/ is not a package; ``memory`` is too generic)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"drorebel_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


memory = _load_local("memory")


@dataclass(frozen=True)
class BenchShape:
    """One point of the grid: N tokens, hidden size H, vocabulary V, input dtype."""

    n: int
    h: int
    v: int
    dtype_name: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype_name]

    @property
    def id(self) -> str:
        return f"N{self.n}-H{self.h}-V{self.v}-{self.dtype_name}"


# CPU: what CI can measure (N=4096, H=256, V=32000 is the docs/design.md §4 CPU target shape)
CPU_SHAPES = [BenchShape(1024, 256, 32000, "fp32"), BenchShape(4096, 256, 32000, "fp32")]
# CUDA: the Llama-3-8B head (docs/design.md §4 reference shape) and two smaller ones
CUDA_SHAPES = [
    BenchShape(4096, 4096, 128256, "bf16"),
    BenchShape(8192, 4096, 32000, "bf16"),
    BenchShape(16384, 4096, 128256, "bf16"),
]
CPU_ROUNDS = (3, 1)  # (rounds, warmup rounds)
CUDA_ROUNDS = (10, 2)


def bench_device() -> torch.device:
    """The device benchmarked: ``$DROREBEL_BENCH_DEVICE`` or CUDA when available."""
    name = os.environ.get("DROREBEL_BENCH_DEVICE") or (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    return torch.device(name)


def _parse_shapes(spec: str) -> list[BenchShape]:
    shapes = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        n, h, v, dtype = (x.strip() for x in item.split(","))
        if dtype not in _DTYPES:
            raise ValueError(
                f"unknown dtype {dtype!r} in DROREBEL_BENCH_SHAPES; use {list(_DTYPES)}"
            )
        shapes.append(BenchShape(int(n), int(h), int(v), dtype))
    return shapes


def bench_shapes(device: torch.device) -> list[BenchShape]:
    """The shape grid for ``device`` (``$DROREBEL_BENCH_SHAPES`` overrides it)."""
    spec = os.environ.get("DROREBEL_BENCH_SHAPES")
    if spec:
        return _parse_shapes(spec)
    return CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES


def bench_rounds(device: torch.device) -> tuple[int, int]:
    """``(rounds, warmup_rounds)`` for ``benchmark.pedantic``."""
    spec = os.environ.get("DROREBEL_BENCH_ROUNDS")
    if spec:
        rounds, warmup = (int(x) for x in spec.split(","))
        return rounds, warmup
    return CUDA_ROUNDS if device.type == "cuda" else CPU_ROUNDS


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise every test that asks for ``shape`` over the grid of the benchmarked device."""
    if "shape" in metafunc.fixturenames:
        # the parameter is the id string (JSON-serialisable in the results); `shape` parses it
        ids = [s.id for s in bench_shapes(bench_device())]
        metafunc.parametrize("shape", ids, ids=ids, indirect=True)


def parse_shape_id(shape_id: str) -> BenchShape:
    """Inverse of ``BenchShape.id``: ``"N4096-H256-V32000-fp32"`` -> ``BenchShape``."""
    n, h, v, dtype = shape_id.split("-")
    return BenchShape(int(n[1:]), int(h[1:]), int(v[1:]), dtype)


@pytest.fixture
def shape(request: pytest.FixtureRequest) -> BenchShape:
    return parse_shape_id(request.param)


def device_name(device: torch.device) -> str:
    """Human-readable accelerator name (CPU: the processor model when /proc/cpuinfo has it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    """Library versions recorded with every result."""
    out = {"torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - triton ships with torch on Linux
        out["triton"] = "n/a"
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Add the benchmarked device and library versions to the JSON's machine_info."""
    device = bench_device()
    machine_info["bench_device"] = device.type
    machine_info["bench_device_name"] = device_name(device)
    machine_info.update(versions())


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def rounds(device: torch.device) -> tuple[int, int]:
    return bench_rounds(device)


@pytest.fixture(scope="session")
def env_info(device: torch.device) -> dict[str, str]:
    """Device type and name plus library versions, stored in every result's extra_info."""
    return {"device": device.type, "device_name": device_name(device), **versions()}


@pytest.fixture(scope="session")
def measure_memory() -> Callable[..., Any]:
    """``measure_memory(fn, device) -> MemoryStats`` from bench/memory.py."""
    return memory.measure_peak_memory


@pytest.fixture(autouse=True)
def _stage_deadline() -> None:
    """Skip a benchmark that would start after ``$DROREBEL_BENCH_DEADLINE`` (Unix seconds)."""
    deadline = os.environ.get("DROREBEL_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("DROREBEL_BENCH_DEADLINE passed: stage time budget spent")


@pytest.fixture(autouse=True)
def _release_memory(device: torch.device) -> Iterator[None]:
    """Free what a benchmark left behind so that the next one starts from the same state."""
    yield
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
