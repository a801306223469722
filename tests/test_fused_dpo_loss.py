"""Fused DPO baseline (``fused_linear_dpo_loss`` / ``FusedLinearDPOLoss``) on tiny HF models.

Reference: materialised logits → per-sequence sums → ``dpo_loss``; truth: the same on a
float64 copy of the model. Criterion and models: see test_fused_rebel_loss.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_fused_rebel_loss import (
    _collect,
    _good,
    _halves,
    assert_matches,
    hidden_and_head,
    make_batch,
    make_model,
    ref_logps_for,
    reference_seq_logps,
)

from drorebel.losses.dpo import dpo_loss
from drorebel.losses.fused_dpo import FusedLinearDPOLoss, fused_linear_dpo_loss

BETA = 0.5


def run_reference(model, batch, ref_logps) -> dict:
    h, w = hidden_and_head(model, batch)
    lc, lr = _halves(reference_seq_logps(w, h, batch["labels"]))
    out = dpo_loss(lc, lr, *_halves(ref_logps), beta=BETA)
    out.policy_logps_a, out.policy_logps_b = lc, lr
    return _collect(model, out)


def run_fused(model, batch, ref_logps, impl="torch", form="functional") -> dict:
    h, w = hidden_and_head(model, batch)
    if form == "module":
        out = FusedLinearDPOLoss(beta=BETA, impl=impl)(h, w, batch["labels"], ref_logps)
    else:
        (hc, hr), (yc, yr) = _halves(h), _halves(batch["labels"])
        out = fused_linear_dpo_loss(hc, hr, w, yc, yr, *_halves(ref_logps), beta=BETA,
                                    impl=impl)
    return _collect(model, out)


@pytest.mark.parametrize("form", ["functional", "module"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_matches_reference_path(arch: str, dtype: torch.dtype, form: str) -> None:
    model = make_model(arch, dtype)
    batch = make_batch(model.config.vocab_size, seed=7)
    ref_logps = ref_logps_for(model, batch)
    ours = run_fused(model, batch, ref_logps, form=form)
    ref = run_reference(model, batch, ref_logps)
    truth = run_reference(copy.deepcopy(model).double(), batch, ref_logps)
    assert_matches(ours, ref, truth, dtype, 2 * BETA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_path_agrees_with_torch_path(dtype: torch.dtype) -> None:
    model = make_model("llama", dtype)
    batch = make_batch(model.config.vocab_size, n_pairs=2, t=7, seed=8)
    ref_logps = ref_logps_for(model, batch)
    tri = run_fused(model, batch, ref_logps, impl="triton", form="module")
    cpu = run_fused(model, batch, ref_logps, impl="torch", form="module")
    truth = run_reference(copy.deepcopy(model).double(), batch, ref_logps)
    assert_matches(tri, cpu, truth, dtype, 2 * BETA)


def test_hand_worked_value() -> None:
    """H = 1, W = [[0], [1]], h = 1: log π(c = token 1) − log π(r = token 0) = 1, refs 0:
    ℓ = −log σ(β) = log(1 + e^{−β}); dℓ/dW = −β σ(−β)·[(e_1 − p) − (e_0 − p)] = β σ(−β)·(1, −1)."""
    w = torch.tensor([[0.0], [1.0]], dtype=torch.float64, requires_grad=True)
    h = torch.ones(1, 1, 1, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    out = fused_linear_dpo_loss(h, h, w, torch.tensor([[1]]), torch.tensor([[0]]), zero, zero,
                                beta=BETA, impl="torch")
    out.loss.backward()
    s = 1 / (1 + math.exp(BETA))  # σ(−β)
    assert abs(out.loss.item() - math.log1p(math.exp(-BETA))) < 1e-14
    assert torch.allclose(w.grad, torch.tensor([[BETA * s], [-BETA * s]], dtype=torch.float64))
    assert out.metrics["rewards/accuracies"].item() == 1.0


def test_reference_hidden_states() -> None:
    policy, reference = make_model("gpt2", seed=0), make_model("gpt2", seed=1)
    batch = make_batch(policy.config.vocab_size, seed=9)
    h, w = hidden_and_head(policy, batch)
    ref_h, ref_w = hidden_and_head(reference, batch)
    loss_fn = FusedLinearDPOLoss(beta=BETA)
    out = loss_fn(h, w, batch["labels"], ref_hidden=ref_h, ref_weight=ref_w)
    expected = reference_seq_logps(ref_w.detach(), ref_h.detach(), batch["labels"])
    direct = loss_fn(h, w, batch["labels"], expected)
    assert torch.allclose(out.loss, direct.loss, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, -0.1, float("inf"), float("nan")])
def test_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        FusedLinearDPOLoss(beta=beta)


def test_bad_inputs_name_the_argument() -> None:
    a = _good()
    args = [a["hidden_a"], a["hidden_b"], a["weight"], a["labels_a"], a["labels_b"],
            a["ref_logps_a"], a["ref_logps_b"]]
    bad = list(args)
    bad[1] = bad[1][:2]
    with pytest.raises(ValueError, match="hidden_rejected has B=2 rows"):
        fused_linear_dpo_loss(*bad)
    bad = list(args)
    bad[6] = bad[6].clone()
    bad[6][1] = float("nan")
    with pytest.raises(ValueError, match="ref_logps_rejected row 1 is not finite"):
        fused_linear_dpo_loss(*bad)
    bad = list(args)
    bad[3] = bad[3].clone()
    bad[3][0] = 99
    with pytest.raises(ValueError, match="labels_chosen row 0 has a label outside"):
        fused_linear_dpo_loss(*bad)
    with pytest.raises(ValueError, match=r"hidden must be stacked \[2B"):
        FusedLinearDPOLoss()(a["hidden_a"], a["weight"], a["labels_a"], a["ref_logps_a"])
