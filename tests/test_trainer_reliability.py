"""Trainer reliability: another run's output_dir, divergence guard, resume fallback, full disk.

Every run here is the tiny Llama of ``trainer_fixtures`` for 1–4 steps.
"""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from trainer_fixtures.tiny import base_overrides

import drorebel.trainer.loop as loop_mod
from drorebel.trainer.checkpoint import (
    CheckpointError,
    checkpoint_problem,
    latest_checkpoint,
    read_state,
    resume_candidates,
)
from drorebel.trainer.config import ConfigError, TrainConfig
from drorebel.trainer.engine import Engine
from drorebel.trainer.errors import UserError
from drorebel.trainer.loop import TrainingDiverged, train
from drorebel.trainer.metrics import read_jsonl
from drorebel.trainer.run_dir import NoSpaceLeft, agree

_TIMED = ("tokens_per_s", "peak_memory_gb")


def _cfg(tmp, **kw) -> TrainConfig:
    """The tiny run; fields given here are set after validation (so this also works for the
    settings config.py refuses, e.g. lr=inf, to reproduce the issue)."""
    late = {k: kw.pop(k) for k in ("overwrite_output_dir", "on_nonfinite", "lr_late")
            if k in kw}
    cfg = TrainConfig.from_dict(base_overrides(str(tmp), **kw))
    if "lr_late" in late:
        cfg.lr = late.pop("lr_late")
    for k, v in late.items():
        setattr(cfg, k, v)
    return cfg


def _files(path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes)."""
    out = {}
    for d, _, fs in os.walk(path):
        for f in fs:
            full = os.path.join(d, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in _TIMED} for r in rows]


def _no_model_load(monkeypatch):
    """Fail the test if training gets as far as loading the tokenizer or the model."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(loop_mod, "load_tokenizer", boom)
    monkeypatch.setattr(loop_mod, "create_engine", boom)


# ---- 1. another run's output_dir ----------------------------------------------------------

def test_new_run_in_another_runs_output_dir_is_refused_before_the_model_loads(
        tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, max_steps=2, save_steps=1)
    train(cfg)
    before = _files(cfg.output_dir)
    _no_model_load(monkeypatch)
    with pytest.raises(ConfigError, match="output_dir.*another run's files.*resume=auto.*"
                                          "overwrite_output_dir") as info:
        train(_cfg(tmp_path, max_steps=2, save_steps=1))
    assert "\n" not in str(info.value)
    assert "checkpoint-1" in str(info.value) and "metrics.jsonl" in str(info.value)
    assert _files(cfg.output_dir) == before  # nothing touched


def test_output_dir_that_is_a_file_is_refused(tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    (tmp_path / "run").write_text("x")
    with pytest.raises(ConfigError, match="output_dir"):
        train(_cfg(tmp_path))


def test_overwrite_deletes_nothing_and_rotates_only_its_own_checkpoints(tmp_path, capsys):
    old = _cfg(tmp_path, max_steps=4, save_steps=2, save_total_limit=0)
    train(old)
    run = old.output_dir
    old_ck2, old_ck4 = _files(f"{run}/checkpoint-2"), _files(f"{run}/checkpoint-4")
    old_final, old_metrics = _files(f"{run}/final"), _files(run)["metrics.jsonl"]
    # a new run (another config) keeping 1 checkpoint: rotation by step number alone would
    # keep the old run's checkpoint-4 and delete the new run's own
    new = _cfg(tmp_path, max_steps=3, save_steps=1, save_total_limit=1, lr=1e-3,
               overwrite_output_dir=True)
    train(new)
    assert "overwrite_output_dir" in capsys.readouterr().out
    names = sorted(os.listdir(run))
    assert names == ["checkpoint-2.old", "checkpoint-3", "checkpoint-4", "final", "final.old",
                     "metrics.jsonl", "metrics.jsonl.old"], names
    assert _files(f"{run}/checkpoint-4") == old_ck4  # the old run's, untouched
    assert _files(f"{run}/checkpoint-2.old") == old_ck2  # renamed aside, not deleted
    assert _files(f"{run}/final.old") == old_final
    assert _files(run)["metrics.jsonl.old"] == old_metrics
    assert [r["step"] for r in read_jsonl(f"{run}/metrics.jsonl")] == [1, 2, 3]
    ids = {read_state(f"{run}/checkpoint-{s}")["run_id"] for s in (3, 4)}
    assert len(ids) == 2 and None not in ids
    assert read_state(f"{run}/final")["run_id"] == read_state(f"{run}/checkpoint-3")["run_id"]
    # resume=auto takes the newest checkpoint of ITS config, naming the one it passes over
    got = resume_candidates("auto", run, new.fingerprint())
    assert got[0].endswith("checkpoint-3")
    assert "skipping" in capsys.readouterr().out


def test_planted_symlinks_are_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / "final")
    os.symlink(victim, run / "checkpoint-1")
    os.symlink(victim, run / ".tmp-checkpoint-1")
    train(_cfg(tmp_path, max_steps=1))  # links are nobody's run files: no refusal
    assert os.listdir(victim) == ["keep.txt"] and (victim / "keep.txt").read_text() == "precious"
    for name in ("final", "checkpoint-1"):
        assert not os.path.islink(run / name) and (run / name / "model.safetensors").exists()


