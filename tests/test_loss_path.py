"""One loss path: the public losses' new options, and the trainer building its loss from them.

- ``dpo_loss(mask=...)`` / ``order_by_reward``: masked pairs carry no loss and no gradient;
  ``FusedLinearDPOLoss(rewards=...)`` equals the hand-ordered functional call.
- ``impl="materialized"`` (full logits) equals the fused path within the fp32 tolerance.
- ``CausalLMWithFusedLoss`` gives reference log-probs (``logps_only``) and token counts, and
  runs the embedding-Wasserstein module.
- ``build_loss`` maps the trainer config onto the public modules.
- The 0.1 argument order still works for one release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import pytest
import torch
from trainer_fixtures.tiny import base_overrides

from drorebel.losses.dpo import dpo_loss, order_by_reward
from drorebel.losses.fused_dpo import FusedLinearDPOLoss, fused_linear_dpo_loss
from drorebel.losses.fused_rebel import FusedLinearRebelLoss, fused_linear_rebel_loss
from drorebel.losses.wasserstein_embeddings import EmbeddingWassersteinRebelLoss
from drorebel.losses.zero3 import CausalLMWithFusedLoss
from drorebel.trainer.config import TrainConfig
from drorebel.trainer.model import build_loss

F64 = torch.float64
IGN = -100


def _pairs(seed: int = 0, b: int = 3, t: int = 5, h: int = 8, v: int = 13, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True)
    ha = torch.randn(b, t, h, generator=g, dtype=dtype, requires_grad=True)
    hb = torch.randn(b, t + 1, h, generator=g, dtype=dtype, requires_grad=True)
    ya = torch.randint(0, v, (b, t), generator=g)
    yb = torch.randint(0, v, (b, t + 1), generator=g)
    ya[:, :2] = IGN  # prompt positions
    yb[0, :] = IGN
    yb[0, -1] = 4  # a one-token response
    ref_a, ref_b = (torch.randn(b, generator=g, dtype=F64) for _ in range(2))
    return w, ha, hb, ya, yb, ref_a, ref_b


def test_dpo_mask_drops_pairs_from_loss_gradient_and_metrics():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(5, generator=g, dtype=F64) for _ in range(4))
    pc.requires_grad_(True)
    keep = torch.tensor([True, False, True, True, False])
    out = dpo_loss(pc, pr, rc, rr, 0.5, mask=keep)
    out.loss.backward()
    assert (pc.grad[~keep] == 0).all() and (pc.grad[keep] != 0).all()
    sub = dpo_loss(pc[keep].detach(), pr[keep], rc[keep], rr[keep], 0.5)
    assert float(out.loss.detach()) == pytest.approx(float(sub.loss), rel=1e-14)
    for k, v in sub.metrics.items():
        assert float(out.metrics[k]) == pytest.approx(float(v), rel=1e-12), k
    assert float(out.metrics["dpo/tie_fraction"]) == pytest.approx(0.4)
    assert "dpo/tie_fraction" not in sub.metrics  # only reported when a mask is given
    torch.testing.assert_close(out.weights, keep.double() / 3)
    none = dpo_loss(pc, pr, rc, rr, 0.5, mask=torch.zeros(5, dtype=torch.bool))
    assert float(none.loss) == 0.0
    with pytest.raises(ValueError, match="mask"):
        dpo_loss(pc, pr, rc, rr, 0.5, mask=torch.ones(4, dtype=torch.bool))


def test_order_by_reward_roles():
    pa, pb, ra_ref, rb_ref = (torch.arange(3.0) + k for k in (0, 10, 20, 30))
    wa, wb = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])
    pc, pr, rc, rr, untied = order_by_reward(pa, pb, ra_ref, rb_ref, wa, wb)
    assert pc.tolist() == [0.0, 11.0, 12.0] and pr.tolist() == [10.0, 1.0, 2.0]
    assert rc.tolist() == [20.0, 31.0, 32.0] and rr.tolist() == [30.0, 21.0, 22.0]
    assert untied.tolist() == [True, True, False]


def test_dpo_module_with_rewards_equals_hand_ordered_functional():
    w, ha, hb, ya, yb, ref_a, ref_b = _pairs(seed=2, t=5)
    hb2, yb2 = hb[:, :5], yb[:, :5].clone()
    yb2[0, -1] = 3  # keep a response token in row 0 after the cut
    wa, wb = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 2.0, 0.5])  # a, b, tie
    mod = FusedLinearDPOLoss(beta=0.4, impl="torch", order_by_reward=True)
    out = mod(torch.cat([ha, hb2]), w, torch.cat([ya, yb2]), torch.cat([ref_a, ref_b]),
              rewards=torch.cat([wa, wb]))
    a_wins = torch.tensor([True, False, False])
    pick = lambda x, y: torch.where(a_wins.view(-1, *[1] * (x.dim() - 1)), x, y)  # noqa: E731
    exp = fused_linear_dpo_loss(pick(ha, hb2), pick(hb2, ha), w, pick(ya, yb2), pick(yb2, ya),
                                pick(ref_a, ref_b), pick(ref_b, ref_a), beta=0.4, impl="torch",
                                mask=torch.tensor([True, True, False]))
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-12, atol=1e-14)
    assert float(out.metrics["dpo/tie_fraction"]) == pytest.approx(1 / 3)
    # policy log-probs keep the input's [a; b] order
    plain = FusedLinearDPOLoss(beta=0.4, impl="torch")(
        torch.cat([ha, hb2]), w, torch.cat([ya, yb2]), torch.cat([ref_a, ref_b]))
    torch.testing.assert_close(out.policy_logps_a, plain.policy_logps_a)
    with pytest.raises(ValueError, match="order_by_reward"):
        mod(torch.cat([ha, hb2]), w, torch.cat([ya, yb2]), torch.cat([ref_a, ref_b]))


@pytest.mark.parametrize("divergence,kw", [("none", {}), ("chi2", {"rho": 0.3}),
                                           ("kl", {"tau": 0.7})])
def test_materialized_impl_equals_fused(divergence, kw):
    w, ha, hb, ya, yb, ref_a, ref_b = _pairs(seed=3, dtype=torch.float32)
    rew = (torch.tensor([1.0, -0.5, 0.2]), torch.tensor([0.0, 0.3, 0.2]))
    outs = {}
    for impl in ("torch", "materialized"):
        out = fused_linear_rebel_loss(ha, hb, w, ya, yb, ref_a.float(), ref_b.float(), *rew,
                                      eta=0.8, divergence=divergence, impl=impl, **kw)
        grads = torch.autograd.grad(out.loss, [w, ha, hb])
        outs[impl] = (out.loss.detach(), *grads)
    for a, b in zip(outs["torch"], outs["materialized"]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match="impl"):
        FusedLinearRebelLoss(1.0, impl="eager")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=17, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).double()


def test_wrapper_logps_tokens_and_embedding_loss():
    model = _tiny_llama()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 17, (4, 6), generator=g)
    labels = ids.clone()
    labels[:, :3] = IGN
    mask = torch.ones_like(ids)
    rew, ref = torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    fused = CausalLMWithFusedLoss(model, FusedLinearRebelLoss(1.0, impl="torch"))
    with torch.no_grad():
        lp = fused(ids, mask, labels, logps_only=True)["logps"]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        tok = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        want = (tok * (labels[:, 1:] != IGN)).sum(-1)
    torch.testing.assert_close(lp, want, rtol=1e-10, atol=1e-10)
    out = fused(ids, mask, labels, rew, ref)
    assert int(out["num_tokens"]) == 12 and out["policy_logps"].shape == (4,)
    emb = CausalLMWithFusedLoss(model, EmbeddingWassersteinRebelLoss(eta=1.0, rho=0.0))
    with torch.no_grad():
        torch.testing.assert_close(emb(ids, mask, labels, logps_only=True)["logps"], want,
                                   rtol=1e-10, atol=1e-10)
    e_out = emb(ids, mask, labels, rew, ref)  # rho = 0: the REBEL loss itself
    torch.testing.assert_close(e_out["loss"], out["loss"], rtol=1e-10, atol=1e-12)
    assert int(e_out["num_tokens"]) == 12


@pytest.mark.parametrize("kw,cls,attrs", [
    ({}, FusedLinearRebelLoss, {"divergence": "none", "impl": "auto", "validate": False}),
    ({"divergence": "chi2", "rho": 0.2, "loss_impl": "materialized"}, FusedLinearRebelLoss,
     {"divergence": "chi2", "rho": 0.2, "impl": "materialized"}),
    ({"divergence": "wasserstein", "rho": 0.3}, FusedLinearRebelLoss,
     {"divergence": "wasserstein", "rho": 0.3}),
    ({"divergence": "wasserstein", "rho": 0.3, "w_target": "embeddings",
      "attn_implementation": "eager"}, EmbeddingWassersteinRebelLoss, {"rho": 0.3}),
    ({"loss": "dpo", "beta": 0.25}, FusedLinearDPOLoss,
     {"beta": 0.25, "impl": "auto", "order_by_reward": True}),
])
def test_trainer_builds_the_public_loss(tmp_path, kw, cls, attrs):
    loss = build_loss(TrainConfig.from_dict(base_overrides(str(tmp_path), **kw)))
    assert type(loss) is cls
    for k, v in attrs.items():
        assert getattr(loss, k) == v, k


def test_old_argument_order_warns_and_agrees():
    w, ha, hb, ya, yb, ref_a, ref_b = _pairs(seed=5)
    rew = (torch.tensor([1.0, -0.5, 0.2], dtype=F64), torch.tensor([0.0, 0.3, 0.1], dtype=F64))
    new = fused_linear_rebel_loss(ha, hb, w, ya, yb, ref_a, ref_b, *rew, eta=1.0, impl="torch")
    with pytest.warns(DeprecationWarning, match="argument order"):
        old = fused_linear_rebel_loss(w, ha, ya, hb, yb, ref_a, ref_b, *rew, eta=1.0,
                                      impl="torch")
    torch.testing.assert_close(old.loss, new.loss, rtol=0, atol=0)
    hb2, yb2 = hb[:, :5], ya.flip(0)
    mod = FusedLinearRebelLoss(1.0, impl="torch")
    stacked = (torch.cat([ha, hb2]), torch.cat([ya, yb2]))
    ref = torch.cat([ref_a, ref_b])
    new_m = mod(stacked[0], w, stacked[1], torch.cat(rew), ref)
    with pytest.warns(DeprecationWarning, match="argument order"):
        old_m = mod(w, stacked[0], stacked[1], torch.cat(rew), ref)
    torch.testing.assert_close(old_m.loss, new_m.loss, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="argument order"):
        old_d = fused_linear_dpo_loss(w, ha, ya, hb, yb, ref_a, ref_b, impl="torch")
    new_d = fused_linear_dpo_loss(ha, hb, w, ya, yb, ref_a, ref_b, impl="torch")
    torch.testing.assert_close(old_d.loss, new_d.loss, rtol=0, atol=0)
