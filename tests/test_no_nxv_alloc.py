"""The chunked path never creates a tensor with N x V elements (docs/design.md §2, §4).

Two independent probes: a ``TorchDispatchMode`` that records the element count of every
tensor that every ATen op returns during the chunked forward and backward, and the torch
profiler's allocator events for the full autograd path through the custom op (which the
dispatch mode cannot see into). The materialised reference is run through the same probes
as a positive control, so the probes are shown to catch an N x V buffer.
"""

from __future__ import annotations

import pytest
import torch
from alloc_probe import LargestTensor
from torch.profiler import ProfilerActivity, profile

from drorebel.ops.chunked import chunked_backward, chunked_forward, token_chunk_rows
from drorebel.ops.linear_logps import linear_logps
from drorebel.reference.logps import linear_logps_reference

IGNORE = -100
H, V = 8, 2048


def _inputs(dtype: torch.dtype):
    rows = token_chunk_rows(10**9, V, 4)  # the default chunk height for this V
    n = 2 * rows + 101  # three chunks, the last one partial
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * 0.3).to(dtype)
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[::7] = IGNORE
    return hidden, weight, labels, torch.randn(n, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_path_tensors_stay_below_n_times_v(dtype):
    hidden, weight, labels, grad = _inputs(dtype)
    n = hidden.shape[0]
    with LargestTensor() as rec:
        logp, lse = chunked_forward(hidden, weight, labels, IGNORE, 0.9)
        chunked_backward(grad, hidden, weight, labels, lse, IGNORE, 0.9)
    assert 0 < rec.largest < n * V
    assert rec.largest <= token_chunk_rows(n, V, 4) * V  # one chunk is the largest tensor

    with LargestTensor() as control:
        linear_logps_reference(hidden.float(), weight.float(), labels)
    assert control.largest >= n * V


def _largest_cpu_allocation(fn) -> int:
    cpu = torch._C._autograd.DeviceType.CPU
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events()
             if e.name() == "[memory]" and e.device_type() == cpu]
    return max(sizes, default=0)


def test_autograd_path_allocations_stay_below_n_times_v():
    hidden, weight, labels, grad = _inputs(torch.float32)
    n = hidden.shape[0]

    def step(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        return lambda: fn(h, w, labels).backward(grad)

    assert _largest_cpu_allocation(step(linear_logps)) < n * V * 4
    assert _largest_cpu_allocation(step(linear_logps_reference)) >= n * V * 4
