"""Fused Wasserstein DRO-REBEL (hidden-state penalty) vs the double-backward oracle, float64.

Ground truth: ℓ_i from materialised logits, penalty from ``wasserstein_rebel_objective`` (one
``autograd.grad(create_graph=True)`` w.r.t. the hidden states as leaves), full second-order
gradients w.r.t. hidden states and the LM head.
"""

from __future__ import annotations

import pytest
import torch
from alloc_probe import LargestTensor
from launch import torchrun_report

from drorebel.losses.rebel import rebel_loss, rebel_residuals
from drorebel.losses.wasserstein import fused_linear_wasserstein_rebel_loss
from drorebel.losses.wasserstein_embeddings import embedding_wasserstein_rebel_loss
from drorebel.ops.linear_wgrad import linear_logps_wgrad
from drorebel.ops.wgrad_chunked import wgrad_chunked_backward, wgrad_chunked_forward
from drorebel.reference.wasserstein import wasserstein_rebel_objective

F64 = torch.float64
IGN = -100


def _tok_reference(h, w, y, temperature):
    """Materialised float64 (logp, q) per token with autograd (the oracle of the op)."""
    z = h @ w.t() / temperature
    p = z.softmax(-1)
    ys = y.clamp_min(0)
    d = w[ys] - p @ w
    ok = y != IGN
    lp = z.log_softmax(-1).gather(-1, ys.unsqueeze(-1)).squeeze(-1)
    return torch.where(ok, lp, 0.0), torch.where(ok, (d * d).sum(-1), 0.0)


