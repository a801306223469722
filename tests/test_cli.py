"""The CLI accepts what the `deepspeed` launcher adds (--local_rank before or after the command)
and the config file as `--config FILE` or the first positional `*.yaml`."""

from __future__ import annotations

import pytest

from drorebel.cli import build_parser


@pytest.mark.parametrize("argv", [
    ["--local_rank=1", "train", "--config", "run.yaml", "lr=1e-5"],
    ["train", "--local_rank=1", "--config", "run.yaml", "lr=1e-5"],
    ["train", "--config", "run.yaml", "lr=1e-5"],
])
def test_train_parses_with_launcher_flags(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.command == "train" and args.config == "run.yaml"
    assert args.overrides == ["lr=1e-5"]


def test_unknown_command_is_refused() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["trian"])


@pytest.mark.parametrize("argv, config, overrides", [
    (["train", "--config", "run.yaml", "lr=1e-5"], "run.yaml", ["lr=1e-5"]),
    (["train", "run.yaml", "learning_rate=1e-5"], "run.yaml", ["learning_rate=1e-5"]),
    (["--local_rank=0", "train", "run.yml"], "run.yml", []),
    (["train", "model=m"], None, ["model=m"]),
])
def test_train_config_is_the_option_or_the_first_yaml(argv, config, overrides) -> None:
    from drorebel.trainer.cli import _config_and_overrides

    assert _config_and_overrides(build_parser().parse_args(argv)) == (config, overrides)


def test_two_config_files_exit_2(capsys) -> None:
    from drorebel.cli import main

    assert main(["train", "--config", "a.yaml", "b.yaml"]) == 2
    assert "two config files" in capsys.readouterr().err
    assert main(["precompute-ref", "--out", "x.jsonl", "model=m", "lerning_rate=1"]) == 2
    assert "did you mean `learning_rate`" in capsys.readouterr().err
