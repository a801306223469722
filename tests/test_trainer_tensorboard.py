"""tensorboard=true: scalars per logged step, purged after the checkpoint on resume; a clear
error when the package is missing. The writer is replaced by a recorder (tensorboard is an
optional dependency, not installed in CI)."""

from __future__ import annotations

import sys
import types

import pytest
from trainer_fixtures.tiny import base_overrides

import drorebel.trainer.config_checks as config_mod
from drorebel.trainer.config import ConfigError, TrainConfig
from drorebel.trainer.loop import train
from drorebel.trainer.metrics import read_jsonl


class _Recorder:
    writers: list[_Recorder] = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        _Recorder.writers.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch: pytest.MonkeyPatch) -> type[_Recorder]:
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = _Recorder
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    monkeypatch.setattr(config_mod, "_has_tensorboard", lambda: True)
    _Recorder.writers = []
    return _Recorder


def test_scalars_follow_the_jsonl_and_resume_purges(tmp_path, fake_tensorboard) -> None:
    kw = dict(max_steps=3, tensorboard=True, save_steps=1)
    first = train(TrainConfig.from_dict(base_overrides(str(tmp_path), stop_at_step=2, **kw)))
    train(TrainConfig.from_dict(base_overrides(str(tmp_path), resume="auto", **kw)))
    w1, w2 = fake_tensorboard.writers
    assert w1.log_dir.endswith("tensorboard") and w1.purge_step is None and w1.closed
    assert w2.purge_step == 3 and w2.closed  # events after the step-2 checkpoint are dropped
    rows = read_jsonl(first.metrics_path)
    got = {(tag, step): value for w in (w1, w2) for tag, value, step in w.scalars}
    assert {step for _, step in got} == {1, 2, 3}
    for row in rows:
        for key, value in row.items():
            if key != "step":
                assert got[(key, row["step"])] == pytest.approx(value)


def test_missing_package_is_a_config_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(config_mod, "_has_tensorboard", lambda: False)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        TrainConfig.from_dict(base_overrides(str(tmp_path), tensorboard=True))
