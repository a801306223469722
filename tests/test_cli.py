"""The CLI accepts what the `deepspeed` launcher adds (--local_rank before or after the command)."""

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