# ---- 2. divergence guard ------------------------------------------------------------------

def test_lr_inf_stops_at_step_1_without_writing_a_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, max_steps=3, save_steps=1, lr_late=float("inf"))
    with pytest.raises(TrainingDiverged) as info:
        train(cfg)
    msg = str(info.value)
    assert "non-finite parameters after the optimizer update of step 1" in msg, msg
    assert "rows " in msg and "this run has saved no checkpoint yet" in msg, msg
    assert "intact" not in msg and "\n" not in msg
    assert latest_checkpoint(cfg.output_dir) is None
    assert not any(n.startswith((".tmp", "final")) for n in os.listdir(cfg.output_dir))


def test_divergence_names_step_rows_and_the_last_intact_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, max_steps=4, save_steps=1, save_total_limit=0, lr=1e30,
               max_grad_norm=None)
    with pytest.raises(TrainingDiverged, match=r"at step (\d+);") as info:
        train(cfg)
    msg = str(info.value)
    step = int(msg.split("at step ")[1].split(";")[0])
    # the rows of the failing micro-batch, as source rows of the data file
    data_rows = loop_mod._batch_indices(16, cfg.batch_size, cfg.seed, step - 1).tolist()
    assert f"micro-batch 1 of 1 holds rows {', '.join(map(str, data_rows))} of " \
           f"{cfg.train_file}" in msg, msg
    last = os.path.join(cfg.output_dir, f"checkpoint-{step - 1}")
    assert f"the last intact checkpoint is {last}" in msg
    assert latest_checkpoint(cfg.output_dir) == last and checkpoint_problem(last) is None
    for s in range(1, step):  # every checkpoint written is finite
        w = load_file(os.path.join(cfg.output_dir, f"checkpoint-{s}", "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in w.values())


def test_no_checkpoint_with_non_finite_tensors_even_if_the_step_check_missed(
        tmp_path, monkeypatch):
    monkeypatch.setattr(Engine, "parameters_finite", lambda self: True)
    cfg = _cfg(tmp_path, max_steps=2, save_steps=1, lr_late=float("inf"))
    with pytest.raises(TrainingDiverged, match="checkpoint-1 was not written"):
        train(cfg)
    assert latest_checkpoint(cfg.output_dir) is None


def _nan_loss_at(monkeypatch, steps: set[int], grad_accum: int = 1) -> None:
    """Make the loss of the first micro-batch of the given (1-based) steps NaN."""
    forward = Engine.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        out = forward(self, batch)
        step = calls["n"] // grad_accum + 1
        if step in steps and calls["n"] % grad_accum == 0:
            out["loss"] = out["loss"] * float("nan")
        calls["n"] += 1
        return out

    monkeypatch.setattr(Engine, "forward", poisoned)


def test_on_nonfinite_skip_skips_the_update_counts_it_and_keeps_going(tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {2})
    cfg = _cfg(tmp_path, max_steps=4, save_steps=1, save_total_limit=0, scheduler="linear",
               on_nonfinite="skip")
    train(cfg)
    rows = read_jsonl(os.path.join(cfg.output_dir, "metrics.jsonl"))
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert rows[1]["grad_norm"] != rows[1]["grad_norm"]  # NaN: the skipped step
    assert rows[2]["lr"] == pytest.approx(cfg.lr * 0.5)  # the schedule advanced regardless
    run = cfg.output_dir
    w1, w2 = (load_file(f"{run}/checkpoint-{s}/model.safetensors") for s in (1, 2))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # no update at step 2
    o1, o2 = (torch.load(f"{run}/checkpoint-{s}/optimizer.pt", weights_only=True)
              for s in (1, 2))
    assert all(torch.equal(o1["state"][i]["exp_avg"], o2["state"][i]["exp_avg"])
               for i in o1["state"])  # nor of the optimizer state
    assert read_state(f"{run}/checkpoint-4")["skipped_steps"] == 1
    w4 = load_file(f"{run}/final/model.safetensors")
    assert all(torch.isfinite(t).all() for t in w4.values())
    assert not all(torch.equal(w2[k], w4[k]) for k in w2)  # training went on


def test_skipped_step_count_survives_resume(tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {1})
    kw = dict(max_steps=3, save_steps=1, on_nonfinite="skip")
    train(_cfg(tmp_path, stop_at_step=2, **kw))
    train(_cfg(tmp_path, resume="auto", **kw))
    rows = read_jsonl(os.path.join(tmp_path, "run", "metrics.jsonl"))
    assert [r["train/skipped_steps"] for r in rows] == [1, 1, 1]


def test_stop_mode_names_the_micro_batch_with_the_nan(tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {2}, grad_accum=2)
    cfg = _cfg(tmp_path, max_steps=3, save_steps=1, grad_accum=2)
    with pytest.raises(TrainingDiverged) as info:
        train(cfg)
    msg = str(info.value)
    rows = loop_mod._batch_indices(16, cfg.batch_size, cfg.seed, 2).tolist()  # step 2, micro 1
    assert msg.startswith("non-finite loss (nan) at step 2; micro-batch 1 of 2 holds rows "
                          f"{', '.join(map(str, rows))} of "), msg
    assert f"the last intact checkpoint is {os.path.join(cfg.output_dir, 'checkpoint-1')}" in msg
    assert "on_nonfinite=skip" in msg


def test_max_grad_norm_zero_or_null_means_no_clipping(tmp_path):
    runs = {}
    for name, g in (("none", None), ("zero", 0.0), ("tiny", 1e-4)):
        cfg = _cfg(tmp_path / name, max_steps=1)
        cfg.max_grad_norm = g
        train(cfg)
        runs[name] = load_file(os.path.join(cfg.output_dir, "final", "model.safetensors"))
    assert all(torch.equal(runs["none"][k], runs["zero"][k]) for k in runs["none"])
    assert not all(torch.equal(runs["none"][k], runs["tiny"][k]) for k in runs["none"])


def test_deepspeed_config_passes_0_for_no_clipping(tmp_path):
    from drorebel.trainer.engine import deepspeed_config

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    cfg = _cfg(tmp_path, deepspeed=str(ds), max_grad_norm=None)
    assert deepspeed_config(cfg, 1, 32)["gradient_clipping"] == 0.0


# ---- 3. resume falls back to the newest intact checkpoint ---------------------------------

def _damage(path: str, kind: str) -> None:
    target = {"model": "model.safetensors", "optimizer": "optimizer.pt",
              "empty-state": "trainer_state.json", "bad-state": "trainer_state.json",
              "rng": "rng-0.pt"}[kind]
    f = os.path.join(path, target)
    if kind == "bad-state":
        with open(f, "w") as fh:
            fh.write('{"step": ')
        return
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(0 if kind == "empty-state" else size // 2)


@pytest.mark.parametrize("kind", ["model", "optimizer", "empty-state", "bad-state", "rng"])
def test_resume_auto_skips_a_damaged_newest_checkpoint(tmp_path, capsys, kind):
    kw = dict(max_steps=3, save_steps=1, save_total_limit=0)
    ref = _cfg(tmp_path / "ref", **kw)
    train(ref)
    cfg = _cfg(tmp_path, stop_at_step=2, **kw)
    train(cfg)
    bad = os.path.join(cfg.output_dir, "checkpoint-2")
    _damage(bad, kind)
    assert checkpoint_problem(bad) is not None
    capsys.readouterr()
    train(_cfg(tmp_path, resume="auto", **kw))
    out = capsys.readouterr().out.splitlines()
    skip = [ln for ln in out if "skipping" in ln]
    assert len(skip) == 1 and bad in skip[0], out
    assert any("resumed from" in ln and ln.endswith("checkpoint-1 at step 1") for ln in out), out
    a = load_file(os.path.join(ref.output_dir, "final", "model.safetensors"))
    b = load_file(os.path.join(cfg.output_dir, "final", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # = the uninterrupted run
    assert _untimed(read_jsonl(os.path.join(ref.output_dir, "metrics.jsonl"))) == \
        _untimed(read_jsonl(os.path.join(cfg.output_dir, "metrics.jsonl")))
    assert checkpoint_problem(bad) is None  # the resumed run wrote step 2 again


def test_named_damaged_or_missing_checkpoint_is_one_line_error(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, max_steps=2, save_steps=1)
    train(cfg)
    bad = os.path.join(cfg.output_dir, "checkpoint-2")
    _damage(bad, "model")
    _no_model_load(monkeypatch)
    with pytest.raises(CheckpointError, match="checkpoint-2.*damaged: model.safetensors is "
                                              "truncated") as info:
        train(_cfg(tmp_path, max_steps=2, save_steps=1, resume=bad))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="does not exist"):  # config.py may refuse it first
        train(_cfg(tmp_path, max_steps=2, resume=str(tmp_path / "nothing")))


def test_resume_auto_with_every_checkpoint_damaged_is_an_error(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, max_steps=2, save_steps=1)
    train(cfg)
    for s in (1, 2):
        _damage(os.path.join(cfg.output_dir, f"checkpoint-{s}"), "model")
    _no_model_load(monkeypatch)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        train(_cfg(tmp_path, max_steps=2, save_steps=1, resume="auto"))


def test_partial_metrics_line_does_not_block_resume(tmp_path):
    kw = dict(max_steps=3, save_steps=1)
    train(_cfg(tmp_path, stop_at_step=2, **kw))
    path = os.path.join(tmp_path, "run", "metrics.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")  # after the checkpoint: dropped
        f.write('{"step": 4, "lo')  # killed mid-line
    train(_cfg(tmp_path, resume="auto", **kw))
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] != 1.0


# ---- 4. a full disk -----------------------------------------------------------------------

def _full_disk_in_torch_save(monkeypatch, when: str) -> None:
    real = torch.save

    def save(obj, f, *a, **k):
        name = getattr(f, "name", f)
        if when in str(name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


def test_full_disk_while_saving_a_checkpoint(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, max_steps=3, save_steps=1)
    _full_disk_in_torch_save(monkeypatch, f".tmp-checkpoint-2{os.sep}optimizer.pt")
    with pytest.raises(NoSpaceLeft) as info:
        train(cfg)
    msg = str(info.value)
    tmp = os.path.join(cfg.output_dir, ".tmp-checkpoint-2")
    first = os.path.join(cfg.output_dir, "checkpoint-1")
    assert msg == (f"no space left on device at {tmp}{os.sep}optimizer.pt; the last intact "
                   f"checkpoint is {first}")
    assert isinstance(info.value, UserError) and info.value.errno == errno.ENOSPC
    assert not os.path.exists(tmp)  # the temp folder is cleaned
    assert latest_checkpoint(cfg.output_dir) == first and checkpoint_problem(first) is None


def test_full_disk_while_writing_metrics(tmp_path, monkeypatch):
    import drorebel.trainer.metrics as metrics

    def full_open(path, mode="r", *a, **k):
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return open(path, mode, *a, **k)

    monkeypatch.setattr(metrics, "open", full_open, raising=False)
    cfg = _cfg(tmp_path, max_steps=2)
    with pytest.raises(NoSpaceLeft, match=r"^no space left on device at .*metrics\.jsonl; this "
                                          "run has saved no checkpoint yet$"):
        train(cfg)


def test_full_disk_while_saving_the_final_model(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def full(self, *a, **k):  # what safetensors (Rust) says when the device is full
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                           'message: "No space left on device" })')

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    cfg = _cfg(tmp_path, max_steps=2, save_steps=1)
    with pytest.raises(NoSpaceLeft, match="no space left on device at .*\\.tmp-final; the last "
                                          "intact checkpoint is .*checkpoint-2$"):
        train(cfg)
    assert sorted(os.listdir(cfg.output_dir)) == ["checkpoint-1", "checkpoint-2", "metrics.jsonl"]


def test_cli_reports_full_disk_and_refusal_as_one_line(tmp_path, monkeypatch, capsys):
    import yaml

    from drorebel.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base_overrides(str(tmp_path), max_steps=1)))
    _full_disk_in_torch_save(monkeypatch, "rng-0.pt")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("drorebel train: error: no space left on "
                                               "device at "), err
    monkeypatch.undo()
    assert main(["train", str(path), "resume=auto"]) == 0  # no checkpoint yet: starts afresh
    capsys.readouterr()
    assert main(["train", str(path)]) == 2  # now the directory is another run's
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "overwrite_output_dir" in err[0], err


def test_a_failure_on_one_rank_raises_on_every_rank():
    class Fake:
        world_size, device = 2, torch.device("cpu")

        def all_reduce_sum(self, x):
            return x + 1  # the other rank failed

    with pytest.raises(CheckpointError, match="another rank failed while writing /x"):
        agree(Fake(), None, "/x")
    with pytest.raises(NoSpaceLeft):
        agree(Fake(), NoSpaceLeft("no space left on device at /x", "/x"), "/x")
