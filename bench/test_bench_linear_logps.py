"""Benchmarks of ``linear_logps`` (per-token log-probs from hidden states and the LM head).

    logp_t = log softmax(W h_t / T)[y_t]          (docs/design.md §1; REBEL, arXiv 2404.16767)

Providers (the same maths, different implementations):

* ``drorebel-fused``      ``linear_logps(impl="triton")``: fused Triton kernels (CUDA only)
* ``drorebel-chunked``    ``linear_logps(impl="torch")``: chunked PyTorch path
* ``torch-materialised``  ``linear_logps_reference``: full (N x V) logits, eager
* ``torch-compile``       the reference under ``torch.compile`` (``dynamic=False``: one
                          compile per shape, ~10-15 s on 2 CPU cores; skip it on CPU with
                          ``DROREBEL_BENCH_COMPILE_CPU=0``)
* ``liger``               Liger-Kernel's fused linear cross entropy, ``reduction="none"``,
                          negated (it returns CE = -logp); CUDA only
* ``drorebel-fused-cache``, ``drorebel-chunked-cache``: the two drorebel providers with a
                          softmax cache of every row (``softmax_cache=`` a budget above N·V
                          values): the backward skips the logit recompute, three N·H·V GEMMs
                          instead of four, for N·V cached probabilities (bf16 for bf16
                          inputs, fp32 otherwise). Listed last, so that a time-boxed GPU
                          stage measures the providers above first.

Modes: ``fwd`` (a training forward: inputs require grad, so autograd state is saved) and
``fwdbwd`` (forward + ``backward(g)`` with a fixed random upstream gradient g). Timings are
wall-clock with CUDA synchronisation inside the timed function. Peak memory is measured in
one extra, untimed run (bench/memory.py: CUDA allocator counters; on CPU the profiler's
allocator events): bytes allocated beyond the inputs, outputs and gradients included.
FLOP counts: 2·N·H·V for fwd, 6·N·H·V for fwd+bwd (the LM-head matmuls only).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

BenchShape = Any  # conftest.BenchShape: .n .h .v .dtype .dtype_name .id
Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
PROVIDERS = ["drorebel-fused", "drorebel-chunked", "torch-materialised", "torch-compile", "liger",
             "drorebel-fused-cache", "drorebel-chunked-cache"]
CACHE_ALL = 2**62  # a softmax-cache budget in bytes that holds every row of any shape here
MODES = ["fwd", "fwdbwd"]


def _require_cuda(device: torch.device, provider: str) -> None:
    if device.type != "cuda":
        pytest.skip(f"{provider} runs on CUDA only")


def _ours(impl: str, softmax_cache: int = 0) -> Fn:
    from drorebel.ops.linear_logps import linear_logps

    return functools.partial(linear_logps, impl=impl, softmax_cache=softmax_cache)


def _reference() -> Fn:
    from drorebel.reference.logps import linear_logps_reference

    return linear_logps_reference


@functools.cache
def _compiled_reference() -> Fn:
    # one compiled object per process: a new shape recompiles, fwd and fwdbwd share a graph
    return torch.compile(_reference(), dynamic=False)


def _liger() -> Fn:
    """Liger's fused linear CE per token; the autograd Function, not the functional wrapper,
    because ``liger_kernel.transformers`` imports transformers (version-sensitive)."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction as Flce,
        )
    except Exception as exc:  # an external baseline: a broken install skips, never fails
        pytest.skip(f"liger-kernel not importable: {type(exc).__name__}: {exc}")

    def logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
        #  label_smoothing, reduction, softcap, return_z_loss, accum_dtype, use_token_scaling,
        #  return_token_accuracy, return_predicted_tokens[, ce_impl, ce_mode, chunk_mem_const])
        args = (hidden, weight, labels, None, None, -100, 0.0, 0.0, "none", None, False, None)
        args += (False, False, False)
        if getattr(Flce, "supports_inner_impl_dispatch", False):
            args += (None, None, 1)
        return -Flce.apply(*args)[0]

    return logps


