"""``linear_logps``: chunked PyTorch path, API, validation, custom-op registration.

Ground truth: the materialised reference in float64 (docs/design.md §3 criterion, tolerances in
tests/tolerances.py). The Triton kernels are tested in test_linear_logps_triton.py.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from tolerances import assert_compiled_grads_match, check_against_truth

from drorebel.ops.chunked import chunked_backward, chunked_forward
from drorebel.ops.linear_logps import linear_logps
from drorebel.reference.logps import linear_logps_reference

IGNORE = -100
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(n, h, v, dtype, gen, scale=1.0, ignore_frac=0.2, shape=None):
    """hidden [N,H], head [V,H] (logits of size ~scale), labels with ignored ones, grad."""
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (scale / math.sqrt(h))
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = IGNORE
    grad = torch.randn(n, generator=gen, dtype=torch.float64)
    if shape is not None:
        hidden, labels, grad = hidden.view(*shape, h), labels.view(shape), grad.view(shape)
    return hidden.to(dtype), weight.to(dtype), labels, grad


torch_impl = functools.partial(linear_logps, impl="torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case",
    [
        dict(n=37, h=72, v=1003),                          # odd sizes
        dict(n=37, h=72, v=1003, temperature=0.7),         # T != 1
        dict(n=29, h=40, v=517, scale=1e4),                # logits of magnitude 1e4
        dict(n=24, h=32, v=300, shape=(4, 6)),             # [B, T, H] input
        dict(n=30, h=16, v=211, ignore_frac=0.7),          # mostly ignored
    ],
    ids=["odd", "temp0.7", "big-logits", "BTH", "mostly-ignored"],
)
def test_torch_path_matches_float64_truth(dtype, case, gen):
    case = dict(case)
    temperature = case.pop("temperature", 1.0)
    hidden, weight, labels, grad = make_inputs(dtype=dtype, gen=gen, **case)
    check_against_truth(torch_impl, hidden, weight, labels, grad, temperature=temperature)


def test_hand_worked_value():
    # H = 1, W = [[0], [1], [2]], h = 1: z = (0, 1, 2), log p(y=2) = 2 - log(1 + e + e^2)
    hidden = torch.ones(2, 1)
    weight = torch.tensor([[0.0], [1.0], [2.0]])
    labels = torch.tensor([2, IGNORE])
    out = linear_logps(hidden, weight, labels)
    expected = 2.0 - math.log(1 + math.e + math.e**2)
    assert out[0].item() == pytest.approx(expected, abs=1e-6)
    assert out[1].item() == 0.0


def test_gradcheck_float64(gen):
    hidden, weight, labels, _ = make_inputs(7, 5, 11, torch.float64, gen, ignore_frac=0.3)
    hidden.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: linear_logps(h, w, labels, temperature=0.7, impl="torch"),
        (hidden, weight),
    )


def test_all_ignored_gives_zero_output_and_grads(gen):
    hidden, weight, labels, grad = make_inputs(9, 8, 50, torch.float32, gen)
    labels.fill_(IGNORE)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    out = linear_logps(h, w, labels)
    out.backward(grad.float())
    assert torch.equal(out, torch.zeros(9))
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_chunk_boundaries_and_skipped_chunks(gen):
    """Several chunks (7 rows), one of them fully ignored, match the one-chunk result."""
    hidden, weight, labels, grad = make_inputs(30, 12, 97, torch.float32, gen)
    labels[7:14] = IGNORE
    logp1, lse1 = chunked_forward(hidden, weight, labels, IGNORE, 0.9)
    logp7, lse7 = chunked_forward(hidden, weight, labels, IGNORE, 0.9, chunk_rows=7)
    torch.testing.assert_close(logp7, logp1, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse7, lse1, rtol=0, atol=1e-6)
    dh1, dw1 = chunked_backward(grad, hidden, weight, labels, lse1, IGNORE, 0.9)
    dh7, dw7 = chunked_backward(grad, hidden, weight, labels, lse1, IGNORE, 0.9, chunk_rows=7)
    torch.testing.assert_close(dh7, dh1, rtol=0, atol=1e-6)
    torch.testing.assert_close(dw7, dw1, rtol=1e-6, atol=1e-6)
    assert torch.equal(dh7[7:14], torch.zeros(7, 12))


def test_tied_embeddings_accumulate(gen):
    """W is both the input embedding and the LM head: both gradient paths add up."""
    v, h, n = 97, 16, 21
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.3
    tokens = torch.randint(0, v, (n,), generator=gen)
    labels = torch.roll(tokens, -1)
    labels[-1] = IGNORE
    mix = torch.randn(h, h, generator=gen, dtype=torch.float64) * 0.5

    def grad_of(fn, w, embed_w=None):
        w = w.clone().requires_grad_()
        table = w if embed_w is None else embed_w.to(w.dtype)
        hidden = torch.tanh(torch.nn.functional.embedding(tokens, table) @ mix.to(w.dtype))
        fn(hidden, w, labels).sum().backward()
        return w.grad

    truth = grad_of(linear_logps_reference, weight)
    ours = grad_of(torch_impl, weight.float())
    torch.testing.assert_close(ours.double(), truth, rtol=1e-5, atol=1e-5)
    # the embedding path really contributes (else the test would not test accumulation)
    head_only = grad_of(linear_logps_reference, weight, embed_w=weight)
    assert (truth - head_only)[tokens].abs().max() > 1e-3


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_only_needed_gradient_is_computed(which, gen):
    hidden, weight, labels, grad = make_inputs(13, 8, 40, torch.float32, gen)
    h = hidden.clone().requires_grad_(which == "hidden")
    w = weight.clone().requires_grad_(which == "weight")
    linear_logps(h, w, labels).backward(grad.float())
    full = [t.clone().requires_grad_() for t in (hidden, weight)]
    linear_logps(full[0], full[1], labels).backward(grad.float())
    got, other = (h, w) if which == "hidden" else (w, h)
    assert other.grad is None
    torch.testing.assert_close(got.grad, full[0 if which == "hidden" else 1].grad)


def test_auto_is_torch_on_cpu_and_int32_labels(gen):
    hidden, weight, labels, _ = make_inputs(11, 8, 40, torch.float32, gen)
    a = linear_logps(hidden, weight, labels)
    b = linear_logps(hidden, weight, labels.int(), impl="torch")
    assert torch.equal(a, b)


def test_torch_compile_fullgraph(gen):
    hidden, weight, labels, grad = make_inputs(19, 8, 64, torch.float32, gen, shape=(19,))

    def f(h, w):
        return (linear_logps(h, w, labels, temperature=0.8) * 2.0).sum()

    assert_compiled_grads_match(f, hidden, weight)


def test_opcheck(gen):
    hidden, weight, labels, _ = make_inputs(6, 4, 9, torch.float32, gen)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.library.opcheck(torch.ops.drorebel.linear_logps_fwd.default,
                          (hidden, weight, labels, IGNORE, 1.0, "torch"))


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(weight=torch.zeros(10, 5)), ValueError, "hidden"),
        (dict(weight=torch.zeros(10)), ValueError, "weight"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"),
        (dict(labels=torch.zeros(4)), TypeError, "labels"),
        (dict(labels=torch.tensor([0, 1, 10, 2])), ValueError, "labels"),
        (dict(labels=torch.tensor([0, -1, 3, 2])), ValueError, "labels"),
        (dict(weight=torch.zeros(10, 6, dtype=torch.float16)), TypeError, "weight"),
        (dict(hidden=torch.zeros(4, 6, dtype=torch.int32)), TypeError, "hidden"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(impl="cuda"), ValueError, "impl"),
        (dict(hidden=torch.zeros(4, 6, dtype=torch.float64), impl="triton"), TypeError, "hidden"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(labels=torch.zeros(4, dtype=torch.long, device="meta")), ValueError, "device"),
    ],
)
def test_validation_errors_name_the_argument(kwargs, exc, name):
    args = dict(hidden=torch.zeros(4, 6), weight=torch.zeros(10, 6),
                labels=torch.tensor([0, 1, IGNORE, 9]))
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        linear_logps(**args)


def test_ignore_index_value_is_allowed_outside_vocab(gen):
    hidden, weight, labels, _ = make_inputs(5, 4, 9, torch.float32, gen, ignore_frac=0.0)
    labels[2] = -1
    out = linear_logps(hidden, weight, labels, ignore_index=-1)
    assert out[2].item() == 0.0


def test_addmm_acc_accumulates_in_the_accumulator_dtype():
    """The one fp32 GEMM-accumulate helper of every chunked backward (drorebel.kernels.accum)."""
    from drorebel.kernels.accum import addmm_acc

    acc = torch.ones(2, 2)
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    addmm_acc(acc, a.t(), torch.eye(2, dtype=torch.bfloat16))  # transposed view operand
    assert acc.dtype == torch.float32 and acc.tolist() == [[2.0, 4.0], [3.0, 5.0]]
    # 2^-9 is lost in bf16 but kept by the fp32 accumulator over 64 additions
    acc = torch.zeros(1, 1)
    tiny = torch.full((1, 1), 2.0 ** -9, dtype=torch.bfloat16)
    one = torch.ones(1, 1, dtype=torch.bfloat16)
    addmm_acc(acc, one, one)
    for _ in range(64):
        addmm_acc(acc, tiny, one)
    assert acc.item() == 1.0 + 64 * 2.0 ** -9