def _problem(n=3, ta=5, tb=4, h=6, v=13, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    ya = torch.randint(0, v, (n, ta), generator=g)
    yb = torch.randint(0, v, (n, tb), generator=g)
    ya[:, :2] = IGN  # prompt positions
    yb[0, :] = IGN
    yb[0, -1] = 3  # a one-token response
    return {"w": mk(v, h) * scale, "ha": mk(n, ta, h), "hb": mk(n, tb, h), "ya": ya, "yb": yb,
            "ref_a": mk(n) - 5, "ref_b": mk(n) - 5, "ra": mk(n), "rb": mk(n)}


def _oracle(pb, eta, rho, temperature):
    w, ha, hb = (pb[k].clone().requires_grad_() for k in ("w", "ha", "hb"))
    lpa = _tok_reference(ha, w, pb["ya"], temperature)[0].sum(-1)
    lpb = _tok_reference(hb, w, pb["yb"], temperature)[0].sum(-1)
    resid = rebel_residuals(lpa, lpb, pb["ref_a"], pb["ref_b"], pb["ra"], pb["rb"], eta)
    val = wasserstein_rebel_objective(resid * resid, [ha, hb], rho)
    return (val.detach(), *torch.autograd.grad(val, (w, ha, hb)))


def _fused(pb, eta, rho, temperature):
    w, ha, hb = (pb[k].clone().requires_grad_() for k in ("w", "ha", "hb"))
    out = fused_linear_wasserstein_rebel_loss(
        ha, hb, w, pb["ya"], pb["yb"], pb["ref_a"], pb["ref_b"], pb["ra"], pb["rb"],
        eta=eta, rho=rho, temperature=temperature, impl="torch")
    return (out.loss.detach(), *torch.autograd.grad(out.loss, (w, ha, hb))), out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("rho", [0.0, 0.3, 2.0])
def test_op_matches_materialised_autograd(temperature, rho):
    pb = _problem(seed=1)
    h, w, y = pb["ha"].reshape(-1, 6), pb["w"], pb["ya"].reshape(-1)
    g = torch.Generator().manual_seed(5)
    g1, g2 = torch.randn(y.numel(), generator=g, dtype=F64), torch.randn(y.numel(), generator=g,
                                                                           dtype=F64) * (1 + rho)
    res = []
    for fn in (lambda a, b: _tok_reference(a, b, y, temperature),
               lambda a, b: linear_logps_wgrad(a, b, y, temperature=temperature, impl="torch")):
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, q = fn(a, b)
        res.append((lp, q, *torch.autograd.grad((lp * g1).sum() + (q * g2).sum(), (a, b))))
    for ref, ours in zip(*res):
        torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
    assert res[0][3].abs().max() > 1e-3  # gradients are not vacuous


def test_q_gradient_formula_by_hand():
    """q alone, V = 2, H = 1: q = (W_y − μ)², hand derivative of the closed form."""
    w = torch.tensor([[1.0], [3.0]], dtype=F64, requires_grad=True)
    h = torch.tensor([[0.5]], dtype=F64, requires_grad=True)
    y = torch.tensor([0])
    _, q = linear_logps_wgrad(h, w, y, impl="torch")
    p1 = torch.sigmoid(torch.tensor(2 * 0.5, dtype=F64))  # p(v=1) = σ(z1 − z0) = σ(1)
    # μ = 1 + 2 p1, d = −2 p1, q = 4 p1²; dq/dh = 8 p1 · p1(1−p1) · (3 − 1)
    torch.testing.assert_close(q, (4 * p1**2).reshape(1))
    (dh,) = torch.autograd.grad(q.sum(), h)
    torch.testing.assert_close(dh, (16 * p1**2 * (1 - p1)).reshape(1, 1))


@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
def test_chunking_invariant(chunk_rows):
    pb = _problem(seed=2)
    h, w, y = pb["hb"].reshape(-1, 6), pb["w"], pb["yb"].reshape(-1)
    lp, q, lse, mu = wgrad_chunked_forward(h, w, y, IGN, 0.9, chunk_rows=chunk_rows)
    lp0, q0, lse0, mu0 = wgrad_chunked_forward(h, w, y, IGN, 0.9, chunk_rows=1000)
    torch.testing.assert_close((lp, q), (lp0, q0), rtol=1e-13, atol=1e-13)
    g = torch.ones_like(lp)
    dh, dw = wgrad_chunked_backward(g, g, h, w, y, lse, mu, IGN, 0.9, chunk_rows=chunk_rows)
    dh0, dw0 = wgrad_chunked_backward(g, g, h, w, y, lse0, mu0, IGN, 0.9, chunk_rows=1000)
    torch.testing.assert_close((dh, dw), (dh0, dw0), rtol=1e-12, atol=1e-12)
    assert dh[y == IGN].abs().max() == 0


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("rho,eta", [(0.0, 1.0), (0.25, 1.0), (1.5, 0.5)])
def test_loss_matches_double_backward_oracle(rho, eta, temperature):
    pb = _problem(seed=3)
    truth = _oracle(pb, eta, rho, temperature)
    ours, out = _fused(pb, eta, rho, temperature)
    for name, a, b in zip(("value", "dW", "dHa", "dHb"), ours, truth):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    assert truth[1].abs().max() > 1e-3
    pen = out.metrics["wasserstein/penalty"]
    torch.testing.assert_close(out.metrics["dro/robust_objective"], ours[0])
    torch.testing.assert_close(pen, rho * out.metrics["wasserstein/grad_norm_rms"])
    assert (pen > 0) == (rho > 0)


def test_rho_zero_equals_rebel():
    pb = _problem(seed=4)
    _, out = _fused(pb, 0.8, 0.0, 1.0)
    base = rebel_loss(out.policy_logps_a, out.policy_logps_b, pb["ref_a"], pb["ref_b"], pb["ra"],
                      pb["rb"], eta=0.8)
    torch.testing.assert_close(out.loss, base.loss)


def test_penalty_changes_gradient():
    """The penalty's second-order terms matter: ρ > 0 moves dW by more than rounding."""
    pb = _problem(seed=6)
    g0 = _fused(pb, 1.0, 0.0, 1.0)[0][1]
    g1 = _fused(pb, 1.0, 0.5, 1.0)[0][1]
    assert (g1 - g0).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_finite(dtype):
    pb = _problem(seed=7, scale=300.0)
    w, ha, hb = (pb[k].to(dtype).requires_grad_() for k in ("w", "ha", "hb"))
    out = fused_linear_wasserstein_rebel_loss(
        ha, hb, w, pb["ya"], pb["yb"], pb["ref_a"].float(), pb["ref_b"].float(), pb["ra"].float(),
        pb["rb"].float(), eta=1.0, rho=0.5)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for t in (w, ha, hb):
        assert t.grad.dtype == dtype and torch.isfinite(t.grad.float()).all()


def test_fp32_close_to_float64():
    pb = _problem(seed=8)
    truth = _oracle(pb, 1.0, 0.4, 1.0)
    pf = {k: (v.float() if v.is_floating_point() else v) for k, v in pb.items()}
    ours, _ = _fused(pf, 1.0, 0.4, 1.0)
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_validation():
    pb = _problem()
    args = (pb["ha"], pb["hb"], pb["w"], pb["ya"], pb["yb"], pb["ref_a"], pb["ref_b"], pb["ra"],
            pb["rb"])
    with pytest.raises(ValueError, match="rho"):
        fused_linear_wasserstein_rebel_loss(*args, eta=1.0, rho=-1.0)
    with pytest.raises(ValueError, match="w_target"):
        fused_linear_wasserstein_rebel_loss(*args, eta=1.0, rho=1.0, w_target="embeddings")
    with pytest.raises(TypeError, match="dtype"):  # float64 has the chunked path only
        linear_logps_wgrad(pb["ha"], pb["w"], pb["ya"], impl="triton")


class _TinyLM(torch.nn.Module):
    """Per-position LM (no mixing across the batch): embeddings -> tanh MLP with a causal sum."""

    def __init__(self, v=11, e=4):
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.emb = torch.nn.Embedding(v, e).to(F64)
        self.lin = torch.nn.Linear(e, e).to(F64)
        self.head = torch.nn.Linear(e, v, bias=False).to(F64)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=F64)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, inputs_embeds, attention_mask=None):
        x = torch.tanh(self.lin(inputs_embeds.cumsum(1)))
        return type("Out", (), {"logits": self.head(x)})()


