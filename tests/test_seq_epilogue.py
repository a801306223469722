"""``linear_sequence_logps``: per-sequence sums from the kernel epilogue, [S] gradient in the bwd.

    out_s = Σ_{t in seq s, y_t != ignore} log softmax(W h_t / T)[y_t]

Ground truth: the float64 materialised reference, summed per sequence by an independent
Python loop; criterion and tolerances of tests/tolerances.py (docs/design.md §3). The Triton path
runs in the interpreter on the CPU: N <= 64 takes the vocabulary-split forward + combine
kernel, larger N the one-split forward; T is chosen so that token blocks (32 in the
interpreter) both lie inside one sequence (one atomic) and straddle sequences (per-token
atomics).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_linear_logps import IGNORE, make_inputs
from tolerances import assert_compiled_grads_match, assert_within

from drorebel.ops.linear_logps import linear_logps
from drorebel.ops.sequence import linear_sequence_logps
from drorebel.reference.logps import linear_logps_reference

IMPLS = ["torch", "triton"]


def _ids_of(layout: str, shape: tuple[int, int], gen) -> tuple[dict, torch.Tensor, int]:
    """(kwargs for the layout, the int64 sequence id of each flat token (-1: none), S)."""
    b, t = shape
    n = b * t
    if layout == "padded":
        return {}, torch.arange(n) // t, b
    if layout == "packed":
        # lengths with an empty and a one-token sequence; the last 3 tokens belong to none
        cuts = sorted(torch.randint(0, n - 3, (4,), generator=gen).tolist())
        cu = [0, 1, 1, *cuts, n - 3]
        ids = torch.full((n,), -1)
        for s in range(len(cu) - 1):
            ids[cu[s]:cu[s + 1]] = s
        return {"cu_seqlens": torch.tensor(cu, dtype=torch.int32)}, ids, len(cu) - 1
    # explicit: pairs-style ids, sequence s = rows s and s + b/2 interleaved, some -1
    ids = torch.randint(-1, 5, (n,), generator=gen)
    return {"seq_ids": ids.view(shape), "num_seqs": 6}, ids, 6


def _truth_sums(token_logps: torch.Tensor, ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    flat = token_logps.reshape(-1)
    out = [flat.new_zeros(()) for _ in range(num_seqs)]
    for tok, s in zip(flat, ids.tolist()):
        if s >= 0:
            out[s] = out[s] + tok
    return torch.stack(out)


def _value_and_grads(fn, hidden, weight, gseq):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w)
    out.backward(gseq.to(out.dtype).view(out.shape))
    return out.detach().reshape(-1), h.grad, w.grad


def _check(impl, layout, dtype, shape, gen, device, temperature=1.0, v=131, hdim=40):
    b, t = shape
    hidden, weight, labels, _ = make_inputs(b * t, hdim, v, dtype, gen, shape=shape)
    labels[0, : min(3, t)] = IGNORE  # a prompt
    kwargs, ids, num_seqs = _ids_of(layout, shape, gen)
    gseq = torch.randn(num_seqs, generator=gen, dtype=torch.float64)

    def reference(h, w):
        tok = linear_logps_reference(h, w, labels, temperature=temperature)
        return _truth_sums(tok, ids, num_seqs)

    def ours(h, w):
        kw = {k: (x.to(device) if torch.is_tensor(x) else x) for k, x in kwargs.items()}
        out = linear_sequence_logps(h, w, labels.to(device), temperature=temperature, impl=impl,
                                    **kw)
        return out.cpu()

    truth = _value_and_grads(reference, hidden.double(), weight.double(), gseq)
    ref = _value_and_grads(reference, hidden, weight, gseq)
    got = _value_and_grads(ours, hidden.to(device), weight.to(device), gseq)
    assert got[0].shape == (num_seqs,) and got[0].dtype == torch.float32
    for name, o, r, tr in zip(("sums", "dH", "dW"), got, ref, truth):
        assert_within(f"{name} [{impl}, {layout}]", o.cpu(), r, tr, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["padded", "packed", "explicit"])
@pytest.mark.parametrize("shape", [(3, 13), (2, 70)], ids=["split-combine", "one-split"])
def test_layouts_match_float64_truth(impl, layout, shape, gen, device):
    _check(impl, layout, torch.float32, shape, gen, device, temperature=0.7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_odd_shape(impl, dtype, gen, device):
    """V = 1003 and H = 72 miss every block multiple."""
    _check(impl, "padded", dtype, (3, 11), gen, device, v=1003, hdim=72)


def test_hand_worked_value():
    # H = 1, W = [[0], [1], [2]], h = 1: z = (0, 1, 2), log p(y) = y - log(1 + e + e^2)
    weight = torch.tensor([[0.0], [1.0], [2.0]])
    hidden = torch.ones(2, 3, 1)
    labels = torch.tensor([[2, IGNORE, 0], [IGNORE, IGNORE, 1]])
    lse = math.log(1 + math.e + math.e ** 2)
    expected = torch.tensor([2 - lse + 0 - lse, 1 - lse])
    torch.testing.assert_close(linear_sequence_logps(hidden, weight, labels), expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_output_and_both_gradients(impl, gen, device):
    """``return_token_logps``: tokens equal ``linear_logps`` (0 outside every sequence);
    gradients through sums AND tokens equal the float64 reference's."""
    hidden, weight, labels, gtok = make_inputs(30, 24, 97, torch.float64, gen)
    ids = torch.tensor([0] * 10 + [-1] * 5 + [1] * 15)
    gseq = torch.tensor([0.5, -2.0], dtype=torch.float64)
    dtype = torch.float32

    def run(fn, h, w):
        h = h.detach().clone().requires_grad_()
        w = w.detach().clone().requires_grad_()
        sums, tok = fn(h, w)
        ((sums * gseq.to(sums.dtype)).sum() + (tok * gtok.to(tok.dtype)).sum()).backward()
        return sums.detach(), tok.detach(), h.grad, w.grad

    def reference(h, w):
        tok = linear_logps_reference(h, w, labels)
        tok = torch.where(ids >= 0, tok, 0.0)
        return _truth_sums(tok, ids, 2), tok

    def ours(h, w):
        out = linear_sequence_logps(h, w, labels.to(device), seq_ids=ids.to(device), num_seqs=2,
                                    impl=impl, return_token_logps=True)
        return out[0].cpu(), out[1].cpu()

    truth = run(reference, hidden, weight)
    ref = run(reference, hidden.to(dtype), weight.to(dtype))
    got = run(ours, hidden.to(dtype).to(device), weight.to(dtype).to(device))
    plain = linear_logps(hidden.to(dtype), weight.to(dtype), labels, impl="torch")
    assert torch.equal(got[1][10:15], torch.zeros(5))
    torch.testing.assert_close(got[1][ids >= 0], plain[ids >= 0], rtol=2e-6, atol=2e-6)
    for name, o, r, tr in zip(("sums", "tokens", "dH", "dW"), got, ref, truth):
        assert_within(f"{name} [{impl}]", o.cpu(), r, tr, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_sequence_tokens_get_no_gradient(impl, gen, device):
    """Packed with trailing padding and an empty sequence: those add nothing, get dH = 0."""
    hidden, weight, labels, _ = make_inputs(20, 16, 50, torch.float32, gen, ignore_frac=0.0)
    cu = torch.tensor([0, 6, 6, 15])
    h = hidden.to(device).requires_grad_()
    out = linear_sequence_logps(h, weight.to(device), labels.to(device), cu_seqlens=cu.to(device),
                                impl=impl)
    assert out[1].item() == 0.0
    out.sum().backward()
    assert torch.equal(h.grad[15:].cpu(), torch.zeros(5, 16))
    assert h.grad[:15].abs().sum(dim=1).min().item() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_sequences(impl, gen, device):
    hidden, weight, labels, _ = make_inputs(9, 8, 30, torch.float32, gen)
    h = hidden.to(device).requires_grad_()
    ids = torch.full((9,), -1, device=device)
    out = linear_sequence_logps(h, weight.to(device), labels.to(device), seq_ids=ids, num_seqs=0,
                                impl=impl)
    assert out.shape == (0,)
    (out.sum() + h.sum()).backward()
    assert torch.equal(h.grad.cpu(), torch.ones(9, 8))


def test_all_ignored_and_zero_length(gen):
    hidden, weight, labels, _ = make_inputs(12, 8, 30, torch.float32, gen, shape=(3, 4))
    labels.fill_(IGNORE)
    h = hidden.requires_grad_()
    out = linear_sequence_logps(h, weight, labels)
    assert torch.equal(out, torch.zeros(3))
    out.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h))
    empty = linear_sequence_logps(hidden[:, :0].detach(), weight, labels[:, :0])
    assert torch.equal(empty, torch.zeros(3))


