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


def test_run_exits_normally_in_one_process_and_hard_after_a_distributed_run(monkeypatch):
    # after a torchrun/deepspeed launch the process leaves with os._exit (a live gloo group
    # torn down during interpreter finalization can abort a finished rank); otherwise sys.exit
    import drorebel.cli as cli

    calls = []
    monkeypatch.setattr(cli.os, "_exit", lambda code: calls.append(code))
    monkeypatch.setattr(cli, "main", lambda: 2)
    monkeypatch.setattr(cli, "_DISTRIBUTED_RUN", False)
    with pytest.raises(SystemExit) as info:
        cli.run()
    assert info.value.code == 2 and calls == []

    def distributed_main() -> int:
        cli._DISTRIBUTED_RUN = True  # what main() sets when it destroyed its process group
        return 0

    monkeypatch.setattr(cli, "main", distributed_main)
    with pytest.raises(SystemExit):  # the patched os._exit returns; sys.exit follows
        cli.run()
    assert calls == [0]


def test_main_closes_only_a_group_the_trainer_created(monkeypatch):
    import drorebel.cli as cli
    from drorebel.trainer import engine

    closed = []
    monkeypatch.setattr(engine, "close_process_group", lambda synchronise: closed.append(
        synchronise))
    monkeypatch.setattr(engine, "owns_process_group", lambda: True)
    monkeypatch.setattr(cli, "_DISTRIBUTED_RUN", False)
    assert cli._close_distributed(finished=True) and closed == [True]
    assert cli._close_distributed(finished=False) and closed == [True, False]
    monkeypatch.setattr(engine, "owns_process_group", lambda: False)
    assert not cli._close_distributed(finished=True) and closed == [True, False]
