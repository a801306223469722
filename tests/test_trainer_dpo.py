"""Trainer DPO baseline (``loss=dpo``): hand-checked loss, roles, ties, DP, online, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from trainer_fixtures.online_rewards import write_prompts
from trainer_fixtures.tiny import base_overrides

import drorebel.distributed as dist_helpers
from drorebel.losses.dpo import dpo_loss, order_by_reward
from drorebel.trainer.config import ConfigError, TrainConfig
from drorebel.trainer.data import load_rows, normalise_rows, tokenise_pairs
from drorebel.trainer.loop import micro_batch, train
from drorebel.trainer.metrics import read_jsonl
from drorebel.trainer.model import load_model, load_tokenizer, wrap_model

_TIMED = ("tokens_per_s", "peak_memory_gb")


def reward_ordered_dpo_loss(pa, pb, ref_a, ref_b, ra, rb, beta):
    """The trainer's DPO (``FusedLinearDPOLoss(rewards=...)``): the public ``dpo_loss`` on
    reward-ordered pairs with the ties masked."""
    *roles, untied = order_by_reward(pa, pb, ref_a, ref_b, ra, rb)
    return dpo_loss(*roles, beta, mask=untied)


def _cfg(tmp, **kw) -> TrainConfig:
    return TrainConfig.from_dict(base_overrides(str(tmp), **{"loss": "dpo", **kw}))


def _rows(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in _TIMED}
            for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]


def _hand_dpo(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """float64 ``−log σ(β[(π_c − ref_c) − (π_r − ref_r)])`` per pair, from the formula."""
    z = beta * ((pc - rc) - (pr - rr))
    return torch.log1p(torch.exp(-z)).detach()


def _logps64(model, ids, mask, labels) -> torch.Tensor:
    """Sequence log-probs from the full float64 logits (HF labels, shifted here)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    lab = labels[:, 1:]
    tok = torch.log_softmax(logits, -1).gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (tok * (lab != -100)).sum(-1)