def get_provider(name: str, device: torch.device) -> Fn:
    """The callable ``(hidden, weight, labels) -> logp[N]`` of a provider, or skip."""
    if name == "drorebel-fused":
        _require_cuda(device, name)
        return _ours("triton")
    if name == "drorebel-chunked":
        return _ours("torch")
    if name == "drorebel-fused-cache":
        _require_cuda(device, name)
        return _ours("triton", CACHE_ALL)
    if name == "drorebel-chunked-cache":
        return _ours("torch", CACHE_ALL)
    if name == "torch-materialised":
        return _reference()
    if name == "torch-compile":
        if device.type != "cuda" and os.environ.get("DROREBEL_BENCH_COMPILE_CPU") == "0":
            pytest.skip("torch.compile on CPU switched off (DROREBEL_BENCH_COMPILE_CPU=0)")
        return _compiled_reference()
    if name == "liger":
        _require_cuda(device, name)
        return _liger()
    raise ValueError(f"unknown provider {name!r}")


def make_inputs(shape: BenchShape, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hidden states (N, H), LM head (V, H) scaled so logits are O(1), labels, upstream grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(shape.n, shape.h, generator=gen, device=device).to(shape.dtype)
    weight = torch.randn(shape.v, shape.h, generator=gen, device=device) * shape.h**-0.5
    labels = torch.randint(0, shape.v, (shape.n,), generator=gen, device=device)
    grad = torch.randn(shape.n, generator=gen, device=device)
    return {
        "hidden": hidden.requires_grad_(),
        "weight": weight.to(shape.dtype).requires_grad_(),
        "labels": labels,
        "grad": grad,
    }


def make_step(fn: Fn, inputs: dict[str, torch.Tensor], mode: str, device: torch.device):
    """The timed function (returns nothing, so no graph outlives a round) and its setup."""
    h, w, y, g = inputs["hidden"], inputs["weight"], inputs["labels"], inputs["grad"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def setup() -> None:
        h.grad = None
        w.grad = None
        sync()

    def step() -> None:
        out = fn(h, w, y)
        if mode == "fwdbwd":
            out.backward(g)
        sync()

    return step, setup


def _flop(shape: BenchShape, mode: str) -> int:
    return (6 if mode == "fwdbwd" else 2) * shape.n * shape.h * shape.v


def _record(benchmark, shape: BenchShape, provider: str, mode: str, env: dict, mem) -> None:
    info = benchmark.extra_info
    info.update(provider=provider, mode=mode, n=shape.n, h=shape.h, v=shape.v)
    info.update(dtype=shape.dtype_name, **env)
    info["flop"] = _flop(shape, mode)
    info["peak_mem_bytes"] = None if mem is None else mem.peak_bytes
    info["retained_mem_bytes"] = None if mem is None else mem.retained_bytes
    info["mem_method"] = None if mem is None else mem.method
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None when benchmarks are disabled (smoke-test run)
        median = stats.stats.median  # the statistic report.py tabulates
        info["tokens_per_s"] = shape.n / median
        info["tflops"] = info["flop"] / median / 1e12


def _measure(measure_memory, step, setup, device: torch.device):
    setup()
    return measure_memory(step, device)


def _run(benchmark, measure_memory, shape, provider, mode, device, rounds, env) -> None:
    fn = get_provider(provider, device)
    inputs = make_inputs(shape, device)
    step, setup = make_step(fn, inputs, mode, device)
    benchmark.group = f"{mode} {shape.id}"
    n_rounds, warmup = rounds
    benchmark.pedantic(step, setup=setup, rounds=n_rounds, warmup_rounds=warmup, iterations=1)
    mem = _measure(measure_memory, step, setup, device)
    _record(benchmark, shape, provider, mode, env, mem)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_linear_logps_fwd(
    benchmark, measure_memory, shape, provider, device, rounds, env_info
) -> None:
    _run(benchmark, measure_memory, shape, provider, "fwd", device, rounds, env_info)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_linear_logps_fwdbwd(
    benchmark, measure_memory, shape, provider, device, rounds, env_info
) -> None:
    _run(benchmark, measure_memory, shape, provider, "fwdbwd", device, rounds, env_info)
