"""Tests of the preference-shift demo (drorebel.experiments.preference_shift)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from drorebel.cli import main
from drorebel.experiments.preference_shift import eval as ev
from drorebel.experiments.preference_shift import frontier as fr
from drorebel.experiments.preference_shift import lang
from drorebel.experiments.preference_shift import reward as rw
from drorebel.experiments.preference_shift import train as tr

# ---------------------------------------------------------------- reward


E = math.e


def test_objectives_hand_values():
    # 4-class softmax over word counts (joy, formal, calm) and a neutral logit of 1:
    # "happy glad therefore the" has counts (2, 1, 0) -> logits (2, 1, 0, 1)
    z = E**2 + E + 1 + E
    assert rw.objectives("happy glad therefore the") == pytest.approx([E**2 / z, E / z, 1 / z])
    assert rw.objectives("") == pytest.approx([1 / (3 + E)] * 3)
    # special tokens and unknown words count nothing
    z = E + 1 + 1 + E
    assert rw.objectives("<bos> love zebra <eos>") == pytest.approx([E / z, 1 / z, 1 / z])
    # the objectives compete: more joy words lower the formal probability
    assert rw.objectives("kindly love love")[1] < rw.objectives("kindly")[1]


def test_reward_contract_shape_and_columns():
    out = rw.reward(["<u> party", "<u> work"], ["love", "kindly hereby"], topic=["a", "b"])
    z0, z1 = 2 * E + 2, E**2 + 2 + E
    assert out == [pytest.approx([E / z0, 1 / z0, 1 / z0]),
                   pytest.approx([1 / z1, E**2 / z1, 1 / z1])]
    assert all(len(row) == 3 for row in out)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rw.reward(["a", "b"], ["love"])


def test_token_objectives_match_strings_and_stop_at_eos():
    rng = random.Random(0)
    rows = []
    for _ in range(50):
        toks = [rng.randrange(len(lang.VOCAB)) for _ in range(9)]
        rows.append(toks)
    t = torch.tensor(rows)
    expect = rw.objective_matrix([lang.decode(r) for r in rows])
    torch.testing.assert_close(rw.token_objectives(t), expect)
    happy, glad = lang.WORD_ID["happy"], lang.WORD_ID["glad"]
    one = torch.tensor([[happy, lang.EOS, glad, glad]])  # words after <eos> are ignored
    torch.testing.assert_close(rw.token_objectives(one), rw.objective_matrix(["happy"]))
    assert rw.token_objectives(one)[0, 0] == pytest.approx(E / (2 * E + 2))


def test_mix_validates_weights():
    v = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)
    assert rw.mix(v, [0.25, 0.75, 0.0]).item() == pytest.approx(0.625)
    with pytest.raises(ValueError, match="summing to 1"):
        rw.mix(v, [0.5, 0.6, 0.0])


def test_mixture_rewards_linear_in_objectives():
    m = ev.mixture_rewards({"joy": 0.8, "formal": 0.4, "calm": 0.2})
    assert m["seen"]["a=0.7"] == pytest.approx(0.7 * 0.8 + 0.3 * 0.4)
    assert m["unseen"]["b=0.50,a=1.0"] == pytest.approx(0.5 * 0.8 + 0.5 * 0.2)
    s = ev.summarise([{"joy": 0.8, "formal": 0.4, "calm": 0.2, "mean_words": 5.0}] * 2,
                     [0.7, 0.3, 0.0])
    assert s["seen_worst"]["mean"] == pytest.approx(0.4)  # α = 0: formal only
    assert s["unseen_worst"]["mean"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.2)
    assert s["seen_worst"]["std"] == 0.0


# ---------------------------------------------------------------- training pieces


def test_response_labels_mask_after_first_eos():
    e, p = lang.EOS, lang.PAD
    seq = torch.tensor([[3, 4, 6, 6, 5, 20, 21, e, p, p, p, p, p, p]])
    labels = tr.response_labels(seq)
    assert labels.tolist() == [[20, 21, e] + [-100] * 6]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    cfg = lang.BaseConfig(steps=30)
    model, info = lang.load_or_train_base(tmp_path_factory.mktemp("base"), cfg, progress=False)
    assert info["trained"]
    return model


def test_rollout_reference_logps_equal_hf_logits(tiny_base):
    torch.manual_seed(0)
    prompts = torch.tensor(lang.sample_prompts(6, random.Random(0)))
    batch = tr.rollout(tiny_base, prompts)
    for seq, lab, ref in ((batch.seq_a, batch.lab_a, batch.ref_a),
                          (batch.seq_b, batch.lab_b, batch.ref_b)):
        with torch.no_grad():
            logits = tiny_base(input_ids=seq).logits.double()
        logp = torch.log_softmax(logits[:, lang.PROMPT_LEN - 1: -1], -1)
        mask = lab != -100
        tok = logp.gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
        torch.testing.assert_close(ref.double(), tok.sum(1), atol=1e-5, rtol=1e-5)
    assert batch.obj_a.shape == (6, 3)


def test_dpo_chosen_is_higher_reward_and_ties_dropped(tiny_base):
    torch.manual_seed(1)
    prompts = torch.tensor(lang.sample_prompts(4, random.Random(1)))
    b = tr.rollout(tiny_base, prompts)
    b.obj_a = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0.5, 0, 0], [0, 0, 0]], dtype=torch.float64)
    b.obj_b = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0.5, 0, 0], [0, 1, 0]], dtype=torch.float64)
    out = tr.method_loss(tiny_base, b, tr.Method("DPO", "dpo", 0.1), eta=1.0, alpha=0.7)
    # rows 0 (a wins), 1 (b wins), 3 (b wins); row 2 is a tie
    torch.testing.assert_close(out.policy_logps_a.detach(), b.ref_a.new_tensor(
        [b.ref_a[0], b.ref_b[1], b.ref_b[3]]), atol=1e-5, rtol=1e-5)
    assert out.metrics["rewards/accuracies"].item() == 0.0  # policy == reference: zero margin


@pytest.mark.parametrize("kind,param", [("rebel", 0.0), ("chi2", 0.5), ("kl", 0.2),
                                        ("wasserstein", 1.0)])
def test_rebel_losses_at_reference_equal_weighted_squared_reward_gaps(tiny_base, kind, param):
    torch.manual_seed(2)
    b = tr.rollout(tiny_base, torch.tensor(lang.sample_prompts(8, random.Random(2))))
    out = tr.method_loss(tiny_base, b, tr.Method(kind, kind, param), eta=1.0, alpha=0.7)
    w = torch.tensor([0.7, 0.3, 0.0], dtype=torch.float64)
    gap2 = ((b.obj_a - b.obj_b) @ w) ** 2  # policy = π_t: Δ_i = −(r_a − r_b)
    if kind == "wasserstein":
        assert out.loss.item() >= gap2.mean().item() - 1e-6
    else:
        expect = (out.weights.double() * gap2).sum() if kind != "rebel" else gap2.mean()
        assert out.loss.item() == pytest.approx(expect.item(), rel=1e-4, abs=1e-7)


def test_train_with_snapshots_is_bit_identical_and_snapshots_equal_shorter_runs(tiny_base):
    cfg = tr.TrainConfig(iterations=3, prompts=4, methods=tr.default_methods())
    rebel = cfg.methods[0]
    plain, c0 = tr.train(tiny_base, rebel, cfg, seed=5)
    evaluate = lambda m: ev.evaluate_policy(m, 8, 5)  # noqa: E731
    snapped, c1 = tr.train(tiny_base, rebel, cfg, seed=5, evaluate_at=[1, 2], evaluate=evaluate)
    for p, q in zip(plain.parameters(), snapped.parameters()):
        assert torch.equal(p, q)
    assert c0["train_reward"] == c1["train_reward"] and "snapshots" not in c0
    assert [it for it, _ in c1["snapshots"]] == [1, 2]
    # the snapshot after 2 iterations is the evaluation of a run stopped after 2 iterations
    short, _ = tr.train(tiny_base, rebel, tr.TrainConfig(iterations=2, prompts=4,
                                                         methods=cfg.methods), seed=5)
    assert c1["snapshots"][1][1] == evaluate(short)


# ---------------------------------------------------------------- REBEL's frontier


def test_budgets_evenly_spaced_without_ends_or_repeats():
    assert tr.budgets(60, 5) == [10, 20, 30, 40, 50]
    assert tr.budgets(6, 5) == [1, 2, 3, 4, 5]
    assert tr.budgets(2, 5) == [1]
    assert tr.budgets(1, 5) == []


def test_frontier_value_by_hand():
    pts = [(2.0, 2.0), (0.0, 1.0), (1.0, 0.0)]  # unsorted on purpose
    assert fr.frontier_points(pts) == [(0.0, 1.0), (1.0, 0.0), (2.0, 2.0)]
    assert fr.frontier_value(pts, 0.5) == pytest.approx(0.5)
    assert fr.frontier_value(pts, 1.5) == pytest.approx(1.0)
    assert fr.frontier_value(pts, 1.0) == 0.0
    assert fr.frontier_value(pts, -3.0) == 1.0  # flat outside REBEL's range
    assert fr.frontier_value(pts, 9.0) == 2.0
    # points of equal training reward merge into their mean worst case
    assert fr.frontier_points([(1.0, 0.0), (1.0, 2.0), (0.0, 5.0)]) == [(0.0, 5.0), (1.0, 1.0)]
    assert fr.frontier_gap((0.5, 0.75), pts) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="not finite"):
        fr.frontier_points([(0.0, float("nan"))])
    with pytest.raises(ValueError, match="at least one"):
        fr.frontier_value([], 0.0)


def test_summarise_gaps_mean_se_and_seeds_above():
    frontiers = [[(0.0, 0.0), (1.0, 1.0)]] * 3
    points = [(0.5, 0.6), (0.5, 0.7), (0.5, 0.2)]  # gaps +0.1, +0.2, -0.3
    g = fr.summarise_gaps(points, frontiers)
    assert g["gaps"] == pytest.approx([0.1, 0.2, -0.3])
    assert g["mean"] == pytest.approx(0.0)
    assert g["se"] == pytest.approx(math.sqrt((0.01 + 0.04 + 0.09) / 2) / math.sqrt(3))
    assert (g["above"], g["n"]) == (2, 3)
    assert fr.mean_se([4.0]) == {"mean": 4.0, "se": 0.0, "n": 1}
    with pytest.raises(ValueError, match="2 method points but 3 frontiers"):
        fr.summarise_gaps(points[:2], frontiers)


# ---------------------------------------------------------------- end to end


def _quick(out, cache):
    argv = ["experiment", "preference-shift", "--quick", "--out", str(out), "--cache-dir",
            str(cache), "--no-progress"]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def _finite(x):
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


@pytest.fixture(scope="module")
def two_quick_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quick")
    first = _quick(root / "one", root / "base")
    second = _quick(root / "two", root / "base")
    return root, first, second


def test_quick_run_writes_results_and_plots(two_quick_runs):
    root, res, _ = two_quick_runs
    assert set(res) >= {"config", "seeds", "mixtures", "methods", "base", "frontier", "per_seed",
                        "curves", "timing"}
    assert list(res["methods"]) == ["REBEL", "chi2-REBEL", "KL-REBEL", "W-REBEL", "DPO"]
    for summary in res["methods"].values():
        for key in ("train_mixture", "seen_mean", "seen_worst", "unseen_mean", "unseen_worst",
                    "all_worst"):
            assert set(summary[key]) == {"mean", "std"}
        assert summary["seen_worst"]["mean"] <= summary["seen_mean"]["mean"]
        assert len(summary["per_mixture"]["seen"]) == 11
    assert _finite({k: v for k, v in res.items() if k != "curves"})
    assert len(res["curves"]["REBEL"]) == len(res["seeds"]) == 2
    for name in ("mixtures.png", "curves.png", "frontier.png"):
        data = (root / "one" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    table = (root / "one" / "table.md").read_text()
    assert "| REBEL |" in table and "gap to REBEL's frontier" in table


def test_quick_run_frontier_and_gaps_recomputed_from_saved_evaluations(two_quick_runs):
    _, res, _ = two_quick_runs
    front = res["frontier"]
    assert front["iterations"] == [0, 1, 2, 3, 4, 5, 6] and front["reference"] == "REBEL"
    w = res["config"]["train_weights"]

    def point(objs):
        rewards = ev.mixture_rewards(objs)
        return [sum(wj * objs[n] for wj, n in zip(w, rw.OBJECTIVES)),
                min([*rewards["seen"].values(), *rewards["unseen"].values()])]

    for s, (curve, evals) in enumerate(zip(front["per_seed"], front["evaluations"])):
        assert len(curve) == len(evals) == 7
        for xy, objs in zip(curve, evals):
            assert xy == pytest.approx(point(objs))
        # the frontier ends at REBEL's final evaluation
        assert evals[-1] == res["per_seed"]["REBEL"][s]
    # ... and starts at the base model's (its summary over seeds)
    base = [point(evals[0]) for evals in front["evaluations"]]
    assert math.fsum(x for x, _ in base) / 2 == pytest.approx(res["base"]["train_mixture"]["mean"])
    assert math.fsum(y for _, y in base) / 2 == pytest.approx(res["base"]["all_worst"]["mean"])
    assert "frontier_gap" not in res["methods"]["REBEL"]
    for name in ("chi2-REBEL", "KL-REBEL", "W-REBEL", "DPO"):
        g = res["methods"][name]["frontier_gap"]
        gaps = [point(o)[1] - fr.frontier_value(f, point(o)[0])
                for o, f in zip(res["per_seed"][name], front["per_seed"])]
        assert g["gaps"] == pytest.approx(gaps)
        assert g["n"] == 2 and g["above"] == sum(x > 0 for x in gaps)


def test_base_cache_reused_and_runs_deterministic(two_quick_runs):
    _, first, second = two_quick_runs
    assert first["timing"]["base_trained"] is True
    assert second["timing"]["base_trained"] is False
    strip = lambda r: {k: v for k, v in r.items() if k != "timing"}  # noqa: E731
    assert strip(first) == strip(second)