def test_first_step_loss_is_log2_and_metrics_are_trl(tmp_path):
    cfg = _cfg(tmp_path, max_steps=1)
    train(cfg)
    rows = _rows(cfg.output_dir)
    assert len(rows) == 1
    r = rows[0]
    assert r["loss"] == pytest.approx(math.log(2.0), abs=1e-5)  # policy = reference at step 1
    assert r["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "dpo/tie_fraction"):
        assert key in r, key
    assert r["dpo/tie_fraction"] == 0.0
    assert r["logps/chosen"] < 0 and r["logps/rejected"] < 0
    assert "dro/robust_objective" not in r


@pytest.mark.parametrize("impl", ["fused", "materialized"])
def test_module_loss_matches_hand_computation(tmp_path, impl):
    cfg = _cfg(tmp_path, beta=0.7, loss_impl=impl)
    tok = load_tokenizer(cfg)
    data = tokenise_pairs(normalise_rows(load_rows(cfg.train_file)), tok, cfg.max_length,
                          cfg.max_prompt_length, cfg.overlong)
    data.ref_a = data.ref_b = torch.zeros(len(data), dtype=torch.float64)  # replaced below
    mb = micro_batch(data, cfg, 0)
    model = load_model(cfg, torch.device("cpu"))
    module = wrap_model(model, cfg)
    with torch.no_grad():  # float64 ground truth on a float64 copy of the same weights
        m64 = load_model(cfg, torch.device("cpu")).double()
        pa = _logps64(m64, mb.ids_a, mb.mask_a, mb.labels_a)
        pb = _logps64(m64, mb.ids_b, mb.mask_b, mb.labels_b)
    ref_a = pa + torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    ref_b = pb + torch.tensor([-0.4, 0.6, 0.2, -0.3], dtype=torch.float64)
    ra = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    rb = torch.tensor([0.0, 1.0, 0.5, 3.0], dtype=torch.float64)  # a, b, tie, b
    mb = dataclasses.replace(mb, ref_a=ref_a, ref_b=ref_b, rewards_a=ra, rewards_b=rb)
    out = module(**mb.model_inputs())
    loss = out["loss"].detach()
    a_wins = torch.tensor([True, False, False])
    keep = [0, 1, 3]
    pc = torch.where(a_wins, pa[keep], pb[keep])
    pr = torch.where(a_wins, pb[keep], pa[keep])
    rc = torch.where(a_wins, ref_a[keep], ref_b[keep])
    rr = torch.where(a_wins, ref_b[keep], ref_a[keep])
    want = _hand_dpo(pc, pr, rc, rr, 0.7).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert float(loss) != pytest.approx(math.log(2.0), abs=1e-2)
    implicit_c, implicit_r = 0.7 * (pc - rc), 0.7 * (pr - rr)
    assert float(out["rewards/margins"]) == pytest.approx(float((implicit_c - implicit_r).mean()),
                                                          rel=1e-5)
    assert float(out["rewards/accuracies"]) == pytest.approx(
        float((implicit_c > implicit_r).double().mean()))
    assert float(out["dpo/tie_fraction"]) == pytest.approx(0.25)
    out["loss"].backward()  # differentiable through the LM head
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_ties_are_masked_and_roles_follow_the_reward():
    g = torch.Generator().manual_seed(0)
    pa, pb, ref_a, ref_b = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4))
    pa.requires_grad_(True)
    ra = torch.tensor([1.0, 2.0, 0.0, 3.0, 5.0], dtype=torch.float64)
    rb = torch.tensor([0.0, 2.0, 1.0, 3.0, 4.0], dtype=torch.float64)  # ties at 1 and 3
    out = reward_ordered_dpo_loss(pa, pb, ref_a, ref_b, ra, rb, beta=0.5)
    out.loss.backward()
    assert pa.grad[1] == 0 and pa.grad[3] == 0 and (pa.grad[[0, 2, 4]] != 0).all()
    keep = torch.tensor([0, 2, 4])
    aw = torch.tensor([True, False, True])
    pc, pr = torch.where(aw, pa[keep], pb[keep]), torch.where(aw, pb[keep], pa[keep])
    rc, rr = torch.where(aw, ref_a[keep], ref_b[keep]), torch.where(aw, ref_b[keep], ref_a[keep])
    assert float(out.loss.detach()) == pytest.approx(float(_hand_dpo(pc, pr, rc, rr, 0.5).mean()),
                                            rel=1e-12)
    # swapping the rewards swaps the roles: a different loss, equal to the swapped hand value
    swapped = reward_ordered_dpo_loss(pa, pb, ref_a, ref_b, rb, ra, beta=0.5)
    want_swapped = float(_hand_dpo(pr, pc, rr, rc, 0.5).mean())
    assert float(swapped.loss.detach()) == pytest.approx(want_swapped, rel=1e-12)
    assert abs(float(swapped.loss.detach()) - float(out.loss.detach())) > 1e-3
    # swapping the responses along with the rewards changes nothing
    same = reward_ordered_dpo_loss(pb, pa, ref_b, ref_a, rb, ra, beta=0.5)
    assert float(same.loss.detach()) == pytest.approx(float(out.loss.detach()), rel=1e-12)
    # all ties: zero loss, zero gradient
    x = pa.detach().clone().requires_grad_(True)
    tied = reward_ordered_dpo_loss(x, pb, ref_a, ref_b, ra, ra, beta=0.5)
    tied.loss.backward()
    assert float(tied.loss.detach()) == 0.0 and (x.grad == 0).all()
    assert float(tied.metrics["dpo/tie_fraction"]) == 1.0


