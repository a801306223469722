"""Property-based tests (hypothesis) of the losses on random shapes and extreme values.

For ``rebel_loss`` (none / χ² / KL), ``dro_weights``, ``dpo_loss`` (with and without mask) and
the fused ``fused_linear_rebel_loss`` / ``FusedLinearRebelLoss`` (``impl="torch"``, tiny
shapes): every result is finite (loss, gradients, weights summing to one) or the call raises a
clear ``ValueError``/``TypeError`` naming the argument; never a NaN, never another exception.
Inputs that are comfortably representable must not be refused; a NaN/inf input must be refused
naming the argument and its row.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from drorebel.losses.dpo import dpo_loss
from drorebel.losses.dro import dro_solve, dro_weights, robust_objective
from drorebel.losses.fused_rebel import FusedLinearRebelLoss, fused_linear_rebel_loss
from drorebel.losses.rebel import rebel_loss

# DROREBEL_HYPOTHESIS_EXAMPLES=2000 for a longer hunt; 50 keeps the file well under a minute
SETTINGS = settings(max_examples=int(os.environ.get("DROREBEL_HYPOTHESIS_EXAMPLES", "50")),
                    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
IGNORE = -100
PAIR_NAMES = ("policy_logps_a", "policy_logps_b", "ref_logps_a", "ref_logps_b", "rewards_a",
              "rewards_b")

EXTREMES = [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e6, -1e6, 1e10, -1e10, 1e19, -1e19, 1e20,
            -1e20, -1e4, 3e38, -3e38]
values = st.one_of(st.floats(-1e3, 1e3), st.sampled_from(EXTREMES), st.floats(-1e20, 1e20))
logp_values = st.one_of(st.floats(-1e4, 0.0), st.sampled_from([0.0, -1e-30, -1.0, -1e4]))
moderate = st.floats(-30.0, 30.0)


@st.composite
def regime(draw, extreme: st.SearchStrategy) -> st.SearchStrategy:
    """Half of the examples moderate (they must be computed), half with extreme values."""
    return extreme if draw(st.booleans()) else moderate
etas = st.one_of(st.sampled_from([1e-30, 1e-12, 1e-3, 0.1, 1.0, 10.0, 1e8, 1e30]),
                 st.floats(1e-6, 1e6))
dtypes = st.sampled_from([F32, F64, BF16])


def _ties(draw, n: int, elements: st.SearchStrategy) -> list[float]:
    """``n`` values; often drawn from a pool of two so that ties are common."""
    if draw(st.booleans()):
        pool = draw(st.lists(elements, min_size=1, max_size=2))
        return [draw(st.sampled_from(pool)) for _ in range(n)]
    return draw(st.lists(elements, min_size=n, max_size=n))


@st.composite
def dro_args(draw, n: int) -> dict:
    """``divergence`` with ``rho``/``tau``: 0, tiny, around the saturation point, huge."""
    divergence = draw(st.sampled_from(["none", "chi2", "kl"]))
    if divergence == "none":
        return {"divergence": "none"}
    if divergence == "kl" and draw(st.booleans()):
        tau = draw(st.one_of(st.sampled_from([1e-300, 1e-30, 1e-8, 1e-3, 1.0, 1e8, 1e30]),
                             st.floats(1e-6, 1e6)))
        return {"divergence": "kl", "tau": tau}
    sat = (n - 1) / 2 if divergence == "chi2" else math.log(n)
    rho = draw(st.one_of(st.sampled_from([0.0, 1e-12, 1e-3, sat, sat * 1.0000001, sat + 1.0,
                                          1e6, math.inf]),
                         st.floats(0.0, 2.0 * sat + 1.0)))
    return {"divergence": divergence, "rho": rho}


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _check_weights(w: torch.Tensor, divergence: str) -> None:
    assert _finite(w) and bool((w >= 0).all()), w
    assert abs(w.double().sum().item() - 1.0) < 1e-5, (w, divergence)


def _check_metrics(metrics: dict) -> None:
    for key, value in metrics.items():
        assert not bool(torch.isnan(value).any()), (key, value)


# ------------------------------------------------------------------------------- rebel_loss
@st.composite
def rebel_inputs(draw) -> dict:
    n = draw(st.integers(1, 6))
    logp_dtype, reward_dtype = draw(dtypes), draw(dtypes)
    rewards, logps = draw(regime(values)), draw(regime(st.one_of(logp_values, values)))
    t = {}
    for name in PAIR_NAMES:
        dtype = reward_dtype if name.startswith("rewards") else logp_dtype
        elements = rewards if name.startswith("rewards") else logps
        t[name] = torch.tensor(_ties(draw, n, elements), dtype=F64).to(dtype)
    return {"tensors": t, "eta": draw(etas), "dro": draw(dro_args(n))}


def _rebel_safe(t: dict, eta: float) -> bool:
    """Every intermediate of Δ and its gradient comfortably inside the working dtype."""
    work = F64 if any(v.dtype == F64 for v in t.values()) else F32
    big = torch.finfo(work).max / 4
    grad_big = min(math.sqrt(big), *(torch.finfo(t[k].dtype).max / 4 for k in PAIR_NAMES[:2]))
    pa, pb, ra, rb, wa, wb = (t[k].double() for k in PAIR_NAMES)
    n = pa.shape[0]
    margin = ((pa - ra) - (pb - rb)) / eta
    delta = margin - (wa - wb)
    parts = (pa - ra, pb - rb, margin, wa - wb, delta * delta * n)
    ok = all(bool((p.abs() <= big).all()) for p in parts)
    return ok and bool((2 * delta.abs() / eta <= grad_big).all())


@SETTINGS
@given(rebel_inputs())
def test_rebel_loss_is_finite_or_refused(case) -> None:
    t = {k: v.clone().requires_grad_(k.startswith("policy")) for k, v in case["tensors"].items()}
    try:
        out = rebel_loss(**t, eta=case["eta"], **case["dro"])
    except ValueError as err:
        event(f"refused: {str(err).split(' row')[0]}")
        assert not _rebel_safe(case["tensors"], case["eta"]), err
        assert "row" in str(err) and ("pair" in str(err) or "is not finite" in str(err))
        return
    event(f"computed: {case['dro']['divergence']}")
    assert _finite(out.loss), out.loss
    _check_weights(out.weights, case["dro"]["divergence"])
    _check_metrics(out.metrics)
    out.loss.backward()
    assert _finite(t["policy_logps_a"].grad) and _finite(t["policy_logps_b"].grad)


@SETTINGS
@given(rebel_inputs(), st.sampled_from(PAIR_NAMES), st.data(),
       st.sampled_from([math.nan, math.inf, -math.inf]))
def test_rebel_loss_names_a_non_finite_input(case, name, data, bad) -> None:
    t = dict(case["tensors"])
    row = data.draw(st.integers(0, t[name].shape[0] - 1))
    assume(all(_finite(v) for v in t.values()))
    t[name] = t[name].clone()
    t[name][row] = bad
    with pytest.raises(ValueError, match=rf"{name} row {row} is not finite"):
        rebel_loss(**t, eta=case["eta"], **case["dro"])
    rebel_loss(**t, eta=case["eta"], **case["dro"], validate=False)  # no check, no sync


def test_rebel_loss_fp32_overflow_is_a_clear_error() -> None:
    one = torch.ones(2, dtype=F64)
    args = (-one, -one, -one, -one, torch.tensor([1e20, 0.0], dtype=F64), 0 * one)
    with pytest.raises(ValueError, match=r"pair row 0 .*float32 cannot hold.*float64"):
        rebel_loss(*(a.float() for a in args), eta=1.0)
    out = rebel_loss(*args, eta=1.0)  # float64: fine
    assert out.loss.dtype == F64 and math.isclose(out.loss.item(), 0.5e40, rel_tol=1e-12)
    # float64 rewards with float32 log-probs: the whole residual is float64
    lp = torch.tensor([-1.0e4 - 0.25, -1.0e4], dtype=F32)
    out = rebel_loss(lp, lp.flip(0), lp.flip(0), lp, torch.zeros(2, dtype=F64),
                     torch.zeros(2, dtype=F64), eta=1e-3)
    delta = ((lp.double() - lp.flip(0).double()) * 2) / 1e-3
    assert out.loss.dtype == F64
    assert math.isclose(out.loss.item(), (delta**2).mean().item(), rel_tol=1e-12)


@pytest.mark.parametrize("kw", [{"eta": True}, {"eta": 1.0, "divergence": "chi2", "rho": True},
                                {"eta": 1.0, "divergence": "kl", "tau": True},
                                {"eta": 1.0, "divergence": "kl", "rho": False}])
def test_bool_hyperparameters_are_refused(kw) -> None:
    one = torch.ones(2)
    with pytest.raises(ValueError, match="not a bool"):
        rebel_loss(one, one, one, one, one, one, **kw)
    with pytest.raises(ValueError, match="not a bool"):
        dpo_loss(one, one, one, one, beta=True)
    with pytest.raises(TypeError, match="real number"):
        rebel_loss(one, one, one, one, one, one, eta="0.5")


def test_empty_batches_are_refused() -> None:
    e = torch.zeros(0)
    with pytest.raises(ValueError, match="n >= 1"):
        rebel_loss(e, e, e, e, e, e, eta=1.0)
    with pytest.raises(ValueError, match="at least one"):
        dro_weights(e, "chi2", rho=0.1)
    with pytest.raises(ValueError, match="n >= 1"):
        dpo_loss(e, e, e, e, beta=0.1)
    with pytest.raises(TypeError, match="rewards_b"):
        rebel_loss(e, e, e, e, e, [0.0], eta=1.0)


# ------------------------------------------------------------------------------- dro_weights
@st.composite
def dro_losses(draw) -> tuple[torch.Tensor, dict]:
    n = draw(st.integers(1, 8))
    dtype = draw(dtypes)
    big = torch.finfo(dtype).max
    elements = st.one_of(st.floats(0.0, 10.0), st.sampled_from([0.0, 1e-30, 1e10, 1e20, 1e38]),
                         st.floats(-big, big), st.floats(0.0, 1e300))
    vals = _ties(draw, n, elements)
    dro = draw(dro_args(n))
    if dro["divergence"] == "none":
        dro = {"divergence": "chi2", "rho": 0.5}
    return torch.tensor(vals, dtype=F64).to(dtype), dro


@SETTINGS
@given(dro_losses())
def test_dro_weights_sum_to_one(case) -> None:
    losses, dro = case
    if not _finite(losses):  # beyond the dtype's range: refused, naming the row
        with pytest.raises(ValueError, match=r"losses row \d+ is not finite"):
            dro_weights(losses, **dro)
        return
    w = dro_weights(losses, **dro)
    _check_weights(w, dro["divergence"])
    p, dual = dro_solve(losses, **dro)
    assert not bool(torch.isnan(dual))
    torch.testing.assert_close(p, w, rtol=0, atol=0)
    x = losses.double().clone().requires_grad_()
    value = robust_objective(x, **dro)
    assert _finite(value)
    value.backward()
    assert _finite(x.grad)


@SETTINGS
@given(dro_losses(), st.integers(-60, 60))
def test_dro_weights_are_scale_invariant(case, k) -> None:
    """χ² and KL-radius weights depend on ℓ only up to a positive scale (2^k: exact in floats);
    the solver rescales huge spreads internally, which must not show."""
    losses, dro = case
    losses = losses.double()
    assume(_finite(losses) and "tau" not in dro)
    scaled = losses * 2.0**k
    assume(_finite(scaled) and bool((scaled[losses != 0] != 0).all()))
    torch.testing.assert_close(dro_weights(scaled, **dro), dro_weights(losses, **dro),
                               rtol=0, atol=1e-9)


@SETTINGS
@given(dro_losses(), st.data(), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_dro_weights_name_a_non_finite_loss(case, data, bad) -> None:
    losses, dro = case
    assume(_finite(losses))
    row = data.draw(st.integers(0, losses.shape[0] - 1))
    losses = losses.clone()
    losses[row] = bad
    for fn in (dro_weights, robust_objective, lambda *a, **k: dro_solve(*a, **k)[0]):
        with pytest.raises(ValueError, match=rf"losses row {row} is not finite"):
            fn(losses, **dro)
    dro_weights(losses, **dro, validate=False)  # no check, no sync: whatever comes out


# ------------------------------------------------------------------------------- dpo_loss
@st.composite
def dpo_inputs(draw) -> dict:
    n = draw(st.integers(1, 6))
    dtype = draw(dtypes)
    elements = draw(regime(st.one_of(logp_values, values)))
    t = [torch.tensor(_ties(draw, n, elements), dtype=F64).to(dtype) for _ in range(4)]
    beta = draw(st.one_of(st.sampled_from([1e-30, 1e-8, 0.1, 1.0, 1e8, 1e30, 1e300]),
                          st.floats(1e-6, 1e6)))
    mask = None
    if draw(st.booleans()):
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return {"t": t, "beta": beta, "mask": mask}


@SETTINGS
@given(dpo_inputs())
def test_dpo_loss_is_finite_or_refused(case) -> None:
    pc, pr, rc, rr = (x.clone() for x in case["t"])
    pc.requires_grad_(), pr.requires_grad_()
    try:
        out = dpo_loss(pc, pr, rc, rr, beta=case["beta"], mask=case["mask"])
    except ValueError as err:
        msg = str(err)
        event(f"refused: {msg.split(' row')[0]}")
        assert "row" in msg and ("is not finite" in msg or "overflows" in msg), msg
        # refused only for a non-finite input or an implicit reward beyond the dtype
        work = F64 if pc.dtype == F64 else F32
        big = torch.finfo(work).max / 4
        r = [case["beta"] * (a.double() - b.double()) for a, b in ((pc, rc), (pr, rr))]
        safe = case["beta"] <= big and all(bool((x.abs() * len(pc) <= big).all())
                                           for x in (*r, r[0] - r[1]))
        assert not safe, msg
        return
    event(f"computed: mask={case['mask'] is not None}")
    assert _finite(out.loss) and _finite(out.weights)
    _check_metrics(out.metrics)
    if case["mask"] is not None and not bool(case["mask"].any()):
        assert out.loss.item() == 0.0
    else:
        assert abs(out.weights.double().sum().item() - 1.0) < 1e-5
    out.loss.backward()
    assert _finite(pc.grad) and _finite(pr.grad)


# ------------------------------------------------------------------------------- fused
@st.composite
def fused_inputs(draw) -> dict:
    b, h, v = draw(st.integers(1, 4)), draw(st.integers(2, 8)), draw(st.integers(2, 11))
    ta, tb = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([F32, BF16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0, 100.0]))

    def labels(t: int) -> torch.Tensor:
        y = torch.randint(0, v, (b, t), generator=g)
        drop = torch.rand(b, t, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.7]))
        y[drop] = IGNORE
        y[:, -1] = torch.randint(0, v, (b,), generator=g)  # at least one response token
        return y

    rewards, logps = draw(regime(values)), draw(regime(logp_values))
    per_seq = {k: torch.tensor(_ties(draw, b, logps if k.startswith("ref") else rewards),
                               dtype=F64).to(F32)
               for k in ("ref_logps_a", "ref_logps_b", "rewards_a", "rewards_b")}
    hidden_a = (torch.randn(b, ta, h, generator=g) * scale).to(dtype)
    hidden_b = (torch.randn(b, tb, h, generator=g) * scale).to(dtype)
    labels_a, labels_b = labels(ta), labels(tb)
    if draw(st.booleans()):  # b = a: the implicit margin is 0, Δ = r_b − r_a whatever eta
        hidden_b, labels_b, per_seq["ref_logps_b"] = hidden_a, labels_a, per_seq["ref_logps_a"]
    return {
        "hidden_a": hidden_a, "hidden_b": hidden_b,
        "weight": (torch.randn(v, h, generator=g) * scale).to(dtype),
        "labels_a": labels_a, "labels_b": labels_b, **per_seq,
        "eta": draw(etas), "dro": draw(dro_args(b)),
        "all_ignored": draw(st.sampled_from([None, None, None, "labels_a", "labels_b"])),
        "row": draw(st.integers(0, b - 1)),
    }


def _fused_args(case: dict) -> dict:
    keys = ("hidden_a", "hidden_b", "weight", "labels_a", "labels_b", "ref_logps_a",
            "ref_logps_b", "rewards_a", "rewards_b")
    return {k: case[k].clone() for k in keys}


@SETTINGS
@given(fused_inputs())
def test_fused_rebel_loss_is_finite_or_refused(case) -> None:
    a = _fused_args(case)
    if case["all_ignored"]:
        a[case["all_ignored"]][case["row"]] = IGNORE
    for k in ("hidden_a", "hidden_b", "weight"):
        a[k].requires_grad_()
    try:
        out = fused_linear_rebel_loss(*a.values(), eta=case["eta"], impl="torch",
                                      **case["dro"])
    except ValueError as err:
        msg = str(err)
        event(f"refused: {msg.split(' row')[0]}")
        if case["all_ignored"]:
            assert f"{case['all_ignored']} row {case['row']} has no response tokens" in msg
        else:
            assert "row" in msg and "pair" in msg, msg
        return
    assert case["all_ignored"] is None
    event(f"computed: {case['dro']['divergence']} {case['hidden_a'].dtype}")
    assert _finite(out.loss)
    _check_weights(out.weights, case["dro"]["divergence"])
    out.loss.backward()
    for k in ("hidden_a", "hidden_b", "weight"):
        assert _finite(a[k].grad), (k, a[k].grad)


@SETTINGS
@given(fused_inputs())
def test_fused_module_is_finite_or_refused(case) -> None:
    a = _fused_args(case)
    if a["hidden_a"].shape[1] != a["hidden_b"].shape[1]:  # the module stacks [a; b]
        a["hidden_b"] = a["hidden_a"].flip(0)
        a["labels_b"] = a["labels_a"].flip(0)
    if case["all_ignored"]:
        a[case["all_ignored"]][case["row"]] = IGNORE
    b = a["hidden_a"].shape[0]
    hidden = torch.cat([a["hidden_a"], a["hidden_b"]]).requires_grad_()
    weight = a["weight"].requires_grad_()
    labels = torch.cat([a["labels_a"], a["labels_b"]])
    rewards = torch.cat([a["rewards_a"], a["rewards_b"]])
    ref = torch.cat([a["ref_logps_a"], a["ref_logps_b"]])
    module = FusedLinearRebelLoss(eta=case["eta"], impl="torch", **case["dro"])
    try:
        out = module(hidden, weight, labels, rewards, ref)
    except ValueError as err:
        msg = str(err)
        if case["all_ignored"]:
            row = case["row"] + (b if case["all_ignored"] == "labels_b" else 0)
            assert f"labels row {row} has no response tokens" in msg, msg
        else:
            assert "row" in msg and "pair" in msg, msg
        return
    assert case["all_ignored"] is None
    event(f"computed: {case['dro']['divergence']} {hidden.dtype}")
    assert _finite(out.loss)
    _check_weights(out.weights, case["dro"]["divergence"])
    out.loss.backward()
    assert _finite(hidden.grad) and _finite(weight.grad)


def test_fused_empty_batch_is_refused() -> None:
    h, w, y = torch.zeros(0, 3, 4), torch.randn(5, 4), torch.zeros(0, 3, dtype=torch.long)
    e = torch.zeros(0)
    with pytest.raises(ValueError):
        fused_linear_rebel_loss(h, h, w, y, y, e, e, e, e, eta=1.0, impl="torch")


# ------------------------------------------------------------------------------- data parallel
_DP_WORKER = '''
import json, os, sys
import torch
import torch.distributed as dist
from drorebel.losses.dpo import dpo_loss
from drorebel.losses.dro import dro_weights, robust_objective
from drorebel.losses.rebel import rebel_loss

dist.init_process_group("gloo")
rank = dist.get_rank()
x = torch.zeros(3, dtype=torch.float64) - 1.0
bad = x.clone()
if rank == 1:
    bad[2] = float("nan")  # only rank 1 holds a bad pair
errors = {}
calls = {
    "rebel": lambda: rebel_loss(x, x, x, x, bad, x, eta=1.0, divergence="chi2", rho=0.3),
    "dro_weights": lambda: dro_weights(bad, "kl", rho=0.3),
    "robust_objective": lambda: robust_objective(bad, "chi2", rho=0.3),
    "dpo": lambda: dpo_loss(x, bad, x, x, beta=0.1),
}
for name, call in calls.items():
    try:
        call()
        errors[name] = None
    except ValueError as err:
        errors[name] = str(err)
out = [None, None]
dist.all_gather_object(out, errors)  # reached only if no rank hangs in a collective
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # no interpreter finalization: it can abort a finished rank (see dist_workers)
'''


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_data_parallel_ranks_raise_alike(tmp_path) -> None:
    """A NaN on one rank: every rank raises a clear error (the one holding the pair names its
    row and rank) and none is left waiting in a collective."""
    from launch import torchrun_report

    worker = tmp_path / "worker.py"
    worker.write_text(_DP_WORKER)
    per_rank = torchrun_report(worker, tmp_path / "out.json", timeout=180)
    expected = {"rebel": "rewards_a row 2 of rank 1 is not finite",
                "dro_weights": "losses row 2 of rank 1 is not finite",
                "robust_objective": "losses row 2 of rank 1 is not finite",
                "dpo": "rejected_logps row 2 of rank 1 is not finite"}
    for name, text in expected.items():
        assert per_rank[1][name] is not None and per_rank[1][name].startswith(text), \
            (name, per_rank[1][name])
    for name in ("rebel", "dro_weights", "robust_objective"):  # gathered: the same error
        assert per_rank[0][name] == per_rank[1][name]
    assert per_rank[0]["dpo"].startswith("rejected_logps: 1 pair(s) on another rank")
