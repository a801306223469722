"""Shared test setup: the Triton CPU interpreter and a device fixture.

``TRITON_INTERPRET=1`` must be in the environment before triton builds any kernel (the
``@triton.jit`` decorator reads it), so it is set here, at conftest import, when no CUDA
device is present.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """CUDA when available, else the CPU (Triton then runs in the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator: tests draw inputs on the CPU, then move them."""
    return torch.Generator().manual_seed(1234)