def test_data_parallel_split_gives_the_single_process_gradient(monkeypatch):
    """Two simulated ranks: the averaged gradients equal the full-batch gradient."""
    g = torch.Generator().manual_seed(1)
    pa, pb, ref_a, ref_b = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(4))
    ra = torch.tensor([1.0, 0.0, 2.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    rb = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.5, 3.0], dtype=torch.float64)  # tie: rank 0 only
    full_x = pa.clone().requires_grad_(True)
    full = reward_ordered_dpo_loss(full_x, pb, ref_a, ref_b, ra, rb, beta=0.3)
    full.loss.backward()
    halves = [slice(0, 3), slice(3, 6)]
    local = []  # each rank's local sums (all_reduce_sum as the identity)
    for h in halves:
        local.append(reward_ordered_dpo_loss(pa[h], pb[h], ref_a[h], ref_b[h], ra[h], rb[h],
                                             0.3).metrics)
    sums = []
    monkeypatch.setattr(dist_helpers, "all_reduce_sum", lambda x, group=None: sums.append(x) or x)
    for rank, h in enumerate(halves):
        monkeypatch.setattr(dist_helpers, "data_parallel_info",
                            lambda group=None, global_batch=True, r=rank: (2, r))
        reward_ordered_dpo_loss(pa[h], pb[h], ref_a[h], ref_b[h], ra[h], rb[h], 0.3)
    total = sums[0] + sums[1]
    monkeypatch.setattr(dist_helpers, "all_reduce_sum", lambda x, group=None: total)
    grads, values = [], []
    for rank, h in enumerate(halves):
        monkeypatch.setattr(dist_helpers, "data_parallel_info",
                            lambda group=None, global_batch=True, r=rank: (2, r))
        x = pa[h].clone().requires_grad_(True)
        out = reward_ordered_dpo_loss(x, pb[h], ref_a[h], ref_b[h], ra[h], rb[h], 0.3)
        out.loss.backward()
        grads.append(x.grad / 2)  # DDP averages over the 2 ranks
        values.append(float(out.loss.detach()))
        for k, v in full.metrics.items():  # metrics are global
            assert float(out.metrics[k]) == pytest.approx(float(v), rel=1e-12), k
    torch.testing.assert_close(torch.cat(grads), full_x.grad, rtol=1e-12, atol=1e-15)
    assert sum(values) / 2 == pytest.approx(float(full.loss.detach()), rel=1e-12)  # the logged loss
    assert local[0]["dpo/tie_fraction"] != local[1]["dpo/tie_fraction"]


