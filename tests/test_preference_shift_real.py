"""Real-model preference-shift experiment end to end on CPU: a tiny llama policy and a tiny
3-label sequence-classification reward model built from configs, 3 methods x 1 seed x 1 step."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml
from trainer_fixtures.online_rewards import write_prompts
from trainer_fixtures.tiny import TINY_MODEL, build_tokenizer

from drorebel.cli import main
from drorebel.experiments.preference_shift.mixtures import mixture_rewards
from drorebel.experiments.preference_shift.real import summarise_real
from drorebel.experiments.preference_shift.real_config import load_experiment
from drorebel.trainer.config import ConfigError


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Saved tiny policy, tiny 3-head reward model, 16 prompts and an experiment YAML."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    d = tmp_path_factory.mktemp("psr")
    tok = AutoTokenizer.from_pretrained(build_tokenizer(str(d / "tok")))
    mc = dict(TINY_MODEL)
    kind = mc.pop("model_type")
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **mc))
    policy.save_pretrained(d / "policy")
    tok.save_pretrained(d / "policy")
    rm = AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model(kind, num_labels=3, pad_token_id=0, **mc))
    rm.save_pretrained(d / "rm")
    tok.save_pretrained(d / "rm")
    prompts = write_prompts(str(d / "prompts.jsonl"), n=16)
    exp = {"alpha_train": [0.7, 0.3, 0.0], "objectives": ["joy", "formal", "calm"],
           "methods": {"REBEL": {"divergence": "none"},
                       "chi2-REBEL": {"divergence": "chi2", "rho": 0.5},
                       "DPO": {"loss": "dpo", "beta": 0.5}},
           "seeds": [0], "eval_fraction": 0.25, "eval_batch_size": 2,
           "seen_alphas": [0.0, 0.3, 1.0], "unseen_betas": [0.5], "unseen_alphas": [0.0, 1.0],
           "train": {"model": str(d / "policy"), "reward_model": str(d / "rm"),
                     "prompt_file": prompts, "rollout_batch_size": 4, "batch_size": 4,
                     "num_passes": 1, "max_new_tokens": 4, "max_steps": 1, "lr": 1e-2,
                     "eta": 5.0, "progress": False, "max_length": 24,
                     "max_prompt_length": 12}}
    path = d / "exp.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))  # keep the method order
    return {"dir": d, "config": str(path), "exp": exp}


def test_end_to_end_results_and_hand_checked_mixtures(setup, capsys):
    out = setup["dir"] / "out"
    assert main(["experiment", "preference-shift-real", "--config", setup["config"],
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| REBEL |" in printed and "| chi2-REBEL |" in printed and "+unseen" in printed
    assert "train REBEL seed 0" in printed  # progress per run
    for name in ("results.json", "table.md", "mixtures.png", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "REBEL" / "seed0" / "final").is_dir()
    assert (out / "chi2-REBEL" / "seed0" / "final").is_dir()
    assert (out / "DPO" / "seed0" / "final").is_dir()
    assert "| DPO |" in printed and "train DPO seed 0" in printed
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"config", "objectives", "mixtures", "methods", "base", "per_seed",
                        "curves", "runs", "timing"}
    assert list(res["methods"]) == ["REBEL", "chi2-REBEL", "DPO"]
    assert res["seen"] == [0, 1] and res["unseen"] == [2]
    assert len(res["mixtures"]["seen"]) == 3 and len(res["mixtures"]["unseen"]) == 2
    held_out = 4  # round(0.25 * 16) prompts, two samples each
    for name in ("REBEL", "chi2-REBEL", "DPO", "base"):
        (p,) = res["per_seed"][name]
        assert p["n_responses"] == 2 * held_out
        o = p["objective_means"]
        assert len(o) == 3 and all(math.isfinite(x) for x in o)
        s = res["base"] if name == "base" else res["methods"][name]
        # by hand from the saved per-objective means (one seed: mean = the value, std = 0)
        seen, unseen = s["per_mixture"]["seen"], s["per_mixture"]["unseen"]
        assert seen["a=0.3"]["mean"] == pytest.approx(0.3 * o[0] + 0.7 * o[1], abs=1e-12)
        assert seen["a=1"]["mean"] == pytest.approx(o[0], abs=1e-12)
        assert unseen["+calm b=0.5,a=0"]["mean"] == pytest.approx(0.5 * o[1] + 0.5 * o[2],
                                                                 abs=1e-12)
        assert unseen["+calm b=0.5,a=1"]["mean"] == pytest.approx(0.5 * o[0] + 0.5 * o[2],
                                                                 abs=1e-12)
        assert s["train_mixture"]["mean"] == pytest.approx(0.7 * o[0] + 0.3 * o[1], abs=1e-12)
        every = [o[1], 0.3 * o[0] + 0.7 * o[1], o[0], 0.5 * o[1] + 0.5 * o[2],
                 0.5 * o[0] + 0.5 * o[2]]
        assert s["all_worst"]["mean"] == pytest.approx(min(every), abs=1e-12)
        assert s["seen_worst"]["mean"] == pytest.approx(min(every[:3]), abs=1e-12)
        assert s["all_worst"]["std"] == 0.0
    worst = [res["methods"][m]["all_worst"]["mean"] for m in ("chi2-REBEL", "REBEL")]
    d = res["methods"]["chi2-REBEL"]["all_worst_minus_rebel"]["mean"]
    assert d == pytest.approx(worst[0] - worst[1], abs=1e-12)
    assert len(res["curves"]["REBEL"][0]["loss"]) == 1  # one iteration
    assert math.isfinite(res["curves"]["REBEL"][0]["loss"][0])
    # DPO trained with the DPO loss: its first-step loss is log 2 on untied pairs (policy = the
    # sampling reference) and 0 for tied ones, so the mean lies in [0, log 2]
    dpo_rows = [json.loads(x) for x in (out / "DPO" / "seed0" / "metrics.jsonl").open()]
    assert "dpo/tie_fraction" in dpo_rows[0] and "dro/robust_objective" not in dpo_rows[0]
    assert 0.0 <= dpo_rows[0]["loss"] <= math.log(2.0) + 1e-5
    d_dpo = res["methods"]["DPO"]["all_worst_minus_rebel"]["mean"]
    assert d_dpo == pytest.approx(res["methods"]["DPO"]["all_worst"]["mean"] - worst[1],
                                  abs=1e-12)
    # a rerun keeps the trained models (no retraining) and the same evaluation
    metrics = out / "REBEL" / "seed0" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    assert main(["experiment", "preference-shift-real", "--config", setup["config"],
                 "--out", str(out), "methods=[REBEL]", "--no-progress"]) == 0
    assert metrics.stat().st_mtime_ns == before
    again = json.loads((out / "results.json").read_text())
    assert list(again["methods"]) == ["REBEL"]
    assert (again["per_seed"]["REBEL"][0]["objective_means"]
            == res["per_seed"]["REBEL"][0]["objective_means"])
    assert main(["experiment", "preference-shift-real", "--config", setup["config"],
                 "--out", str(out), "--no-progress", "methods=[REBEL]", "max_eval_prompts=2",
                 "eval_generation={do_sample: false}"]) == 0
    greedy = json.loads((out / "results.json").read_text())["per_seed"]["REBEL"][0]
    assert greedy["n_responses"] == 4


def test_summary_statistics_over_seeds():
    mix = {"seen": {"x": [1.0, 0.0, 0.0], "y": [0.0, 1.0, 0.0]}, "unseen": {"z": [0, 0, 1.0]}}
    per_seed = [{"objective_means": [1.0, 2.0, 0.5]}, {"objective_means": [3.0, 0.0, 1.5]}]
    assert mixture_rewards([1.0, 2.0, 0.5], mix) == {"seen": {"x": 1.0, "y": 2.0},
                                                     "unseen": {"z": 0.5}}
    s = summarise_real(per_seed, mix, [0.5, 0.5, 0.0], ref=list(reversed(per_seed)))
    assert s["train_mixture"] == {"mean": 1.5, "std": 0.0}
    assert s["all_worst"]["mean"] == pytest.approx(0.25)  # worst: 0.5 and 0.0
    assert s["all_worst"]["std"] == pytest.approx(math.sqrt(0.125))
    assert s["seen_mean"]["mean"] == pytest.approx(1.5)
    assert s["all_worst_minus_rebel"]["mean"] == pytest.approx(0.0)  # +0.5 and −0.5
    assert s["all_worst_minus_rebel"]["std"] == pytest.approx(math.sqrt(0.5))


@pytest.mark.parametrize("override, message", [
    (["reward_model=null"], "needs a reward: set `reward_model`"),
    (["alpha_train=[0.7, 0.3]"], r"`alpha_train` has 2 entries .* num_labels = k = 3"),
    (["alpha_train=[0.5, 0.3, 0.2]"], "exactly two seen objectives"),
    (["reward_model=/nonexistent/rm"], "`reward_model`: path"),
    (["mode=offline"], "set by the experiment per run"),
    (["methods=[IPO]"], r"methods \['IPO'\] are not configured"),
])
def test_bad_config_fails_with_a_clear_message(setup, override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(setup["config"], override)


def test_bad_method_field_is_named(setup, tmp_path):
    cfg = load_experiment(setup["config"])
    cfg.methods["KL"] = {"divergence": "kl"}  # neither rho nor tau
    with pytest.raises(ConfigError, match="method 'KL'.*needs `rho`"):
        cfg.run_config("KL", 0, str(tmp_path))
    cfg.methods["chi2-DPO"] = {"loss": "dpo", "divergence": "chi2", "rho": 0.5}
    with pytest.raises(ConfigError, match="method 'chi2-DPO'.*divergence='none'"):
        cfg.run_config("chi2-DPO", 0, str(tmp_path))
    cfg.methods["DPO0"] = {"loss": "dpo", "beta": 0.0}
    with pytest.raises(ConfigError, match="method 'DPO0'.*beta"):
        cfg.run_config("DPO0", 0, str(tmp_path))


def test_gpu_config_parses_with_a_local_reward_model(setup):
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "preference_shift_gpu.yaml")
    rm = str(setup["dir"] / "rm")  # the tiny 3-head model stands in for the real one
    cfg = load_experiment(path, [f"reward_model={rm}", "alpha_train=[0.7, 0.3, 0.0]",
                                 "objectives=null", "seen=null", "unseen=null"])
    assert list(cfg.methods) == ["REBEL", "chi2-REBEL", "KL-REBEL", "W-REBEL", "DPO"]
    for method in cfg.methods:
        tcfg = cfg.run_config(method, 0, "/tmp/x")
        assert tcfg.mode == "online" and tcfg.reward_weights == [0.7, 0.3, 0.0]
    assert cfg.run_config("W-REBEL", 0, "/tmp/x").w_target == "hidden"
    dpo = cfg.run_config("DPO", 0, "/tmp/x")
    assert (dpo.loss, dpo.beta, dpo.divergence) == ("dpo", 0.1, "none")
    assert cfg.run_config("REBEL", 0, "/tmp/x").loss == "rebel"


def _columns_reward(prompts, responses, bonus, **_):
    """Three objectives: #words of the response, the constant 1, the prompt's `bonus` column."""
    return [[float(len(r.split())), 1.0, float(b)] for r, b in zip(responses, bonus)]


