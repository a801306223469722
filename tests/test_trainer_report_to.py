"""`report_to: [jsonl, tensorboard, wandb]`: the list, the `tensorboard` alias, missing
packages as config errors before the model loads, and an offline Weights & Biases run."""

from __future__ import annotations

import glob
import json
import os

import pytest
from trainer_fixtures.tiny import base_overrides

import drorebel.trainer.config as config
import drorebel.trainer.config_checks as config_mod
from drorebel.cli import main
from drorebel.trainer.config import ConfigError, TrainConfig
from drorebel.trainer.loop import train
from drorebel.trainer.metrics import read_jsonl


def test_report_to_values_and_the_tensorboard_alias(monkeypatch):
    monkeypatch.setattr(config_mod, "_has_tensorboard", lambda: True)
    monkeypatch.setattr(config_mod, "_has_package", lambda name: True)
    assert TrainConfig(model="m").report_to == ["jsonl"]
    assert TrainConfig(model="m", report_to="none").report_to == ["jsonl"]  # jsonl: always
    assert TrainConfig(model="m", report_to=[]).report_to == ["jsonl"]
    cfg = TrainConfig(model="m", tensorboard=True)
    assert cfg.report_to == ["jsonl", "tensorboard"]
    cfg = TrainConfig(model="m", report_to=["wandb", "tensorboard", "wandb"])
    assert cfg.report_to == ["jsonl", "tensorboard", "wandb"] and cfg.tensorboard
    assert TrainConfig.from_yaml(None, ["model=m", "report_to=wandb"]).report_to == \
        ["jsonl", "wandb"]
    # it changes no maths: not part of the checkpoint fingerprint
    assert cfg.fingerprint() == TrainConfig(model="m").fingerprint()
    assert "report_to" in config._RESUME_FREE
    for bad in (["mlflow"], "comet", [1]):
        with pytest.raises(ConfigError) as err:
            TrainConfig(model="m", report_to=bad)
        assert str(err.value).startswith("`report_to` must be a list of ")
    with pytest.raises(ConfigError, match="must be list"):
        TrainConfig(model="m", report_to={"wandb": True})


def test_missing_package_is_a_config_error_before_the_model_loads(tmp_path, monkeypatch,
                                                                  capsys):
    import drorebel.trainer.loop as loop

    monkeypatch.setattr(config_mod, "_has_package", lambda name: name != "wandb")
    monkeypatch.setattr(config_mod, "_has_tensorboard", lambda: False)
    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("train() reached"))
    with pytest.raises(ConfigError, match="report_to includes wandb, which needs the wandb"):
        TrainConfig(model="m", report_to=["wandb"])
    with pytest.raises(ConfigError, match="report_to includes tensorboard"):
        TrainConfig(model="m", report_to=["tensorboard"])
    assert main(["train", "model=m", "report_to=[jsonl, wandb]"]) == 2
    err = capsys.readouterr().err
    assert "report_to includes wandb" in err and err.count("\n") == 1


def _wandb_env(tmp_path, monkeypatch) -> str:
    pytest.importorskip("wandb")
    wdir = str(tmp_path / "wandb-dir")
    os.makedirs(wdir)
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", wdir), ("WANDB_SILENT", "true"),
                       ("WANDB_PROJECT", "drorebel-test"),
                       ("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config")),
                       ("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache")),
                       ("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))):
        monkeypatch.setenv(var, value)
    for var in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return wdir


def test_wandb_offline_run_holds_the_scalars(tmp_path, monkeypatch):
    wdir = _wandb_env(tmp_path, monkeypatch)
    cfg = TrainConfig.from_dict(base_overrides(str(tmp_path), max_steps=3,
                                               report_to=["jsonl", "wandb"]))
    rows = read_jsonl(train(cfg).metrics_path)  # jsonl still written
    assert [r["step"] for r in rows] == [1, 2, 3]
    runs = glob.glob(os.path.join(wdir, "wandb", "offline-run-*"))
    assert len(runs) == 1, runs
    files = glob.glob(os.path.join(runs[0], "run-*.wandb"))
    assert len(files) == 1
    with open(files[0], "rb") as f:
        blob = f.read()
    for key in rows[0]:  # every logged scalar name is in the run's records
        assert key.encode() in blob, key
    # the step values went with them (wandb stores each value as JSON text)
    assert json.dumps(rows[-1]["loss"]).encode() in blob
    assert not os.path.exists(os.path.join(cfg.output_dir, "wandb"))  # WANDB_DIR wins


def test_wandb_init_failure_is_one_config_line(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def refuse(**kw):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login()\n"
                                      "more text")

    monkeypatch.setattr(wandb, "init", refuse)
    from drorebel.trainer.metrics import open_wandb

    with pytest.raises(ConfigError) as err:
        open_wandb(str(tmp_path), {})
    msg = str(err.value)
    assert msg.startswith("report_to wandb: wandb.init failed (api_key not configured")
    assert "WANDB_MODE=offline" in msg and "\n" not in msg
