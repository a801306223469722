"""Group-level DRO wired through the fused losses and the trainer: ``groups=`` of
``fused_linear_rebel_loss`` / ``FusedLinearRebelLoss`` / ``CausalLMWithFusedLoss`` equals
``rebel_loss(groups=...)`` on the same log-probs; ``dro_over: groups`` with a ``group`` column
trains, logs the group metrics, differs from ``dro_over: pairs`` and resumes exactly; bad
settings and bad ``group`` values are one line each."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from trainer_fixtures.tiny import TINY_MODEL, base_overrides, build_tokenizer, write_pairs

import drorebel
from drorebel.losses.rebel import rebel_loss
from drorebel.losses.zero3 import CausalLMWithFusedLoss
from drorebel.trainer.checkpoint import latest_checkpoint
from drorebel.trainer.config import ConfigError, TrainConfig
from drorebel.trainer.data import DataError, load_rows, normalise_rows, tokenise_pairs
from drorebel.trainer.errors import UserError
from drorebel.trainer.loop import train
from drorebel.trainer.metrics import read_jsonl

F64 = torch.float64
GROUPS = torch.tensor([0, 0, 1, 2, 1, 0])
B, T, H, V = 6, 5, 8, 11
# TrainConfig(model="m").fingerprint() before dro_over existed (test_trainer_config_validation)
OLD_DEFAULT_FINGERPRINT = "0df2f740a28906dc"


def _pairs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ha = torch.randn(B, T, H, dtype=F64, generator=g)
    hb = torch.randn(B, T + 2, H, dtype=F64, generator=g)
    w = torch.randn(V, H, dtype=F64, generator=g)
    la = torch.randint(0, V, (B, T), generator=g)
    lb = torch.randint(0, V, (B, T + 2), generator=g)
    la[:, :2] = -100  # prompt
    ref = [torch.randn(B, dtype=F64, generator=g) - 8 for _ in range(2)]
    rew = [3 * torch.randn(B, dtype=F64, generator=g) for _ in range(2)]
    return ha, hb, w, la, lb, ref, rew


def _logps(h: torch.Tensor, w: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(h @ w.T, dim=-1)
    keep = lab != -100
    tok = lp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * keep).sum(1)


@pytest.mark.parametrize("kw", [dict(divergence="chi2", rho=0.3), dict(divergence="kl", rho=0.2),
                                dict(divergence="kl", tau=2.0)])
def test_fused_groups_equal_rebel_loss(kw):
    ha, hb, w, la, lb, (ra, rb), (wa, wb) = _pairs()
    # reference: materialised float64 log-probs through rebel_loss(groups=)
    ra_h, rb_h = ha.clone().requires_grad_(), hb.clone().requires_grad_()
    ref = rebel_loss(_logps(ra_h, w, la), _logps(rb_h, w, lb), ra, rb, wa, wb, eta=0.7,
                     groups=GROUPS, **kw)
    ref.loss.backward()
    assert ref.metrics["dro/num_groups"].item() == 3
    plain = rebel_loss(_logps(ha, w, la), _logps(hb, w, lb), ra, rb, wa, wb, eta=0.7, **kw)
    assert not torch.allclose(plain.weights, ref.weights)  # the groups change the weights
    # the weights are constant within each group
    for g in GROUPS.unique():
        assert torch.allclose(ref.weights[GROUPS == g], ref.weights[GROUPS == g][0])

    def check(out, ga, gb):
        torch.testing.assert_close(out.loss, ref.loss)
        torch.testing.assert_close(out.weights, ref.weights)
        for k in ("dro/num_groups", "dro/worst_group_loss", "dro/robust_objective"):
            torch.testing.assert_close(out.metrics[k], ref.metrics[k])
        torch.testing.assert_close(ga, ra_h.grad)
        torch.testing.assert_close(gb, rb_h.grad)

    for impl in ("torch", "materialized"):
        fa, fb = ha.clone().requires_grad_(), hb.clone().requires_grad_()
        out = drorebel.fused_linear_rebel_loss(fa, fb, w, la, lb, ra, rb, wa, wb, eta=0.7,
                                               impl=impl, groups=GROUPS, **kw)
        out.loss.backward()
        check(out, fa.grad, fb.grad)
    module = drorebel.FusedLinearRebelLoss(eta=0.7, impl="torch", **kw)
    fa, fb = ha.clone().requires_grad_(), hb.clone().requires_grad_()
    out = module.forward_pairs(fa, fb, w, la, lb, ra, rb, wa, wb, groups=GROUPS)
    out.loss.backward()
    check(out, fa.grad, fb.grad)
    # forward: [a; b] stacked (equal widths), groups one per PAIR
    pad = torch.nn.functional.pad
    ha2, la2 = pad(ha, (0, 0, 0, 2)), pad(la, (0, 2), value=-100)
    stacked = torch.cat([ha2, hb]).requires_grad_()
    out = module(stacked, w, torch.cat([la2, lb]), torch.cat([wa, wb]), torch.cat([ra, rb]),
                 groups=GROUPS)
    out.loss.backward()
    check(out, stacked.grad[:B, :T], stacked.grad[B:])


def test_groups_refused_where_they_have_no_meaning():
    ha, hb, w, la, lb, (ra, rb), (wa, wb) = _pairs()
    with pytest.raises(ValueError, match=r"^groups \(group-level DRO\) needs divergence 'chi2' "
                                         "or 'kl'"):
        drorebel.fused_linear_rebel_loss(ha, hb, w, la, lb, ra, rb, wa, wb, eta=1.0,
                                         divergence="wasserstein", rho=0.1, groups=GROUPS)
    module = drorebel.FusedLinearRebelLoss(eta=1.0, divergence="wasserstein", rho=0.1)
    with pytest.raises(ValueError, match="needs divergence 'chi2' or 'kl'"):
        module.forward_pairs(ha, hb, w, la, lb, ra, rb, wa, wb, groups=GROUPS)
    with pytest.raises(ValueError, match="needs divergence 'chi2' or 'kl'"):
        module(torch.cat([ha, ha]), w, torch.cat([la, la]), torch.cat([wa, wb]),
               torch.cat([ra, rb]), groups=GROUPS)
    with pytest.raises(ValueError, match=r"one id per pair \(\[6\]\)"):  # [2B] is not [B]
        drorebel.FusedLinearRebelLoss(eta=1.0, divergence="chi2", rho=0.1)(
            torch.cat([ha, ha]), w, torch.cat([la, la]), torch.cat([wa, wb]),
            torch.cat([ra, rb]), groups=torch.cat([GROUPS, GROUPS]))
    with pytest.raises(ValueError, match="integer tensor of group ids"):
        drorebel.fused_linear_rebel_loss(ha, hb, w, la, lb, ra, rb, wa, wb, eta=1.0,
                                         divergence="chi2", rho=0.1, groups=GROUPS.double())


def _tiny_lm():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_MODEL))


def test_causal_lm_wrapper_passes_groups_and_refuses_them_for_dpo():
    model = _tiny_lm()
    ids = torch.randint(6, 26, (8, 7))
    labels = ids.clone()
    labels[:, :3] = -100
    mask = torch.ones_like(ids)
    rewards, ref = torch.randn(8), torch.randn(8) - 20
    groups = torch.tensor([0, 1, 1, 0])
    rebel = drorebel.FusedLinearRebelLoss(eta=1.0, divergence="chi2", rho=0.5)
    wrapper = CausalLMWithFusedLoss(model, rebel)
    out = wrapper(ids, mask, labels, rewards, ref, groups=groups)
    pol = out["policy_logps"].detach()
    want = rebel_loss(pol[:4], pol[4:], ref[:4], ref[4:], rewards[:4], rewards[4:], eta=1.0,
                      divergence="chi2", rho=0.5, groups=groups)
    torch.testing.assert_close(out["weights"], want.weights)
    assert out["dro/num_groups"].item() == 2 and "dro/worst_group_loss" in out
    assert "dro/num_groups" not in wrapper(ids, mask, labels, rewards, ref)
    dpo = CausalLMWithFusedLoss(model, drorebel.FusedLinearDPOLoss(beta=0.1))
    with pytest.raises(ValueError, match="REBEL loss option.*FusedLinearDPOLoss"):
        dpo(ids, mask, labels, None, ref, groups=groups)


# ---- the trainer -----------------------------------------------------------------------------

def test_config_dro_over_is_checked_and_keeps_old_fingerprints():
    def err(**kw) -> str:
        with pytest.raises(ConfigError) as info:
            TrainConfig(model="m", **kw)
        assert "\n" not in str(info.value) and isinstance(info.value, UserError)
        return str(info.value)

    assert "`dro_over` must be one of ('pairs', 'groups')" in err(dro_over="group")
    assert "needs loss='rebel' and divergence='chi2' or 'kl'" in err(dro_over="groups")
    assert "divergence='wasserstein'" in err(dro_over="groups", divergence="wasserstein",
                                             rho=0.1)
    assert "loss='dpo'" in err(dro_over="groups", loss="dpo")
    msg = err(dro_over="groups", divergence="kl", tau=1.0, mode="online", prompt_file="p.jsonl",
              reward_fn="m:f")
    assert "online" in msg and "dro_over" in msg
    assert TrainConfig(model="m").fingerprint() == OLD_DEFAULT_FINGERPRINT
    assert TrainConfig(model="m", dro_over="pairs").fingerprint() == OLD_DEFAULT_FINGERPRINT
    a = TrainConfig(model="m", divergence="chi2", rho=0.5)
    b = TrainConfig(model="m", divergence="chi2", rho=0.5, dro_over="groups")
    assert a.fingerprint() != b.fingerprint()
    assert TrainConfig.from_yaml(None, ["model=m", "divergence=kl", "rho=0.1",
                                        "dro_over=groups"]).dro_over == "groups"


ROW = {"prompt": "the cat", "response_a": "good", "response_b": "bad", "reward_a": 1.0,
       "reward_b": 0.0}


def _jsonl(tmp_path, rows, name="d.jsonl") -> str:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


@pytest.mark.parametrize("bad, want", [
    ({}, "field 'group' is missing (dro_over=groups needs a group per pair"),
    ({"group": None}, "field 'group' is missing"),
    ({"group": "  "}, "field 'group' is empty"),
    ({"group": 1.5}, "field 'group' must be an integer or a non-empty string, got 1.5"),
    ({"group": True}, "field 'group' must be an integer or a non-empty string, got True"),
    ({"group": 2**70}, "does not fit in int64"),
    ({"group": 3}, "field 'group' is an integer (3) but row 0 has a string"),
])
def test_bad_group_is_one_line_naming_file_row_and_field(tmp_path, bad, want):
    path = _jsonl(tmp_path, [{**ROW, "group": "x"}, {**ROW, **bad}])
    with pytest.raises(DataError) as info:
        normalise_rows(load_rows(path), groups=True)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}, line 2, row 1: ")
    assert want in msg
    if "group" not in bad or bad["group"] is None:
        normalise_rows(load_rows(path))  # without dro_over=groups the column is not read


def test_group_ids_by_first_appearance(tmp_path):
    tok_path = build_tokenizer(str(tmp_path / "tok"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path)
    long_prompt = " ".join(["the"] * 20)
    names = ["b", "a", "b", "c", "a"]
    rows = [{**ROW, "group": g} for g in names]
    rows[3]["prompt"] = long_prompt  # dropped: "c" keeps its id 2, and the ids stay stable
    data = tokenise_pairs(normalise_rows(rows, groups=True), tok, 24, 8, "drop", groups=True)
    assert data.groups.tolist() == [0, 1, 0, 1] and data.groups.dtype == torch.long
    ints = tokenise_pairs(normalise_rows([{**ROW, "group": g} for g in (7, -2, 7)],
                                         groups=True), tok, 24, 8, "drop", groups=True)
    assert ints.groups.tolist() == [7, -2, 7]
    assert tokenise_pairs(normalise_rows(rows), tok, 24, 8, "drop").groups is None


def _group_data(tmp) -> str:
    """The tiny pairs with a group column: 3 string groups of unequal size, one with larger
    reward gaps (its loss is larger, so the group ball moves weight onto it)."""
    path = os.path.join(tmp, "pairs.jsonl")
    if not os.path.exists(path):
        os.makedirs(tmp, exist_ok=True)
        write_pairs(path)
        rows = [json.loads(line) for line in open(path)]
        for i, r in enumerate(rows):
            r["group"] = ("easy", "hard", "mid")[i % 3]
            if r["group"] == "hard":
                r["reward_a"] *= 3.0
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _gcfg(tmp, **kw) -> TrainConfig:
    tmp = str(tmp)
    _group_data(tmp)
    base = dict(batch_size=8, max_steps=3, divergence="chi2", rho=0.5, dro_over="groups")
    return TrainConfig.from_dict(base_overrides(tmp, **{**base, **kw}))


_TIMED = ("tokens_per_s", "peak_memory_gb")


def _untimed(path: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in _TIMED} for r in read_jsonl(path)]


def test_offline_group_run_logs_group_metrics_and_differs_from_pairs(tmp_path):
    g = train(_gcfg(tmp_path / "g"))
    p = train(_gcfg(tmp_path / "p", dro_over="pairs"))
    rg, rp = read_jsonl(g.metrics_path), read_jsonl(p.metrics_path)
    assert [r["step"] for r in rg] == [1, 2, 3]
    for r in rg:
        assert 2 <= r["dro/num_groups"] <= 3
        assert r["dro/worst_group_loss"] >= r["rebel/loss_mean"]
        assert r["dro/robust_objective"] <= r["dro/worst_group_loss"] + 1e-6
    assert "dro/num_groups" not in rp[0]
    # same data and initial policy: equal plain losses at step 1, different weights
    assert rg[0]["rebel/loss_mean"] == pytest.approx(rp[0]["rebel/loss_mean"], rel=1e-6)
    assert rg[0]["dro/robust_objective"] != pytest.approx(rp[0]["dro/robust_objective"],
                                                          rel=1e-3)
    assert rg[-1]["loss"] != pytest.approx(rp[-1]["loss"], rel=1e-3)  # other updates


def test_missing_group_stops_the_run_with_one_line(tmp_path):
    cfg = _gcfg(tmp_path)
    rows = [json.loads(line) for line in open(cfg.train_file)]
    del rows[5]["group"]
    with open(cfg.train_file, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.raises(DataError, match=r"pairs\.jsonl, line 6, row 5: field 'group' is missing"):
        train(cfg)
    assert not os.path.exists(os.path.join(cfg.output_dir, "metrics.jsonl"))


def test_precompute_ref_checks_and_keeps_the_group_column(tmp_path):
    from drorebel.trainer.precompute import precompute_reference

    cfg = _gcfg(tmp_path)
    out = str(tmp_path / "cached.jsonl")
    assert precompute_reference(cfg, out) == 16
    rows = read_jsonl(out)
    assert [r["group"] for r in rows[:4]] == ["easy", "hard", "mid", "easy"]
    assert all(r["ref_logp_a"] < 0 for r in rows)
    train(_gcfg(tmp_path / "cached_run", train_file=out, max_steps=1))  # the output trains
    bad = [json.loads(line) for line in open(cfg.train_file)]
    bad[5]["group"] = 1.5
    cfg.train_file = _jsonl(tmp_path, bad, "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 6, row 5: field 'group' must be"):
        precompute_reference(cfg, str(tmp_path / "never.jsonl"))
    assert not os.path.exists(tmp_path / "never.jsonl")


def test_group_run_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    kw = dict(max_steps=4, save_steps=1, grad_accum=2, batch_size=4)
    full = train(_gcfg(tmp_path / "full", **kw))
    part = tmp_path / "part"
    train(_gcfg(part, **kw, stop_at_step=2))
    train(_gcfg(part, **kw, resume="auto"))
    assert _untimed(full.metrics_path) == _untimed(str(part / "run" / "metrics.jsonl"))
    a = load_file(os.path.join(latest_checkpoint(str(tmp_path / "full" / "run")),
                               "model.safetensors"))
    b = load_file(os.path.join(latest_checkpoint(str(part / "run")), "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint belongs to a dro_over=groups run: pairs-level DRO may not resume it
    from drorebel.trainer.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="another run"):
        train(_gcfg(part, **{**kw, "max_steps": 5}, dro_over="pairs", resume="auto"))


@pytest.mark.timeout(200)
def test_two_ddp_ranks_equal_one_process(tmp_path):
    import yaml
    from launch import launch

    kw = dict(max_steps=2, grad_accum=2, batch_size=4)
    single = train(_gcfg(tmp_path, **kw, output_dir=str(tmp_path / "single")))
    cfg = _gcfg(tmp_path, **kw, output_dir=str(tmp_path / "ddp")).to_dict()
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    worker = os.path.join(os.path.dirname(__file__), "dist_workers", "trainer_worker.py")
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", worker, str(path)], tmp_path, timeout=180)
    a, b = read_jsonl(single.metrics_path), read_jsonl(str(tmp_path / "ddp" / "metrics.jsonl"))
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert rb["dro/num_groups"] == ra["dro/num_groups"]
        for k in ("loss", "grad_norm", "dro/robust_objective", "dro/worst_group_loss",
                  "dro/ess", "rebel/loss_mean"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), k
