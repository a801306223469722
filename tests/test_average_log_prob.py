"""``average_log_prob=True`` of the fused losses: per-token mean log-probs.

Each sequence's summed log-prob is divided by its number of response tokens (labels
``!= ignore_index``). Checked by hand on a case whose log-probs are known in closed form, against
materialised float64 logits (value and gradients) for REBEL, χ², DPO and the Wasserstein
penalty, and with ``torch.autograd.gradcheck``. The default (``False``) is unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch

import drorebel
from drorebel.losses.dpo import dpo_loss
from drorebel.losses.rebel import rebel_loss, rebel_residuals
from drorebel.reference.wasserstein import wasserstein_rebel_objective

F64 = torch.float64
IGN = -100


def _problem(n=3, ta=5, tb=4, h=6, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    ya = torch.randint(0, v, (n, ta), generator=g)
    yb = torch.randint(0, v, (n, tb), generator=g)
    ya[:, :2] = IGN  # prompt positions
    ya[1, -1] = IGN  # padding: rows of a have 3 or 2 response tokens
    yb[0, :] = IGN
    yb[0, -1] = 4  # a one-token response
    return {"w": mk(v, h), "ha": mk(n, ta, h), "hb": mk(n, tb, h), "ya": ya, "yb": yb,
            "ref_a": mk(n) - 1, "ref_b": mk(n) - 1, "ra": mk(n), "rb": mk(n)}


def _mean_logps(h, w, y):
    """Materialised float64 per-token mean of log softmax(W h)[y] over the response tokens."""
    lp = (h @ w.t()).log_softmax(-1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ok = y != IGN
    return torch.where(ok, lp, 0.0).sum(-1) / ok.sum(-1)


def _leaves(pb):
    return [pb[k].clone().requires_grad_() for k in ("w", "ha", "hb")]


def _compare(ours, truth):
    for name, a, b in zip(("value", "dW", "dHa", "dHb"), ours, truth):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    assert truth[1].abs().max() > 1e-4  # gradients are not vacuous


def test_hand_checkable_uniform_logits():
    """Zero hidden states: every token has log-prob −log V. The sum over n tokens is
    −n·log V; the mean is −log V whatever n, so the residual is −(r_a − r_b) exactly."""
    v, h = 4, 3
    w = torch.randn(v, h, dtype=F64)
    ha, hb = torch.zeros(2, 5, h, dtype=F64), torch.zeros(2, 5, h, dtype=F64)
    ya = torch.tensor([[IGN, IGN, 1, 2, 3], [IGN, 0, 0, IGN, IGN]])  # 3 and 2 tokens
    yb = torch.tensor([[IGN, IGN, IGN, IGN, 1], [IGN, 1, 2, 3, 0]])  # 1 and 4 tokens
    ref, ra, rb = torch.zeros(2, dtype=F64), torch.tensor([1.0, 2.0], dtype=F64), \
        torch.tensor([0.5, -1.0], dtype=F64)
    out = drorebel.fused_linear_rebel_loss(ha, hb, w, ya, yb, ref, ref, ra, rb, eta=1.0,
                                           average_log_prob=True, impl="torch")
    logv = math.log(v)
    torch.testing.assert_close(out.policy_logps_a, torch.full((2,), -logv, dtype=F64))
    torch.testing.assert_close(out.policy_logps_b, torch.full((2,), -logv, dtype=F64))
    # Δ = (−log V + log V) − (r_a − r_b) = (−0.5, −3) → mean Δ² = (0.25 + 9) / 2
    torch.testing.assert_close(out.loss, torch.tensor(4.625, dtype=F64))
    summed = drorebel.fused_linear_rebel_loss(ha, hb, w, ya, yb, ref, ref, ra, rb, eta=1.0,
                                              impl="torch")
    torch.testing.assert_close(summed.policy_logps_a, torch.tensor([-3 * logv, -2 * logv],
                                                                   dtype=F64))


@pytest.mark.parametrize("divergence,rho", [("none", None), ("chi2", 0.5), ("kl", 0.2)])
def test_rebel_matches_materialised_float64(divergence, rho):
    pb = _problem(seed=1)
    eta = 0.7
    w, ha, hb = _leaves(pb)
    truth_out = rebel_loss(_mean_logps(ha, w, pb["ya"]), _mean_logps(hb, w, pb["yb"]),
                           pb["ref_a"], pb["ref_b"], pb["ra"], pb["rb"], eta=eta,
                           divergence=divergence, rho=rho)
    truth = (truth_out.loss.detach(), *torch.autograd.grad(truth_out.loss, (w, ha, hb)))
    for impl in ("torch", "auto"):
        w, ha, hb = _leaves(pb)
        out = drorebel.fused_linear_rebel_loss(
            ha, hb, w, pb["ya"], pb["yb"], pb["ref_a"], pb["ref_b"], pb["ra"], pb["rb"],
            eta=eta, divergence=divergence, rho=rho, impl=impl, average_log_prob=True)
        _compare((out.loss.detach(), *torch.autograd.grad(out.loss, (w, ha, hb))), truth)
        torch.testing.assert_close(out.weights, truth_out.weights)


def test_module_stacked_and_ref_hidden_agree_with_functional():
    pb = _problem(seed=2, ta=4, tb=4)
    eta = 1.3
    w, ha, hb = _leaves(pb)
    fn = drorebel.fused_linear_rebel_loss(
        ha, hb, w, pb["ya"], pb["yb"], pb["ref_a"], pb["ref_b"], pb["ra"], pb["rb"], eta=eta,
        divergence="chi2", rho=0.3, impl="torch", average_log_prob=True)
    mod = drorebel.FusedLinearRebelLoss(eta=eta, divergence="chi2", rho=0.3, impl="torch",
                                        average_log_prob=True)
    w2, ha2, hb2 = _leaves(pb)
    h, y = torch.cat([ha2, hb2]), torch.cat([pb["ya"], pb["yb"]])
    out = mod(h, w2, y, torch.cat([pb["ra"], pb["rb"]]), torch.cat([pb["ref_a"], pb["ref_b"]]))
    torch.testing.assert_close(out.loss, fn.loss, rtol=1e-12, atol=1e-12)
    pair = mod.forward_pairs(ha2, hb2, w2, pb["ya"], pb["yb"], pb["ref_a"], pb["ref_b"],
                             pb["ra"], pb["rb"])
    torch.testing.assert_close(pair.loss, fn.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mod.sequence_logps(h, w2, y), _mean_logps(h, w2, y))
    # ref_hidden: the reference log-probs are averaged with the policy's rule
    ref_h = torch.randn(h.shape, dtype=F64, generator=torch.Generator().manual_seed(9))
    via_hidden = mod(h, w2, y, torch.cat([pb["ra"], pb["rb"]]), ref_hidden=ref_h)
    explicit = mod(h, w2, y, torch.cat([pb["ra"], pb["rb"]]), _mean_logps(ref_h, w2, y).detach())
    torch.testing.assert_close(via_hidden.loss, explicit.loss, rtol=1e-12, atol=1e-12)


def test_dpo_matches_materialised_float64():
    pb = _problem(seed=3, ta=5, tb=5)
    w, ha, hb = _leaves(pb)
    t = dpo_loss(_mean_logps(ha, w, pb["ya"]), _mean_logps(hb, w, pb["yb"]), pb["ref_a"],
                 pb["ref_b"], beta=0.4)
    truth = (t.loss.detach(), *torch.autograd.grad(t.loss, (w, ha, hb)))
    w, ha, hb = _leaves(pb)
    out = drorebel.fused_linear_dpo_loss(ha, hb, w, pb["ya"], pb["yb"], pb["ref_a"], pb["ref_b"],
                                         beta=0.4, impl="torch", average_log_prob=True)
    _compare((out.loss.detach(), *torch.autograd.grad(out.loss, (w, ha, hb))), truth)
    mod = drorebel.FusedLinearDPOLoss(beta=0.4, impl="torch", average_log_prob=True)
    w, ha, hb = _leaves(pb)
    stacked = mod(torch.cat([ha, hb]), w, torch.cat([pb["ya"], pb["yb"]]),
                  torch.cat([pb["ref_a"], pb["ref_b"]]))
    _compare((stacked.loss.detach(), *torch.autograd.grad(stacked.loss, (w, ha, hb))), truth)


@pytest.mark.parametrize("rho", [0.0, 0.4])
def test_wasserstein_matches_double_backward_oracle(rho):
    """The penalty of the averaged log-probs: ‖∇_h ℓ_i‖² uses S_a/n_a² + S_b/n_b²."""
    pb = _problem(seed=4)
    eta = 0.8
    w, ha, hb = _leaves(pb)
    resid = rebel_residuals(_mean_logps(ha, w, pb["ya"]), _mean_logps(hb, w, pb["yb"]),
                            pb["ref_a"], pb["ref_b"], pb["ra"], pb["rb"], eta)
    val = wasserstein_rebel_objective(resid * resid, [ha, hb], rho)
    truth = (val.detach(), *torch.autograd.grad(val, (w, ha, hb)))
    w, ha, hb = _leaves(pb)
    out = drorebel.fused_linear_rebel_loss(
        ha, hb, w, pb["ya"], pb["yb"], pb["ref_a"], pb["ref_b"], pb["ra"], pb["rb"], eta=eta,
        divergence="wasserstein", rho=rho, impl="torch", average_log_prob=True)
    _compare((out.loss.detach(), *torch.autograd.grad(out.loss, (w, ha, hb))), truth)
    mod = drorebel.FusedLinearRebelLoss(eta=eta, divergence="wasserstein", rho=rho,
                                        impl="torch", average_log_prob=True)
    w, ha, hb = _leaves(pb)
    tb = pb["ya"].shape[1]
    pad = torch.full((hb.shape[0], tb - hb.shape[1]), IGN)  # stack a and b: pad b to a's T
    h = torch.cat([ha, torch.cat([hb, torch.zeros(hb.shape[0], tb - hb.shape[1], hb.shape[2],
                                                  dtype=F64)], 1)])
    stacked = mod(h, w, torch.cat([pb["ya"], torch.cat([pb["yb"], pad], 1)]),
                  torch.cat([pb["ra"], pb["rb"]]), torch.cat([pb["ref_a"], pb["ref_b"]]))
    grads = torch.autograd.grad(stacked.loss, (w, ha, hb))
    _compare((stacked.loss.detach(), *grads), truth)


def test_gradcheck_float64():
    pb = _problem(n=2, ta=3, tb=3, h=3, v=5, seed=5)

    def f(w, ha, hb):
        return drorebel.fused_linear_rebel_loss(
            ha, hb, w, pb["ya"], pb["yb"], pb["ref_a"], pb["ref_b"], pb["ra"], pb["rb"],
            eta=0.9, divergence="chi2", rho=0.3, impl="torch", average_log_prob=True,
            validate=False).loss

    assert torch.autograd.gradcheck(f, tuple(_leaves(pb)), eps=1e-6, atol=1e-7)


def test_default_is_unchanged():
    """``average_log_prob=False`` (the default) is the summed log-prob, bit for bit."""
    pb = _problem(seed=6)
    args = (pb["ha"], pb["hb"], pb["w"], pb["ya"], pb["yb"], pb["ref_a"], pb["ref_b"], pb["ra"],
            pb["rb"])
    base = drorebel.fused_linear_rebel_loss(*args, eta=1.0, divergence="chi2", rho=0.5)
    off = drorebel.fused_linear_rebel_loss(*args, eta=1.0, divergence="chi2", rho=0.5,
                                           average_log_prob=False)
    assert torch.equal(base.loss, off.loss)
    assert torch.equal(base.policy_logps_a, drorebel.linear_sequence_logps(pb["ha"], pb["w"],
                                                                           pb["ya"]))
