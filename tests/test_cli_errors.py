"""The CLI reports a user's mistake as ONE stderr line and exit code 2, keeps the traceback of
a bug, and re-raises everything under ``--debug`` / ``DROREBEL_DEBUG=1`` (drorebel/cli.py)."""

from __future__ import annotations

import errno
import json

import pytest
from trainer_fixtures.tiny import base_overrides

from drorebel.cli import main
from drorebel.trainer.errors import ConfigError, DataError, UserError

BAD_YAML = "lr: 1e-5\nmodel_config: {hidden_size: 32\n  eta: 1\n"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("DROREBEL_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def _one_error_line(capsys, command: str = "train") -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"drorebel {command}: error: "), err
    return lines[0]


@pytest.fixture
def good_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1.0e-5\nmodel: m\n")
    return str(path)


@pytest.fixture
def bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_YAML)
    return str(path)


@pytest.mark.parametrize("command", [["train"], ["precompute-ref", "--out", "x.jsonl"]])
def test_malformed_yaml_is_one_line_with_file_line_column(capsys, bad_yaml, command):
    assert main([*command, bad_yaml]) == 2
    line = _one_error_line(capsys, command[0])
    assert f"{bad_yaml}:3:6: invalid YAML" in line


def test_malformed_experiment_yaml(capsys, bad_yaml, tmp_path):
    argv = ["experiment", "preference-shift-real", "--config", bad_yaml, "--out", str(tmp_path)]
    assert main(argv) == 2
    assert f"{bad_yaml}:3:6: invalid YAML" in _one_error_line(
        capsys, "experiment preference-shift-real")


@pytest.mark.parametrize("argv, expected", [
    (["train_file=/nonexistent/pairs.jsonl"], "`train_file`: file '/nonexistent/pairs.jsonl' "
                                              "does not exist"),
    (["lerning_rate=1"], "did you mean `learning_rate`"),
    (["lr=[1,"], "override 'lr=[1,': the value is not valid YAML"),
    (["eta=-1"], "`eta` must be > 0"),
])
def test_bad_settings(capsys, good_yaml, argv, expected):
    assert main(["train", good_yaml, *argv]) == 2
    assert expected in _one_error_line(capsys)


def test_missing_and_unreadable_config_files(capsys, tmp_path):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    assert main(["train", "--config", str(tmp_path)]) == 2  # a directory
    assert f"cannot read config file {str(tmp_path)!r}" in _one_error_line(capsys)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe lr: 1\n")
    assert main(["train", str(binary)]) == 2
    assert "is not UTF-8 text" in _one_error_line(capsys)


def test_bad_data_row(capsys, tmp_path):
    import datasets

    # datasets' own "Generating train split" bar goes to stderr (drorebel/trainer/data.py does
    # not turn it off); the error report itself is what is checked here
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        _bad_data_row(capsys, tmp_path)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _bad_data_row(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response_a": "good", "response_b": "",
                               "reward_a": 1, "reward_b": 0}) + "\n")
    cfg = base_overrides(str(tmp_path))
    mc = "model_config={" + ", ".join(f"{k}: {v}" for k, v in cfg["model_config"].items()) + "}"
    assert main(["train", f"tokenizer={cfg['tokenizer']}", f"train_file={bad}", mc,
                 f"output_dir={tmp_path / 'run'}"]) == 2
    assert "row 0: field 'response_b' is empty" in _one_error_line(capsys)


def _raise_from_train(monkeypatch, exc: BaseException) -> None:
    """Make the training loop raise ``exc`` (the config is built for real)."""
    import drorebel.trainer.loop as loop

    def boom(cfg):
        raise exc

    monkeypatch.setattr(loop, "train", boom)


def test_multi_line_message_is_collapsed(capsys, monkeypatch, good_yaml):
    _raise_from_train(monkeypatch, DataError("pairs.jsonl line 3:\n  field 'x'\n\nis empty"))
    assert main(["train", good_yaml]) == 2
    assert _one_error_line(capsys).endswith("error: pairs.jsonl line 3: field 'x' is empty")


def test_disk_full(capsys, monkeypatch, good_yaml):
    where = "/runs/x/.tmp-checkpoint-4/model.safetensors"
    _raise_from_train(monkeypatch, OSError(errno.ENOSPC, "No space left on device", where))
    assert main(["train", good_yaml]) == 2
    assert _one_error_line(capsys).endswith(f"error: no space left on device at {where}")


def test_interrupt_names_the_last_checkpoint(capsys, monkeypatch, tmp_path, good_yaml):
    out = tmp_path / "run"
    for step in (2, 4):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (out / ".tmp-checkpoint-6").mkdir()  # incomplete: not the last checkpoint
    _raise_from_train(monkeypatch, KeyboardInterrupt())
    assert main(["train", good_yaml, f"output_dir={out}"]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == [f"drorebel train: interrupted; the last checkpoint is at "
                                f"{out / 'checkpoint-4'} (continue with resume=auto)"]


def test_only_rank_0_prints_but_every_rank_exits_2(capsys, monkeypatch, bad_yaml):
    monkeypatch.setenv("RANK", "1")
    assert main(["train", bad_yaml]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", bad_yaml]) == 2
    _one_error_line(capsys)


def test_a_bug_keeps_its_traceback(monkeypatch, good_yaml):
    _raise_from_train(monkeypatch, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", good_yaml])
    # an OSError about some other file is not the user's config either
    _raise_from_train(monkeypatch, FileNotFoundError(errno.ENOENT, "gone", "/tmp/other"))
    with pytest.raises(FileNotFoundError):
        main(["train", good_yaml])


@pytest.mark.parametrize("argv", [
    ["--debug", "train", "{bad}"],
    ["train", "--debug", "{bad}"],
    ["train", "{bad}", "--debug"],
    ["--debug", "precompute-ref", "--out", "x.jsonl", "{bad}"],
])
def test_debug_reraises(argv, bad_yaml):
    with pytest.raises(ConfigError, match="invalid YAML"):
        main([a.format(bad=bad_yaml) for a in argv])


def test_debug_from_the_environment(monkeypatch, capsys, bad_yaml, good_yaml):
    monkeypatch.setenv("DROREBEL_DEBUG", "1")
    with pytest.raises(UserError):
        main(["train", bad_yaml])
    _raise_from_train(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        main(["train", good_yaml])
    monkeypatch.setenv("DROREBEL_DEBUG", "0")
    assert main(["train", bad_yaml]) == 2
    _one_error_line(capsys)
