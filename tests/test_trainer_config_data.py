"""Trainer stage A: config (YAML + key=value overrides) and offline data validation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trainer_fixtures.tiny import build_tokenizer

from drorebel.trainer.config import ConfigError, TrainConfig, parse_overrides
from drorebel.trainer.data import DataError, normalise_rows, tokenise_pairs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def _row(**kw):
    row = {"prompt": "the cat", "response_a": "good", "response_b": "bad",
           "reward_a": 1.0, "reward_b": 0.0}
    row.update(kw)
    return row


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model: some/model\ndivergence: chi2\nrho: 0.5\nlr: 1.0e-4\n")
    cfg = TrainConfig.from_yaml(str(p), ["lr=3e-5", "batch_size=8", "model_config=null"])
    assert (cfg.lr, cfg.batch_size, cfg.rho, cfg.divergence) == (3e-5, 8, 0.5, "chi2")
    assert cfg.tokenizer == "some/model"
    assert parse_overrides(["model_config={hidden_size: 32}"]) == {
        "model_config": {"hidden_size": 32}}


@pytest.mark.parametrize("overrides, match", [
    (["divergence=tv"], "divergence"),
    (["batch_size=two"], "batch_size"),
    (["batch_size=0"], "batch_size"),
    (["lerning_rate=1"], "unknown config field"),
    (["divergence=kl"], "rho"),
    (["noequals"], "key=value"),
    (["eta=0"], "eta"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_yaml(None, ["model=m", *overrides])


def test_missing_paths_refused(tmp_path):
    cfg = TrainConfig(model=str(tmp_path / "nope"), train_file=str(tmp_path / "x.jsonl"))
    with pytest.raises(ConfigError, match="train_file"):
        cfg.check_paths()
    (tmp_path / "x.jsonl").write_text("")
    with pytest.raises(ConfigError, match="model"):
        cfg.check_paths()


def test_fingerprint_ignores_only_bookkeeping():
    a = TrainConfig(model="m", max_steps=5)
    assert a.fingerprint() == TrainConfig(model="m", max_steps=5, stop_at_step=2,
                                          save_steps=7, resume="auto").fingerprint()
    assert a.fingerprint() != TrainConfig(model="m", lr=1.0, max_steps=5).fingerprint()
    assert a.fingerprint() != TrainConfig(model="m", max_steps=6).fingerprint()


@pytest.mark.parametrize("row, match", [
    ({"prompt": "x", "response_a": "good", "reward_a": 1.0, "reward_b": 0.0},
     r"row 1: missing.*response_b"),
    (_row(reward_a="high"), r"row 1: field 'reward_a' must be a number"),
    (_row(reward_b=math.nan), r"row 1: field 'reward_b' is not finite"),
    (_row(reward_b=math.inf), r"row 1: field 'reward_b' is not finite"),
    (_row(response_a="  "), r"row 1: field 'response_a' is empty"),
    (_row(response_b=3), r"row 1: field 'response_b' must be a string or chat"),
    (_row(ref_logp_a=-1.0, ref_logp_b=True), r"row 1: field 'ref_logp_b' must be a number"),
])
def test_bad_rows_named(row, match):
    with pytest.raises(DataError, match=match):
        normalise_rows([_row(), row])


def test_trl_names_mapped():
    rows = normalise_rows([{"prompt": "p", "chosen": "good", "rejected": "bad",
                            "chosen_reward": 2, "rejected_reward": -1}])
    assert rows[0]["response_a"] == "good" and rows[0]["reward_b"] == -1


def test_tokenise_labels_and_padding(tok):
    data = tokenise_pairs(normalise_rows([_row(), _row(response_a="good good nice")]), tok,
                          max_length=16, max_prompt_length=8, overlong="truncate")
    # prompt "the cat" = 2 tokens; response "good" + <eos>
    good, nice, eos = tok.convert_tokens_to_ids(["good", "nice", "<eos>"])
    assert data.labels_a[0].tolist() == [-100, -100, good, eos, -100, -100]
    assert data.labels_a[1].tolist() == [-100, -100, good, good, nice, eos]
    assert data.mask_a[0].tolist() == [1, 1, 1, 1, 0, 0]
    assert data.rewards_a.dtype == torch.float64 and data.ref_a is None


def test_overlong_prompt_truncate_or_drop(tok):
    rows = normalise_rows([_row(prompt="the cat is a dog"), _row()])
    t = tokenise_pairs(rows, tok, 16, 3, "truncate")
    assert (t.n_truncated, t.n_dropped, len(t)) == (1, 0, 2)
    assert t.ids_a[0, :3].tolist() == tok.convert_tokens_to_ids(["is", "a", "dog"])
    d = tokenise_pairs(rows, tok, 16, 3, "drop")
    assert (d.n_truncated, d.n_dropped, len(d)) == (0, 1, 1)
    with pytest.raises(DataError, match="all 1 rows were dropped"):
        tokenise_pairs(rows[:1], tok, 16, 3, "drop")


def test_chat_messages(tok):
    row = _row(prompt=[{"role": "user", "content": "the cat"}],
               response_a=[{"role": "assistant", "content": "good"}],
               response_b=[{"role": "assistant", "content": "bad awful"}])
    data = tokenise_pairs(normalise_rows([row]), tok, 16, 8, "truncate")
    u, a, good, bad, awful = tok.convert_tokens_to_ids(["<u>", "<a>", "good", "bad", "awful"])
    assert data.ids_a[0, :4].tolist() == [u, *tok.convert_tokens_to_ids(["the", "cat"]), a]
    assert [x for x in data.labels_a[0].tolist() if x != -100] == [good]
    assert [x for x in data.labels_b[0].tolist() if x != -100] == [bad, awful]


def test_cached_ref_columns(tok, tmp_path):
    rows = normalise_rows([_row(ref_logp_a=-3.5, ref_logp_b=-2.0)])
    data = tokenise_pairs(rows, tok, 16, 8, "truncate")
    assert data.ref_a.tolist() == [-3.5] and data.ref_b.tolist() == [-2.0]
    with pytest.raises(DataError, match="row 1: ref_logp"):
        normalise_rows([_row(ref_logp_a=-1.0, ref_logp_b=-1.0), _row()])


def test_load_rows_jsonl(tmp_path):
    from drorebel.trainer.data import load_rows

    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(_row(reward_a=float(i))) for i in range(3)))
    assert [r["reward_a"] for r in load_rows(str(p))] == [0.0, 1.0, 2.0]


def test_shipped_configs_parse():
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    cfg = TrainConfig.from_yaml(os.path.join(root, "offline_chi2.yaml"))
    assert (cfg.divergence, cfg.rho, cfg.lr, cfg.trust_remote_code) == ("chi2", 0.5, 1e-6, False)
    tiny = TrainConfig.from_yaml(os.path.join(root, "tiny_cpu.yaml"))
    assert tiny.model_config["hidden_size"] == 32
    zero3 = json.load(open(os.path.join(root, "ds_zero3.json")))["zero_optimization"]
    assert zero3["stage"] == 3 and zero3["stage3_gather_16bit_weights_on_model_save"] is True
    assert json.load(open(os.path.join(root, "ds_zero2.json")))["zero_optimization"]["stage"] == 2