def test_cpu_path_is_deterministic(gen):
    hidden, weight, labels, _ = make_inputs(300, 16, 64, torch.float32, gen, shape=(6, 50))
    runs = [linear_sequence_logps(hidden, weight, labels, impl="torch") for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_float64_torch_path_and_opcheck(gen):
    hidden, weight, labels, _ = make_inputs(14, 6, 20, torch.float64, gen, shape=(2, 7))
    out = linear_sequence_logps(hidden, weight, labels, impl="torch")
    truth = linear_logps_reference(hidden, weight, labels).sum(dim=1)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ids = torch.tensor([0] * 5 + [-1] * 2 + [1] * 7, dtype=torch.int32)
    torch.library.opcheck(torch.ops.drorebel.sequence_logps_fwd.default,
                          (h.reshape(14, 6), w, labels.reshape(-1), ids, 2, IGNORE, 1.0, "torch",
                           False))


def test_torch_compile_fullgraph(gen):
    hidden, weight, labels, _ = make_inputs(24, 8, 64, torch.float32, gen, shape=(4, 6))

    def f(h, w):
        return (linear_sequence_logps(h, w, labels, temperature=0.8) ** 2).sum()

    assert_compiled_grads_match(f, hidden, weight)


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(seq_ids=torch.tensor([0, 1, 2, 0]), num_seqs=2), ValueError, "seq_ids"),
        (dict(seq_ids=torch.tensor([0, 1, 1, 0])), ValueError, "num_seqs"),
        (dict(seq_ids=torch.tensor([0, 1, 1]), num_seqs=2), ValueError, "seq_ids"),
        (dict(seq_ids=torch.tensor([0.0, 1, 1, 0]), num_seqs=2), TypeError, "seq_ids"),
        (dict(seq_ids=torch.tensor([0, 1, 1, 0]), num_seqs=2,
              cu_seqlens=torch.tensor([0, 4])), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 2, 4]), num_seqs=3), ValueError, "num_seqs"),
        (dict(cu_seqlens=torch.tensor([0.0, 4.0])), TypeError, "cu_seqlens"),
        (dict(num_seqs=2), ValueError, "num_seqs"),
        (dict(labels=torch.tensor([0, 1, 10, 2])), ValueError, "labels"),
    ],
)
def test_validation_errors_name_the_argument(kwargs, exc, name):
    args = dict(weight=torch.zeros(10, 6), hidden=torch.zeros(4, 6),
                labels=torch.tensor([0, 1, IGNORE, 9]))
    args.update(kwargs)
    weight, hidden, labels = args.pop("weight"), args.pop("hidden"), args.pop("labels")
    with pytest.raises(exc, match=name):
        linear_sequence_logps(hidden, weight, labels, **args)


def test_chunked_sequence_path_has_no_n_times_v_allocation():
    """Allocator probe of test_no_nxv_alloc.py through the custom ops (forward + backward):
    the largest CPU allocation is one [rows, V] fp32 chunk, never N x V."""
    from test_no_nxv_alloc import _largest_cpu_allocation

    from drorebel.ops.chunked import token_chunk_rows

    v = 2048
    n = 2 * token_chunk_rows(10**9, v, 4) + 37
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, 8, generator=gen).requires_grad_()
    weight = (torch.randn(v, 8, generator=gen) * 0.3).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    cu = torch.tensor([0, n // 3, n - 5])
    largest = _largest_cpu_allocation(lambda: linear_sequence_logps(
        hidden, weight, labels, cu_seqlens=cu, impl="torch").sum().backward())
    assert 0 < largest <= token_chunk_rows(n, v, 4) * v * 4 < n * v * 4
