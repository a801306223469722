"""The training step at the largest micro-batch each loss path fits under one memory cap.

At equal micro-batch (bench/test_bench_train_step.py) a fused head saves memory but may not
be faster; what a user gains is a larger micro-batch in the same memory. This suite answers
"under a cap of C bytes, how many pairs fit in one step, and how many tokens/s does that give?"

For each provider (the same step as test_bench_train_step.py: model forward → loss from the
hidden states and the LM head → backward → AdamW; gradient checkpointing on, as a user who
maximises the micro-batch would run it):

1. one warm-up step at B=1 creates the AdamW state; ``static`` = parameters + AdamW state;
2. the peak extra memory of a step is measured at B=1 and B=2 (bench/memory.py); a step's
   memory is affine in B, so ``B* = ⌊(C − static − peak(1)) / (peak(2) − peak(1))⌋ + 1``;
3. B* is verified: a step at B that needs more than C (or, on CUDA, raises out-of-memory
   under ``torch.cuda.set_per_process_memory_fraction(C / total)``) does not fit; the
   prediction and the pair above are probed, and a bisection between the known bounds takes
   over when they disagree, until B fits and B + 1 does not, or ``B_max``;
4. the step at B* is timed (median of the rounds) → tokens/s = 2·B*·T / median.

``DROREBEL_BENCH_MAX_BATCH="T,V,dtype,cap_GiB[,B_max]"`` sets the shape and cap; the device
picks a default (CUDA: Llama-3.2-1B geometry, T=2048, V=128256, bf16, 48 GiB; CPU: the small
Llama of the train-step suite, T=128, V=32000, fp32, 0.5 GiB). report.py prints the pairs,
tokens/s and their ratios against the materialised path of the same run.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


def _load_train_step():
    """bench/test_bench_train_step.py by path (bench/ is not a package)."""
    name = "drorebel_bench_train_step"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).with_name("test_bench_train_step.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ts = _load_train_step()
GIB = 2**30
# the baseline first: a stage deadline that skips the tail keeps the ratios' denominator
PROVIDERS = ["materialised-chi2", "drorebel-fused-chi2", "liger-dpo"]


@dataclass(frozen=True)
class CapSpec:
    """Sequence length, vocabulary, dtype, memory cap (bytes) and the largest B tried."""

    t: int
    v: int
    dtype_name: str
    cap_bytes: int
    b_max: int = 256

    def shape(self, pairs: int) -> ts.TrainShape:
        return ts.TrainShape(pairs, self.t, self.v, self.dtype_name)

    @property
    def id(self) -> str:
        return f"T{self.t}-V{self.v}-{self.dtype_name}-cap{self.cap_bytes / GIB:g}GiB"


CUDA_CAP = CapSpec(2048, 128256, "bf16", 48 * GIB)
CPU_CAP = CapSpec(128, 32000, "fp32", GIB // 2, 16)


def cap_spec() -> CapSpec:
    """``$DROREBEL_BENCH_MAX_BATCH`` or the device's default."""
    spec = os.environ.get("DROREBEL_BENCH_MAX_BATCH")
    if not spec:
        return CUDA_CAP if ts._device_type() == "cuda" else CPU_CAP
    parts = [x.strip() for x in spec.split(",")]
    if len(parts) not in (4, 5) or parts[2] not in ts._DTYPES:
        raise ValueError(f"DROREBEL_BENCH_MAX_BATCH={spec!r}: expected "
                         f"'T,V,dtype,cap_GiB[,B_max]' with dtype in {list(ts._DTYPES)}")
    b_max = int(parts[4]) if len(parts) == 5 else 256
    return CapSpec(int(parts[0]), int(parts[1]), parts[2], int(float(parts[3]) * GIB), b_max)


@dataclass
class Probe:
    """One measured step: B pairs, the step's peak extra bytes (None: out of memory)."""

    pairs: int
    peak_bytes: int | None

    def fits(self, static: int, cap: int) -> bool:
        return self.peak_bytes is not None and static + self.peak_bytes <= cap


