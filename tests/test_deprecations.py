"""The 0.1 names and argument order (deprecated in 0.2, removed in 0.3), one test each: the old
call still works, warns with a ``DeprecationWarning`` and gives bit-identical values and
gradients to the 0.2 call.

Everywhere else these warnings are errors (``filterwarnings`` in pyproject.toml), so no other
test, example or benchmark goes through a shim; ``pytest.warns`` still catches them here. The old
order of ``fused_linear_rebel_loss``, ``FusedLinearRebelLoss.forward`` and
``fused_linear_dpo_loss``: tests/test_loss_path.py::test_old_argument_order_warns_and_agrees.
"""

from __future__ import annotations

import pytest
import torch

import drorebel
from drorebel.losses.fused_dpo import FusedLinearDPOLoss
from drorebel.losses.fused_rebel import FusedLinearRebelLoss, sequence_logps_from_hidden
from drorebel.losses.wasserstein import (
    fused_linear_wasserstein_rebel_loss,
    fused_linear_wdpo_loss,
)
from drorebel.ops.linear_logps import linear_logps
from drorebel.ops.linear_wgrad import linear_logps_wgrad
from drorebel.ops.sequence import linear_sequence_logps

F64 = torch.float64
OLD_NAME = r"is deprecated; use drorebel\."
OLD_ORDER = r"is the 0\.1 argument order"


def _problem(seed: int = 0, n: int = 2, t: int = 5, h: int = 6, v: int = 11) -> dict:
    """Stacked ``[a; b]`` float64 inputs: hidden [2n, t, h], head [v, h], labels with a prompt."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (2 * n, t), generator=g)
    labels[:, :2] = -100
    return {"hidden": torch.randn(2 * n, t, h, generator=g, dtype=F64),
            "weight": torch.randn(v, h, generator=g, dtype=F64),
            "labels": labels,
            "ref": torch.randn(2 * n, generator=g, dtype=F64) - 10,
            "rewards": torch.randn(2 * n, generator=g, dtype=F64)}


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t[: t.shape[0] // 2], t[t.shape[0] // 2:]


def _run(fn, pb: dict) -> list[torch.Tensor]:
    """``fn(hidden, weight)`` → a tensor, a tuple of tensors or a LossOutput; returns the values
    and the gradients of their sum w.r.t. hidden and weight."""
    h, w = (pb[k].clone().requires_grad_() for k in ("hidden", "weight"))
    out = fn(h, w)
    if hasattr(out, "loss"):
        out = (out.loss, out.policy_logps_a, out.policy_logps_b)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(sum(o.sum() for o in outs), (h, w))
    return [o.detach() for o in outs] + list(grads)


def _assert_identical(old: list[torch.Tensor], new: list[torch.Tensor]) -> None:
    assert len(old) == len(new)
    for o, n in zip(old, new):
        assert torch.equal(o, n)


def test_linear_logprobs():
    pb = _problem(seed=1)
    kw = dict(temperature=0.7, impl="torch")
    new = _run(lambda h, w: linear_logps(h, w, pb["labels"], **kw), pb)
    with pytest.warns(DeprecationWarning, match=OLD_NAME):
        old = _run(lambda h, w: drorebel.linear_logprobs(h, w, pb["labels"], **kw), pb)
    _assert_identical(old, new)
    assert "linear_logprobs" not in drorebel.__all__


def test_linear_logprobs_wgrad():
    pb = _problem(seed=2)
    kw = dict(temperature=0.8, impl="torch")
    new = _run(lambda h, w: linear_logps_wgrad(h, w, pb["labels"], **kw), pb)
    with pytest.warns(DeprecationWarning, match=OLD_NAME):
        old = _run(lambda h, w: drorebel.linear_logprobs_wgrad(h, w, pb["labels"], **kw), pb)
    _assert_identical(old, new)
    assert "linear_logprobs_wgrad" not in drorebel.__all__


def test_sequence_logps_fused():
    pb = _problem(seed=3)
    kw = dict(temperature=0.9, impl="torch", return_token_logps=True)
    new = _run(lambda h, w: linear_sequence_logps(h, w, pb["labels"], **kw), pb)
    with pytest.warns(DeprecationWarning, match=OLD_NAME):
        old = _run(lambda h, w: drorebel.sequence_logps_fused(w, h, pb["labels"], **kw), pb)
    _assert_identical(old, new)
    assert "sequence_logps_fused" not in drorebel.__all__


def test_sequence_logps_from_hidden():
    pb = _problem(seed=4)
    cu = torch.tensor([0, 7, 7, 16])
    kw = dict(cu_seqlens=cu, temperature=1.3, impl="torch")
    new = _run(lambda h, w: linear_sequence_logps(h, w, pb["labels"], **kw), pb)
    with pytest.warns(DeprecationWarning, match=OLD_NAME):
        old = _run(lambda h, w: sequence_logps_from_hidden(w, h, pb["labels"], **kw), pb)
    _assert_identical(old, new)


def test_fused_linear_wasserstein_rebel_loss_old_order():
    pb = _problem(seed=5)
    (ya, yb), per = _halves(pb["labels"]), (*_halves(pb["ref"]), *_halves(pb["rewards"]))
    kw = dict(eta=0.8, rho=0.4, impl="torch")

    def new_call(h, w):
        return fused_linear_wasserstein_rebel_loss(*_halves(h), w, ya, yb, *per, **kw)

    def old_call(h, w):
        ha, hb = _halves(h)
        return fused_linear_wasserstein_rebel_loss(w, ha, ya, hb, yb, *per, **kw)

    new = _run(new_call, pb)
    with pytest.warns(DeprecationWarning, match=OLD_ORDER):
        old = _run(old_call, pb)
    _assert_identical(old, new)


def test_fused_linear_wdpo_loss_old_order():
    pb = _problem(seed=6)
    (yc, yr), refs = _halves(pb["labels"]), _halves(pb["ref"])
    kw = dict(beta=0.5, rho=0.3, impl="torch")

    def new_call(h, w):
        return fused_linear_wdpo_loss(*_halves(h), w, yc, yr, *refs, **kw)

    def old_call(h, w):
        hc, hr = _halves(h)
        return fused_linear_wdpo_loss(w, hc, yc, hr, yr, *refs, **kw)

    new = _run(new_call, pb)
    with pytest.warns(DeprecationWarning, match=OLD_ORDER):
        old = _run(old_call, pb)
    _assert_identical(old, new)


def test_fused_linear_dpo_module_old_order():
    pb = _problem(seed=7)
    mod = FusedLinearDPOLoss(beta=0.3, impl="torch")
    new = _run(lambda h, w: mod(h, w, pb["labels"], pb["ref"]), pb)
    with pytest.warns(DeprecationWarning, match=OLD_ORDER):
        old = _run(lambda h, w: mod(w, h, pb["labels"], pb["ref"]), pb)
    _assert_identical(old, new)


def test_fused_linear_rebel_forward_pairs_old_order():
    pb = _problem(seed=8)
    (ya, yb), per = _halves(pb["labels"]), (*_halves(pb["ref"]), *_halves(pb["rewards"]))
    mod = FusedLinearRebelLoss(eta=0.7, divergence="chi2", rho=0.3, impl="torch")

    def old_call(h, w):
        ha, hb = _halves(h)
        return mod.forward_pairs(w, ha, ya, hb, yb, *per)

    new = _run(lambda h, w: mod.forward_pairs(*_halves(h), w, ya, yb, *per), pb)
    with pytest.warns(DeprecationWarning, match=OLD_ORDER):
        old = _run(old_call, pb)
    _assert_identical(old, new)
