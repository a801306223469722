"""The robustness protocol of the preference-shift experiments: reward designs, the offline
regime, group-level DRO in the training loop, and ``drorebel experiment robustness``."""

from __future__ import annotations

import json
import random

import pytest
import torch

from drorebel.cli import main
from drorebel.experiments.preference_shift import designs as dz
from drorebel.experiments.preference_shift import frontier as fr
from drorebel.experiments.preference_shift import lang
from drorebel.experiments.preference_shift import protocol as pt
from drorebel.experiments.preference_shift import train as tr


def test_homogeneous_design_draws_nothing():
    rng = random.Random(0)
    assert dz.score_weights("homogeneous", 5, rng, alpha=0.8, minority=0.2) == (None, None)
    assert rng.random() == random.Random(0).random()


def test_groups_design_one_objective_per_prompt():
    w, g = dz.score_weights("groups", 4000, random.Random(1), alpha=0.8, minority=0.2)
    assert w.shape == (4000, 3) and g.dtype == torch.int64
    torch.testing.assert_close(w[torch.arange(4000), g], torch.ones(4000, dtype=torch.float64))
    assert float(w.sum()) == 4000 and float(w[:, 2].sum()) == 0  # calm never rewarded
    assert abs(float(g.double().mean()) - 0.2) < 0.02


def test_armorm_design_random_mixtures():
    w, g = dz.score_weights("armorm", 1000, random.Random(2), alpha=0.8, minority=0.2)
    torch.testing.assert_close(w.sum(1), torch.ones(1000, dtype=torch.float64))
    assert torch.equal(g, (w[:, 0] < 0.5).long())
    with pytest.raises(ValueError, match="design must be one of"):
        dz.score_weights("nope", 3, random.Random(0), alpha=0.8, minority=0.2)


def test_rollout_rewards_use_per_pair_weights():
    obj_a = torch.tensor([[0.5, 0.2, 0.1], [0.1, 0.6, 0.2]], dtype=torch.float64)
    obj_b = torch.tensor([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3]], dtype=torch.float64)
    z = torch.zeros(2)
    b = tr.Rollout(z, z, z, z, z, z, obj_a, obj_b)
    ra, rb = b.rewards(0.75)
    torch.testing.assert_close(ra, torch.tensor([0.425, 0.225]))
    b.weights = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
    ra, rb = b.rewards(0.75)
    torch.testing.assert_close(ra, torch.tensor([0.5, 0.6]))
    torch.testing.assert_close(rb, torch.tensor([0.1, 0.3]))


def test_group_rewards_by_hand():
    objs = {"joy": 0.6, "formal": 0.2, "calm": 0.1}
    assert pt.group_rewards("homogeneous", objs, 0.8, 0.2) == {"all": pytest.approx(0.52)}
    assert list(pt.group_rewards("groups", objs, 0.8, 0.2).values()) == [0.6, 0.2]
    assert list(pt.group_rewards("armorm", objs, 0.8, 0.2).values()) == pytest.approx([0.5, 0.3])


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    model, _ = lang.load_or_train_base(tmp_path_factory.mktemp("base"), lang.BaseConfig(steps=20),
                                       progress=False)
    return model


def test_group_shares_recorded_and_rebel_weights_follow_the_pairs(tiny_base):
    cfg = tr.TrainConfig(iterations=2, prompts=8, design="groups", minority=0.3)
    _, rebel = tr.train(tiny_base, tr.Method("REBEL", "rebel"), cfg, seed=3)
    assert len(rebel["group_share"]) == cfg.iterations * cfg.passes
    for (w0, p0), (w1, p1) in rebel["group_share"]:  # uniform weights: share = pairs' share
        assert w0 == pytest.approx(p0) and w1 == pytest.approx(p1) and p0 + p1 == pytest.approx(1)
    _, grp = tr.train(tiny_base, tr.Method("g", "group-chi2", 0.5), cfg, seed=3)
    assert all(s[0][0] + s[1][0] == pytest.approx(1.0) for s in grp["group_share"])
    # same prompts and samples before the first update: the designs are paired by seed
    assert grp["objectives"][0] == rebel["objectives"][0]
    with pytest.raises(ValueError, match="needs a reward design with groups"):
        tr.train(tiny_base, tr.Method("g", "group-kl", 0.1),
                 tr.TrainConfig(iterations=1, prompts=4), seed=0)


def test_offline_regime_cycles_over_fixed_pairs(tiny_base):
    cfg = tr.TrainConfig(iterations=6, prompts=4, regime="offline", offline_batches=3)
    _, curves = tr.train(tiny_base, tr.Method("REBEL", "rebel"), cfg, seed=4)
    seen = [tuple(o) for o in curves["objectives"]]
    assert len(set(seen)) <= 3  # three fixed batches, two epochs
    assert sorted(seen[:3]) == sorted(seen[3:])  # every batch once per epoch
    with pytest.raises(ValueError, match="regime must be one of"):
        tr.train(tiny_base, tr.Method("REBEL", "rebel"), tr.TrainConfig(regime="x"), seed=0)


def test_cli_quick_protocol_chooses_radii_on_validation_and_reports_gaps(tmp_path):
    out = tmp_path / "rob"
    argv = ["experiment", "robustness", "--quick", "--iterations", "2", "--out", str(out),
            "--cache-dir", str(tmp_path / "base"), "--no-progress"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["design"], res["regime"], res["primary"]) == ("groups", "online", "worst_group")
    assert list(res["methods"]) == ["REBEL", "chi2-REBEL", "KL-REBEL", "W-REBEL",
                                    "group-chi2-REBEL", "group-KL-REBEL", "DPO"]
    for kind, rho in res["chosen"].items():  # the best validation gap of its grid
        val = res["validation"][kind]
        assert rho in pt.RADII[kind]
        assert val[str(rho)]["mean"] == max(v["mean"] for v in val.values())
        assert res["methods"][pt.LABELS[kind]]["param"] == rho
    front = res["frontier"]["per_seed"]
    for name, s in res["methods"].items():
        if name == "REBEL":
            assert "gap_worst_group" not in s
            continue
        g = s["gap_worst_group"]
        assert g["gaps"] == pytest.approx([fr.frontier_gap(p, f) for p, f in zip(g["points"],
                                                                                 front)])
        assert g["n"] == 2
    assert res["methods"]["DPO"]["minority_share"] is None
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "| group-chi2-REBEL |" in (out / "table.md").read_text()


@pytest.mark.parametrize("bad", [["--minority", "0.7"], ["--regime", "sideways"],
                                 ["--seeds", "0"], ["--design", "mixed"]])
def test_cli_rejects_bad_protocol_settings(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["experiment", "robustness", *bad])
    assert exc.value.code == 2
    assert "error: argument " + bad[0] in capsys.readouterr().err