def predict_pairs(static: int, cap: int, p1: Probe, p2: Probe) -> int:
    """B* from two probes of an affine memory model ``peak(B) = peak(1) + (B − 1)·slope``:
    the largest B with ``static + peak(B) ≤ cap`` (0 when B=1 does not fit; a very large
    number when the memory does not grow with B)."""
    if not p1.fits(static, cap):
        return 0
    if not p2.fits(static, cap):
        return 1
    slope = p2.peak_bytes - p1.peak_bytes
    if slope <= 0:
        return sys.maxsize
    return 1 + (cap - static - p1.peak_bytes) // slope


def largest_fitting(measure: Callable[[int], Probe], static: int, cap: int, b_max: int
                    ) -> tuple[int, list[Probe]]:
    """The largest ``B ≤ b_max`` whose step fits under ``cap`` and the probes taken.

    ``measure(B)`` runs one step at B pairs. The affine prediction from B=1 and B=2 is probed
    first, then the pair above the largest fitting B: when memory is affine in B that settles
    it (four probes in all). Otherwise a bisection between the largest B known to fit and
    the smallest known not to (allocator rounding, chunk sizes that change with B, an
    out-of-memory error) still returns a verified boundary: B fits and B + 1 does not, or
    B = ``b_max``.
    """
    probes = {1: measure(1)}
    if not probes[1].fits(static, cap):
        return 0, list(probes.values())
    if b_max == 1:
        return 1, list(probes.values())
    probes[2] = measure(2)

    def fits(k: int) -> bool:
        if k not in probes:
            probes[k] = measure(k)
        return probes[k].fits(static, cap)

    lo, hi = (2, b_max + 1) if fits(2) else (1, 2)  # lo fits; hi does not (or is past b_max)
    guess = min(hi - 1, predict_pairs(static, cap, probes[1], probes[2]))
    if guess > lo:
        lo, hi = (guess, hi) if fits(guess) else (lo, guess)
    if lo + 1 < hi:
        lo, hi = (lo + 1, hi) if fits(lo + 1) else (lo, lo + 1)
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, sorted(probes.values(), key=lambda p: p.pairs)


class CapRunner:
    """One provider's steps at any B on a shared model, with the cap enforced on CUDA."""

    def __init__(self, model: torch.nn.Module, provider: str, cap: CapSpec,
                 device: torch.device, measure: Callable) -> None:
        self.model, self.provider, self.cap, self.device = model, provider, cap, device
        self.measure = measure  # bench/memory.py's measure_peak_memory(fn, device)
        self.loss_fn = ts.get_loss(provider, device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=ts.LR, weight_decay=0.0,
                                     fused=device.type == "cuda")
        self._batches: dict[int, dict] = {}

    def step(self, pairs: int) -> ts.TrainStep:
        if pairs not in self._batches:
            self._batches = {pairs: ts.make_batch(self.model, self.cap.shape(pairs),
                                                  self.device)}
        return ts.TrainStep(self.model, self.opt, self.loss_fn, self._batches[pairs])

    def static_bytes(self) -> int:
        """Parameters + AdamW state, after one step at B=1 created the state."""
        first = self.step(1)
        first.setup()
        first.step()
        first.setup()
        return first.static_bytes()

    def probe(self, pairs: int) -> Probe:
        """One measured step at ``pairs`` (an out-of-memory error anywhere, the batch's own
        reference forward included, means "does not fit")."""
        step = None
        try:
            step = self.step(pairs)
            step.setup()
            stats = self.measure(step.step, self.device)
        except torch.cuda.OutOfMemoryError:
            return Probe(pairs, None)
        finally:
            if step is not None:
                step.setup()
            self._empty_cache()
        return Probe(pairs, stats.peak_bytes)

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def release(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.opt.state.clear()
        self._batches.clear()
        self._empty_cache()


class _CudaCap:
    """``torch.cuda.set_per_process_memory_fraction`` to the cap while the search runs."""

    def __init__(self, device: torch.device, cap: int) -> None:
        self.device, self.cap = device, cap

    def __enter__(self) -> None:
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.cap / total), self.device)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)