def test_embedding_penalty_matches_oracle():
    model = _TinyLM()
    g = torch.Generator().manual_seed(10)
    ia, ib = torch.randint(0, 11, (3, 5), generator=g), torch.randint(0, 11, (3, 4), generator=g)
    la, lb = ia.roll(-1, 1), ib.roll(-1, 1)
    la[:, -1] = IGN
    lb[:, :2] = IGN
    ref_a, ref_b, ra, rb = (torch.randn(3, generator=g, dtype=F64) for _ in range(4))
    out = embedding_wasserstein_rebel_loss(model, ia, ib, None, None, la, lb, ref_a, ref_b, ra,
                                           rb, eta=1.0, rho=0.7)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    ea = model.emb(ia).detach().requires_grad_()
    eb = model.emb(ib).detach().requires_grad_()
    # oracle through explicit embeddings (gradient w.r.t. the table excluded: compare lin/head)
    lp = []
    for e, lab in ((ea, la), (eb, lb)):
        logp = model(e).logits.log_softmax(-1)
        lp.append(torch.where(lab != IGN, logp.gather(-1, lab.clamp_min(0)[..., None])[..., 0],
                              0.0).sum(-1))
    resid = rebel_residuals(lp[0], lp[1], ref_a, ref_b, ra, rb, 1.0)
    val = wasserstein_rebel_objective(resid * resid, [ea, eb], 0.7)
    torch.testing.assert_close(out.loss.detach(), val.detach(), rtol=1e-12, atol=1e-12)
    ref_grads = torch.autograd.grad(val, [model.lin.weight, model.head.weight])
    for a, b in zip(grads[1:], [ref_grads[0], None, ref_grads[1]]):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert out.metrics["wasserstein/penalty"] > 0


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_two_ranks_equal_one_process(tmp_path):
    from pathlib import Path

    worker = Path(__file__).parent / "dist_workers" / "wgrad_worker.py"
    out = tmp_path / "report.json"
    rep = torchrun_report(worker, out)
    assert rep["world"] == 2 and rep["grad_scale"] > 1e-3 and rep["penalty_scale"] > 1e-3
    for key, diff in rep.items():
        if key not in ("world", "grad_scale", "penalty_scale"):
            assert diff <= 1e-10, (key, diff)


def test_chunked_path_has_no_n_times_v_tensor():
    """Every ATen output stays within one chunk; the materialised oracle is the positive control."""
    v, hdim, rows = 2048, 8, 300
    n = 2 * rows + 37
    g = torch.Generator().manual_seed(12)
    h, w = torch.randn(n, hdim, generator=g), torch.randn(v, hdim, generator=g) * 0.3
    y = torch.randint(0, v, (n,), generator=g)
    with LargestTensor() as rec:
        lp, q, lse, mu = wgrad_chunked_forward(h, w, y, IGN, 1.0, chunk_rows=rows)
        wgrad_chunked_backward(lp * 0 + 1, q * 0 + 1, h, w, y, lse, mu, IGN, 1.0,
                               chunk_rows=rows)
    assert 0 < rec.largest <= rows * v < n * v
    with LargestTensor() as ctrl:
        _tok_reference(h, w, y, 1.0)
    assert ctrl.largest >= n * v