def _gloo_worker(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        pa, pb, ref_a, ref_b, ra, rb = _dp_inputs()
        h = slice(3 * rank, 3 * rank + 3)
        x = pa[h].clone().requires_grad_(True)
        out = reward_ordered_dpo_loss(x, pb[h], ref_a[h], ref_b[h], ra[h], rb[h], 0.3)
        out.loss.backward()
        grad = x.grad / 2  # what DDP's averaging does
        parts = [torch.zeros_like(grad) for _ in range(2)]
        dist.all_gather(parts, grad)
        if rank == 0:
            torch.save({"grad": torch.cat(parts), "metrics": out.metrics}, out_file)
    finally:
        dist.destroy_process_group()


def _dp_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(2)
    pa, pb, ref_a, ref_b = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(4))
    ra = torch.tensor([1.0, 0.0, 2.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    rb = torch.tensor([0.0, 0.0, 2.0, 1.0, 0.5, 3.0], dtype=torch.float64)  # 2 ties on rank 0
    return pa, pb, ref_a, ref_b, ra, rb


def test_real_two_rank_gloo_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    out_file = str(tmp_path / "out.pt")
    mp.spawn(_gloo_worker, args=(str(tmp_path / "init"), out_file), nprocs=2, join=True)
    got = torch.load(out_file, weights_only=True)
    pa, pb, ref_a, ref_b, ra, rb = _dp_inputs()
    x = pa.clone().requires_grad_(True)
    full = reward_ordered_dpo_loss(x, pb, ref_a, ref_b, ra, rb, 0.3)
    full.loss.backward()
    torch.testing.assert_close(got["grad"], x.grad, rtol=1e-12, atol=1e-15)
    for k, v in full.metrics.items():
        assert float(got["metrics"][k]) == pytest.approx(float(v), rel=1e-12), k
    assert float(full.metrics["dpo/tie_fraction"]) == pytest.approx(2 / 6)


def test_fused_equals_materialized_over_two_steps(tmp_path):
    runs = {}
    for impl in ("fused", "materialized"):
        cfg = _cfg(tmp_path / impl, loss_impl=impl, max_steps=2, beta=0.5)
        train(cfg)
        runs[impl] = _rows(cfg.output_dir)
    for a, b in zip(runs["fused"], runs["materialized"], strict=True):
        for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert runs["fused"][1]["loss"] < math.log(2.0)  # the second step sees a trained policy


def test_swapping_responses_and_rewards_gives_the_same_run(tmp_path):
    cfg = _cfg(tmp_path / "orig", max_steps=2)
    swapped_file = str(tmp_path / "swapped.jsonl")
    with open(swapped_file, "w") as f:
        for r in load_rows(cfg.train_file):
            f.write(json.dumps({"prompt": r["prompt"], "response_a": r["response_b"],
                                "response_b": r["response_a"], "reward_a": r["reward_b"],
                                "reward_b": r["reward_a"]}) + "\n")
    swapped = _cfg(tmp_path / "swap", max_steps=2, train_file=swapped_file)
    train(cfg)
    train(swapped)
    for a, b in zip(_rows(cfg.output_dir), _rows(swapped.output_dir), strict=True):
        for k in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_online_dpo_runs(tmp_path):
    pf = str(tmp_path / "prompts.jsonl")
    write_prompts(pf)
    cfg = _cfg(tmp_path, mode="online", prompt_file=pf,
               reward_fn="trainer_fixtures.online_rewards:good_fraction", rollout_batch_size=8,
               batch_size=4, num_passes=1, max_new_tokens=6, max_steps=4, lr=1e-2, beta=0.5)
    train(cfg)
    rows = _rows(cfg.output_dir)
    assert len(rows) == 4
    for r in rows:
        assert math.isfinite(r["loss"]) and 0 <= r["dpo/tie_fraction"] <= 1
        assert "dro/robust_objective" not in r
    assert rows[0]["loss"] <= math.log(2.0) + 1e-5  # reference = sampling policy; ties add 0


@pytest.mark.parametrize(("kw", "match"), [
    ({"divergence": "chi2", "rho": 0.1}, "divergence='none'"),
    ({"divergence": "wasserstein", "rho": 0.1}, "divergence='none'"),
    ({"beta": 0.0}, "beta"),
    ({"beta": -1.0}, "beta"),
    ({"beta": float("nan")}, "beta"),
    ({"beta": float("inf")}, "beta"),
    ({"loss": "ipo"}, "loss"),
])
def test_bad_configs_fail_clearly(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, **kw)


def test_yaml_overrides(tmp_path):
    import yaml

    path = str(tmp_path / "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(base_overrides(str(tmp_path)), f)
    cfg = TrainConfig.from_yaml(path, ["loss=dpo", "beta=2e-1"])  # YAML 1.1 reads a string
    assert (cfg.loss, cfg.beta) == ("dpo", 0.2)
    with pytest.raises(ConfigError, match="beta"):
        TrainConfig.from_yaml(path, ["loss=dpo", "beta=0"])


def test_fingerprint_covers_loss_and_beta(tmp_path):
    rebel = TrainConfig.from_dict(base_overrides(str(tmp_path)))
    dpo = _cfg(tmp_path)
    assert rebel.fingerprint() != dpo.fingerprint()
    assert dpo.fingerprint() != _cfg(tmp_path, beta=0.2).fingerprint()
    assert dpo.fingerprint() == _cfg(tmp_path, beta=0.1).fingerprint()
    # REBEL ignores beta: its fingerprint does not move (older REBEL checkpoints stay valid)
    assert rebel.fingerprint() == TrainConfig.from_dict(
        base_overrides(str(tmp_path), beta=0.5)).fingerprint()