_MODEL: dict[tuple, torch.nn.Module] = {}


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation (gradient) checkpointing of the decoder layers, under either of the names
    transformers has used."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()


def checkpointed_model(spec: ts.ModelSpec, cap: CapSpec, device: torch.device
                       ) -> torch.nn.Module:
    """The suite's model (one per session), gradient checkpointing on."""
    key = (spec, cap.v, cap.dtype_name, device.type)
    if key not in _MODEL:
        _MODEL.clear()
        model = ts.build_model(spec, cap.v, ts._DTYPES[cap.dtype_name], device)
        enable_checkpointing(model)
        _MODEL[key] = model.train()
    return _MODEL[key]


def search(runner: CapRunner) -> tuple[int, int, list[Probe]]:
    """``(B*, static bytes, probes)`` of one provider."""
    with _CudaCap(runner.device, runner.cap.cap_bytes):
        static = runner.static_bytes()
        b, probes = largest_fitting(runner.probe, static, runner.cap.cap_bytes,
                                    runner.cap.b_max)
    return b, static, probes


def _rounds() -> tuple[int, int]:
    """``$DROREBEL_BENCH_ROUNDS`` or 3 timed rounds after 1 warm-up (steps at B* are long)."""
    custom = os.environ.get("DROREBEL_BENCH_ROUNDS")
    if custom:
        rounds, warmup = (int(x) for x in custom.split(","))
        return rounds, warmup
    return (3, 1)


def max_batch_info(cap: CapSpec, spec: ts.ModelSpec, provider: str, pairs: int, static: int,
                   probes: list[Probe], median_s: float | None) -> dict:
    """The ``extra_info`` of one result (report.py's "largest micro-batch" table)."""
    peak = next((p.peak_bytes for p in probes if p.pairs == pairs), None)
    n = 2 * pairs * cap.t
    return dict(
        bench="train-step", mode="max-batch", provider=provider, pairs=pairs, t=cap.t, n=n,
        h=spec.h, v=cap.v, dtype=cap.dtype_name, model=spec.id, cap_bytes=cap.cap_bytes,
        static_mem_bytes=static, peak_mem_bytes=peak, checkpointing=True, b_max=cap.b_max,
        probes=[[p.pairs, p.peak_bytes] for p in probes],
        tokens_per_s=(n / median_s) if median_s else None,
    )


@pytest.mark.parametrize("provider", PROVIDERS)
def test_largest_micro_batch(benchmark, measure_memory, provider, device, env_info) -> None:
    cap, spec = cap_spec(), ts.model_spec()
    runner = CapRunner(checkpointed_model(spec, cap, device), provider, cap, device,
                       measure_memory)
    benchmark.group = f"max-batch {spec.id} {cap.id}"
    try:
        start = time.perf_counter()
        pairs, static, probes = search(runner)
        if pairs == 0:
            pytest.fail(f"{provider}: one pair does not fit under {cap.id} "
                        f"(static {static / GIB:.2f} GiB, probes {probes})")
        step = runner.step(pairs)
        n_rounds, warmup = _rounds()
        with _CudaCap(device, cap.cap_bytes):
            benchmark.pedantic(step.step, setup=step.setup, rounds=n_rounds,
                               warmup_rounds=warmup, iterations=1)
        assert step.last_loss is not None and math.isfinite(float(step.last_loss))
        stats = getattr(benchmark, "stats", None)
        median = stats.stats.median if stats is not None else None
        benchmark.extra_info.update(**max_batch_info(cap, spec, provider, pairs, static, probes,
                                                     median), **env_info,
                                    search_s=time.perf_counter() - start)
        print(f"{provider}: B*={pairs} under {cap.id} (probes "
              f"{[(p.pairs, p.peak_bytes) for p in probes]})", flush=True)
    finally:
        runner.release()