# ---- divergence="wasserstein" in the fused REBEL API (functional and nn.Module) ----


def _grads_of(fn, pb, keys=("w", "ha", "hb")):
    leaves = [pb[k].clone().requires_grad_() for k in keys]
    out = fn(*leaves)
    return out, torch.autograd.grad(out.loss, leaves)


def _per(pb):
    return pb["ref_a"], pb["ref_b"], pb["ra"], pb["rb"]


@pytest.mark.parametrize("rho", [0.0, 0.4])
def test_fused_rebel_api_wasserstein_matches_oracle(rho):
    from drorebel.losses.fused_rebel import fused_linear_rebel_loss

    pb = _problem(seed=11)
    truth = _oracle(pb, 0.7, rho, 1.0)
    out, grads = _grads_of(lambda w, ha, hb: fused_linear_rebel_loss(
        ha, hb, w, pb["ya"], pb["yb"], *_per(pb), eta=0.7, divergence="wasserstein", rho=rho,
        impl="torch"), pb)
    for name, a, b in zip(("value", "dW", "dHa", "dHb"), (out.loss, *grads), truth):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-10, msg=name)
    if rho == 0.0:  # ρ = 0 is REBEL: value and gradients of divergence="none"
        base, base_grads = _grads_of(lambda w, ha, hb: fused_linear_rebel_loss(
            ha, hb, w, pb["ya"], pb["yb"], *_per(pb), eta=0.7, impl="torch"), pb)
        torch.testing.assert_close(out.loss, base.loss, rtol=1e-13, atol=1e-13)
        for a, b in zip(grads, base_grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    else:
        assert out.metrics["wasserstein/penalty"] > 1e-3


def test_module_stacked_equals_functional():
    from drorebel.losses.fused_rebel import FusedLinearRebelLoss

    pb = _problem(seed=12, ta=5, tb=5)
    mod = FusedLinearRebelLoss(eta=0.9, divergence="wasserstein", rho=0.3, impl="torch")
    assert "divergence='wasserstein'" in repr(mod)
    stacked, g1 = _grads_of(lambda w, ha, hb: mod(
        torch.cat([ha, hb]), w, torch.cat([pb["ya"], pb["yb"]]),
        torch.cat([pb["ra"], pb["rb"]]), torch.cat([pb["ref_a"], pb["ref_b"]])), pb)
    pairs, g2 = _grads_of(lambda w, ha, hb: mod.forward_pairs(
        ha, hb, w, pb["ya"], pb["yb"], *_per(pb)), pb)
    torch.testing.assert_close(stacked.loss, pairs.loss, rtol=1e-13, atol=1e-13)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for key in ("wasserstein/penalty", "dro/robust_objective", "rebel/residual_mean"):
        if key in pairs.metrics:
            torch.testing.assert_close(stacked.metrics[key], pairs.metrics[key])


def test_embedding_module_stacked_equals_functional():
    from drorebel.losses.fused_rebel import FusedLinearRebelLoss
    from drorebel.losses.wasserstein_embeddings import EmbeddingWassersteinRebelLoss

    model = _TinyLM()
    g = torch.Generator().manual_seed(13)
    ids = torch.randint(0, 11, (4, 5), generator=g)
    lab = ids.roll(-1, 1)
    lab[:, -1] = IGN
    ref, rew = torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    mod = EmbeddingWassersteinRebelLoss(eta=1.0, rho=0.5)
    out = mod(model, ids, None, lab, rew, ref)
    exp = embedding_wasserstein_rebel_loss(model, ids[:2], ids[2:], None, None, lab[:2], lab[2:],
                                           ref[:2], ref[2:], rew[:2], rew[2:], eta=1.0, rho=0.5)
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-13, atol=1e-13)
    assert out.metrics["wasserstein/penalty"] > 0
    with pytest.raises(ValueError, match="EmbeddingWassersteinRebelLoss"):
        FusedLinearRebelLoss(eta=1.0, divergence="wasserstein", rho=0.5, w_target="embeddings")
    with pytest.raises(ValueError, match="0/1"):  # the 0.1 order put labels where masks go
        embedding_wasserstein_rebel_loss(model, ids[:2], ids[2:], lab[:2], lab[2:], lab[:2],
                                         lab[2:], ref[:2], ref[2:], rew[:2], rew[2:], eta=1.0,
                                         rho=0.5)


