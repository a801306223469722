"""Triton kernels of ``linear_logps`` (CPU: the Triton interpreter; CUDA: compiled).

Shapes stay small because the interpreter runs every program instance in Python. Ground
truth: the float64 materialised reference (criterion and tolerances in tests/tolerances.py).
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_linear_logps import IGNORE, make_inputs
from tolerances import check_against_truth

from drorebel.kernels import linear_logps as launch
from drorebel.ops.linear_logps import linear_logps
from drorebel.reference.logps import linear_logps_reference

triton_impl = functools.partial(linear_logps, impl="triton")


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_odd_shape_temperature_random_grad(dtype, gen, device):
    """N=37, H=72, V=1003 miss every block multiple; T = 0.7; ignored rows; random g."""
    inputs = _on(device, *make_inputs(37, 72, 1003, dtype, gen))
    check_against_truth(triton_impl, *inputs, temperature=0.7)


def test_big_logits_fp32(gen, device):
    inputs = _on(device, *make_inputs(21, 40, 300, torch.float32, gen, scale=1e4))
    check_against_truth(triton_impl, *inputs)


def test_bth_input_with_one_token_rows(gen, device):
    """[B, T, H] input; rows 0 and 2 hold a single scored token, row 3 none at all."""
    hidden, weight, labels, grad = make_inputs(20, 24, 150, torch.float32, gen,
                                               ignore_frac=0.0, shape=(4, 5))
    labels[0, 1:] = IGNORE
    labels[2, :4] = IGNORE
    labels[3] = IGNORE
    check_against_truth(triton_impl, *_on(device, hidden, weight, labels, grad))


def test_all_ignored_batch(gen, device):
    hidden, weight, labels, grad = _on(device, *make_inputs(40, 16, 100, torch.float32, gen))
    labels.fill_(IGNORE)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    out = triton_impl(h, w, labels)
    out.backward(grad)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_tied_embeddings_fp16(gen, device):
    """Head weight also used as the input embedding: autograd adds both contributions."""
    v, h, n = 130, 32, 18
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(device)
    tokens = torch.randint(0, v, (n,), generator=gen).to(device)
    labels = torch.roll(tokens, -1)
    labels[-1] = IGNORE

    def grad_of(fn, w):
        w = w.clone().requires_grad_()
        hidden = torch.nn.functional.embedding(tokens, w) * 2.0
        fn(hidden, w, labels).sum().backward()
        return w.grad

    truth = grad_of(linear_logps_reference, weight.double())
    ref = grad_of(linear_logps_reference, weight.half())
    ours = grad_of(triton_impl, weight.half())
    from tolerances import assert_within

    assert_within("dW (tied)", ours, ref, truth, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vocab_splits_agree(dtype, gen, device):
    """The split-V forward (partials + combine) equals the single-split forward."""
    hidden, weight, labels, _ = _on(device, *make_inputs(45, 32, 500, dtype, gen))
    one = launch.linear_logps_forward(hidden, weight, labels, IGNORE, 0.7, num_splits=1)
    for splits in (3, 9):  # 9 splits of 8 tiles: the last split is empty
        many = launch.linear_logps_forward(hidden, weight, labels, IGNORE, 0.7,
                                              num_splits=splits)
        torch.testing.assert_close(many[0], one[0], rtol=0, atol=2e-5)
        torch.testing.assert_close(many[1], one[1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_schemes_agree_with_truth(dtype, gen, device):
    """gemm scheme over 3 vocabulary chunks and the atomic (CCE) scheme vs the float64 truth."""
    hidden, weight, labels, grad = _on(device, *make_inputs(33, 40, 600, dtype, gen))
    grad = grad.float()
    _, lse = launch.linear_logps_forward(hidden, weight, labels, IGNORE, 1.3)
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    linear_logps_reference(h64, w64, labels, IGNORE, 1.3).backward(grad.double())
    scale = max(h64.grad.abs().max().item(), w64.grad.abs().max().item())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    chunk = 33 * 256 * hidden.element_size()  # 256 vocabulary rows per chunk -> 3 chunks
    for kwargs in (dict(scheme="gemm", chunk_bytes=chunk), dict(scheme="atomic")):
        dh, dw = launch.linear_logps_backward(grad, hidden, weight, labels, lse, IGNORE, 1.3,
                                                 **kwargs)
        assert dh.dtype == dtype and dw.dtype == dtype
        assert (dh.double() - h64.grad).abs().max().item() <= tol * scale, kwargs
        assert (dw.double() - w64.grad).abs().max().item() <= tol * scale, kwargs


def test_backward_without_dw(gen, device):
    hidden, weight, labels, grad = _on(device, *make_inputs(20, 16, 90, torch.float32, gen))
    h = hidden.clone().requires_grad_()
    triton_impl(h, weight, labels).backward(grad)
    h_ref = hidden.clone().requires_grad_()
    linear_logps_reference(h_ref, weight, labels).backward(grad)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)


def test_cpu_without_interpreter_is_refused(monkeypatch, gen):
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    hidden, weight, labels, _ = make_inputs(4, 8, 20, torch.float32, gen)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        launch.linear_logps_forward(hidden, weight, labels)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_strided_inputs(impl, gen, device):
    """Row-strided views (a slice of wider buffers) and a column-major head are accepted."""
    hidden, weight, labels, grad = _on(device, *make_inputs(23, 40, 130, torch.float32, gen))
    wide_h = torch.zeros(23, 48, device=device)
    wide_h[:, 5:45] = hidden
    col_major_w = weight.t().contiguous().t()  # stride (1, V): not row-major
    h, w = wide_h.requires_grad_(), col_major_w.clone().requires_grad_()
    out = linear_logps(h[:, 5:45], w, labels, impl=impl)
    out.backward(grad)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = linear_logps_reference(h_ref, w_ref, labels)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad[:, 5:45], h_ref.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(h.grad[:, :5], torch.zeros(23, 5, device=device))
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
