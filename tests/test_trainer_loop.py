"""Trainer stages B and C: training, metrics, NaN stop, checkpoints, exact resume, SIGKILL, CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from trainer_fixtures.tiny import base_overrides

from drorebel.trainer.checkpoint import CheckpointError, latest_checkpoint
from drorebel.trainer.config import TrainConfig
from drorebel.trainer.loop import TrainingDiverged, train
from drorebel.trainer.metrics import read_jsonl

_TIMED = ("tokens_per_s", "peak_memory_gb")


def _cfg(tmp, **kw) -> TrainConfig:
    return TrainConfig.from_dict(base_overrides(str(tmp), **kw))


def _params(run_dir: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(latest_checkpoint(run_dir), "model.safetensors"))


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in _TIMED} for r in rows]


def test_full_batch_objective_falls(tmp_path):
    # batch = the whole 16-pair set, so every step sees the same pairs: the robust objective
    # (chi2, rho=0.5) must fall well below its value at the initial policy
    r = train(_cfg(tmp_path, batch_size=16, max_steps=8, divergence="chi2", rho=0.5))
    rows = read_jsonl(r.metrics_path)
    assert [x["step"] for x in rows] == list(range(1, 9))
    first, last = rows[0]["dro/robust_objective"], rows[-1]["dro/robust_objective"]
    assert last < 0.5 * first
    assert rows[0]["dro/robust_objective"] >= rows[0]["rebel/loss_mean"]
    assert rows[0]["num_tokens"] > 0 and rows[0]["grad_norm"] > 0


def test_fused_and_materialized_agree(tmp_path):
    a = train(_cfg(tmp_path / "f", max_steps=2, divergence="kl", rho=0.3))
    b = train(_cfg(tmp_path / "m", max_steps=2, divergence="kl", rho=0.3,
                   loss_impl="materialized"))
    for ra, rb in zip(read_jsonl(a.metrics_path), read_jsonl(b.metrics_path)):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-5)


def test_final_model_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    r = train(_cfg(tmp_path, max_steps=2, save_steps=2))
    model = AutoModelForCausalLM.from_pretrained(r.final_dir)
    saved = _params(os.path.join(tmp_path, "run"))
    for name, p in model.state_dict().items():
        assert torch.equal(p, saved[name]), name


def test_resume_is_bitwise_exact(tmp_path):
    full = _cfg(tmp_path / "full", max_steps=6, save_steps=3, grad_accum=2,
                divergence="chi2", rho=0.4, scheduler="cosine", warmup_steps=1)
    train(full)
    part_dir = tmp_path / "part"
    train(_cfg(part_dir, max_steps=6, save_steps=1, grad_accum=2, divergence="chi2", rho=0.4,
               scheduler="cosine", warmup_steps=1, stop_at_step=4))
    # resume from step 4 (the latest), run to 6; rotation kept the 2 newest checkpoints
    ckpts = sorted(os.listdir(part_dir / "run"))
    assert ckpts == ["checkpoint-3", "checkpoint-4", "metrics.jsonl"]
    train(_cfg(part_dir, max_steps=6, save_steps=3, grad_accum=2, divergence="chi2", rho=0.4,
               scheduler="cosine", warmup_steps=1, resume="auto"))
    a, b = _params(str(tmp_path / "full" / "run")), _params(str(part_dir / "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = _untimed(read_jsonl(str(tmp_path / "full" / "run" / "metrics.jsonl")))
    mb = _untimed(read_jsonl(str(part_dir / "run" / "metrics.jsonl")))
    assert ma == mb


def test_resume_refuses_other_run(tmp_path):
    train(_cfg(tmp_path, max_steps=2, save_steps=2))
    with pytest.raises(CheckpointError, match="another run"):
        train(_cfg(tmp_path, max_steps=2, lr=1e-2, resume="auto"))
    with pytest.raises(CheckpointError, match="another run"):
        train(_cfg(tmp_path, max_steps=3, resume="auto"))  # a different schedule
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(_cfg(tmp_path, max_steps=2, resume=str(tmp_path / "nothing")))


def test_nan_stops_with_step_and_keeps_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, max_steps=8, save_steps=1, save_total_limit=3, lr=1e30,
               max_grad_norm=None)
    with pytest.raises(TrainingDiverged, match=r"at step (\d+)") as info:
        train(cfg)
    step = int(info.value.args[0].split("at step ")[1].split(";")[0])
    assert step >= 2  # step 1 is finite; the 1e30 update blows up a later one
    latest = latest_checkpoint(cfg.output_dir)
    assert latest.endswith(f"checkpoint-{step - 1}")
    assert len(_params(cfg.output_dir)) > 0  # complete and readable
    assert not os.path.exists(os.path.join(cfg.output_dir, "final"))


def test_sigkill_during_save_resumes_from_previous(tmp_path):
    import yaml

    cfg = base_overrides(str(tmp_path), max_steps=4, save_steps=2, save_total_limit=5)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DROREBEL_TEST_KILL_DURING_SAVE": "4"}
    cmd = [sys.executable, "-m", "drorebel.cli", "train", "--config", str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = cfg["output_dir"]
    assert latest_checkpoint(run).endswith("checkpoint-2")
    assert os.path.isdir(os.path.join(run, ".tmp-checkpoint-4"))
    proc = subprocess.run([*cmd, "resume=auto"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and latest_checkpoint(run).endswith("checkpoint-4")
    # same result as an uninterrupted run
    ref = TrainConfig.from_dict({**cfg, "output_dir": str(tmp_path / "ref")})
    train(ref)
    a, b = _params(run), _params(ref.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_reports_bad_data(tmp_path, capsys):
    from drorebel.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response_a": "good", "response_b": "", '
                   '"reward_a": 1, "reward_b": 0}\n')
    cfg = base_overrides(str(tmp_path))
    args = ["train", f"tokenizer={cfg['tokenizer']}", f"train_file={bad}",
            "model_config={model_type: llama, hidden_size: 32, num_hidden_layers: 1, "
            "num_attention_heads: 4, intermediate_size: 32, vocab_size: 32}"]
    assert main(args) == 2
    assert "row 0: field 'response_b' is empty" in capsys.readouterr().err


def test_precompute_ref_matches_on_the_fly(tmp_path):
    from drorebel.cli import main

    cfg = base_overrides(str(tmp_path), max_steps=2)
    out = str(tmp_path / "with_ref.jsonl")
    mc = "model_config={" + ", ".join(f"{k}: {v}" for k, v in cfg["model_config"].items()) + "}"
    args = [f"tokenizer={cfg['tokenizer']}", f"train_file={cfg['train_file']}", mc,
            "max_length=24", "max_prompt_length=12"]
    assert main(["precompute-ref", "--out", out, *args]) == 0
    rows = [r for r in read_jsonl(out)]
    assert len(rows) == 16 and all(r["ref_logp_a"] < 0 and r["ref_logp_b"] < 0 for r in rows)
    a = train(TrainConfig.from_dict(cfg))
    b = train(TrainConfig.from_dict({**cfg, "train_file": out,
                                     "output_dir": str(tmp_path / "cached")}))
    assert _untimed(read_jsonl(a.metrics_path)) == _untimed(read_jsonl(b.metrics_path))