def test_evaluate_model_scores_every_sample_once(setup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drorebel.experiments.preference_shift.real import evaluate_model
    from drorebel.trainer.config import TrainConfig
    from drorebel.trainer.rollout import load_prompts

    d = setup["dir"]
    tok = AutoTokenizer.from_pretrained(d / "policy")
    model = AutoModelForCausalLM.from_pretrained(d / "policy")
    prompts = load_prompts(str(d / "prompts.jsonl"), tok, 12, "truncate")  # bonus = row index
    cfg = TrainConfig.from_dict({**setup["exp"]["train"], "reward_model": None,
                                 "reward_fn": "x:y", "mode": "online"})
    calls = []

    def reward(*a, **kw):
        calls.append(len(a[1]))
        return _columns_reward(*a, **kw)

    got = evaluate_model(model, tok, prompts, (reward, "r"), cfg, 7, 5, torch.device("cpu"))
    assert calls == [10, 10, 10, 2]  # batches of 5 prompts x 2 samples, each scored once
    assert got["n_responses"] == 32
    assert got["objective_means"][1] == 1.0
    assert got["objective_means"][2] == pytest.approx(7.5, abs=1e-12)  # mean of 0..15
    assert 0.0 <= got["objective_means"][0] <= cfg.max_new_tokens
    again = evaluate_model(model, tok, prompts, (_columns_reward, "r"), cfg, 7, 5,
                           torch.device("cpu"))
    assert again == got  # the sampling seed fixes the samples