def test_fused_rebel_api_validation():
    from drorebel.losses.fused_rebel import FusedLinearRebelLoss, fused_linear_rebel_loss

    pb = _problem()
    args = (pb["ha"], pb["hb"], pb["w"], pb["ya"], pb["yb"], *_per(pb))
    with pytest.raises(ValueError, match="EmbeddingWassersteinRebelLoss"):
        fused_linear_rebel_loss(*args, eta=1.0, divergence="wasserstein", rho=0.1,
                                w_target="embeddings")
    for kw, msg in ((dict(rho=None), "rho"), (dict(rho=-0.1), "rho"),
                    (dict(rho=0.1, tau=1.0), "tau"), (dict(rho=0.1, w_target="logits"),
                                                      "w_target")):
        with pytest.raises(ValueError, match=msg):
            fused_linear_rebel_loss(*args, eta=1.0, divergence="wasserstein", **kw)
        with pytest.raises(ValueError, match=msg):
            FusedLinearRebelLoss(eta=1.0, divergence="wasserstein", **kw)
    with pytest.raises(ValueError, match="w_target"):
        FusedLinearRebelLoss(eta=1.0, divergence="chi2", rho=0.1, w_target="embeddings")


@pytest.mark.parametrize("rho,temperature", [(0.0, 1.0), (0.8, 1.0), (0.5, 0.7)])
def test_fused_wdpo_matches_reference(rho, temperature):
    """Fused WDPO (hidden-state z) vs ``wdpo_loss`` on materialised float64 log-probs."""
    from drorebel.losses.dpo import wdpo_loss
    from drorebel.losses.wasserstein import fused_linear_wdpo_loss

    pb = _problem(seed=14)

    def reference(w, ha, hb):
        lpa = _tok_reference(ha, w, pb["ya"], temperature)[0].sum(-1)
        lpb = _tok_reference(hb, w, pb["yb"], temperature)[0].sum(-1)
        return wdpo_loss(lpa, lpb, pb["ref_a"], pb["ref_b"], beta=0.5, rho=rho, z=[ha, hb])

    truth, tg = _grads_of(reference, pb)
    ours, og = _grads_of(lambda w, ha, hb: fused_linear_wdpo_loss(
        ha, hb, w, pb["ya"], pb["yb"], pb["ref_a"], pb["ref_b"], beta=0.5, rho=rho,
        temperature=temperature, impl="torch"), pb)
    torch.testing.assert_close(ours.loss, truth.loss, rtol=1e-11, atol=1e-11)
    for name, a, b in zip(("dW", "dHa", "dHb"), og, tg):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    for key in ("wdpo/penalty", "wdpo/grad_sq_norm_mean", "rewards/margins"):
        torch.testing.assert_close(ours.metrics[key], truth.metrics[key], rtol=1e-10, atol=1e-12)
    assert (ours.metrics["wdpo/penalty"] > 0) == (rho > 0)


def test_autocast_runs_the_head_in_the_autocast_dtype():
    """Under CPU autocast(bf16) the fused penalty sees bf16 inputs (as F.linear would) and
    returns fp32 gradients for fp32 leaves; the value is close to the bf16-input loss."""
    pb = _problem(seed=15)
    pf = {k: (v.float() if v.is_floating_point() else v) for k, v in pb.items()}
    w, ha, hb = (pf[k].clone().requires_grad_() for k in ("w", "ha", "hb"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_wasserstein_rebel_loss(ha, hb, w, pf["ya"], pf["yb"], *_per(pf),
                                                  eta=1.0, rho=0.3, impl="torch")
    out.loss.backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
    rounded = {k: (v.bfloat16().double() if k in ("w", "ha", "hb") else v) for k, v in pb.items()}
    exp = _oracle(rounded, 1.0, 0.3, 1.0)[0]
    plain = _oracle(pb, 1.0, 0.3, 1.0)[0]
    assert abs(out.loss.item() - exp.item()) < 1e-4 * max(1.0, exp.item())
    assert abs(plain.item() - exp.item()) > abs(out.loss.item() - exp.item())  # bf16 was used
