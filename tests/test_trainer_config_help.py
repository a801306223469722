"""Trainer config: per-field help (`drorebel train --help`) and the HF / TRL aliases."""

from __future__ import annotations

import dataclasses

import pytest

from drorebel.cli import build_parser, main
from drorebel.trainer.config import (
    ALIASES,
    GROUPS,
    UNSUPPORTED,
    ConfigError,
    TrainConfig,
    format_fields_help,
    parse_overrides,
)

ONLINE = ["mode=online", "prompt_file=p.jsonl", "reward_fn=m:f", "max_length=64",
          "max_prompt_length=16"]

# alias key -> (its value on the command line, extra overrides, field, expected value)
ALIAS_CASES = {
    "learning_rate": ("3e-5", [], "lr", 3e-5),  # YAML 1.1 reads "3e-5" as a string
    "gradient_accumulation_steps": ("4", [], "grad_accum", 4),
    "logging_steps": ("5", [], "log_steps", 5),
    "lr_scheduler_type": ("cosine", [], "scheduler", "cosine"),
    "global_batch_size": ("8", [], "batch_size", 8),
    "per_device_train_batch_size": ("3", [], "batch_size", 3),  # WORLD_SIZE unset: 1
    "bf16": ("true", [], "dtype", "bfloat16"),
    "fp16": ("true", [], "dtype", "float16"),
    "torch_dtype": ("bfloat16", [], "dtype", "bfloat16"),
    "model_name_or_path": ("other/model", [], "model", "other/model"),
    "resume_from_checkpoint": ("runs/x/checkpoint-4", [], "resume", "runs/x/checkpoint-4"),
    "use_liger_kernel": ("true", [], "liger_kernel", True),
    "num_ppo_epochs": ("2", ONLINE, "num_passes", 2),
    "max_completion_length": ("24", ONLINE, "max_new_tokens", 24),
}


def _cfg(*overrides: str) -> TrainConfig:
    return TrainConfig.from_yaml(None, list(overrides))


def test_every_field_has_help_and_a_group():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("group") in GROUPS, f.name
        assert len(f.metadata.get("help", "")) > 20, f.name
    assert "GLOBAL" in next(f for f in dataclasses.fields(TrainConfig)
                            if f.name == "batch_size").metadata["help"]


def test_alias_table_targets_fields_and_is_covered():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(a.field in names for a in ALIASES.values())
    assert not set(ALIASES) & names and not set(UNSUPPORTED) & (names | set(ALIASES))
    assert set(ALIAS_CASES) == set(ALIASES)


@pytest.mark.parametrize("key", sorted(ALIAS_CASES))
def test_alias_maps_on_the_command_line_and_in_yaml(key, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    value, extra, name, want = ALIAS_CASES[key]
    base = [] if name == "model" else ["model=m"]
    cfg = _cfg(*base, *extra, f"{key}={value}")
    assert getattr(cfg, name) == want
    p = tmp_path / "run.yaml"
    p.write_text("".join(f"{k}: {v}\n" for k, _, v in
                         (o.partition("=") for o in [*base, *extra, f"{key}={value}"])))
    assert getattr(TrainConfig.from_yaml(str(p)), name) == want
    # from_dict (used by the preference-shift-real experiment) accepts them too
    data = parse_overrides([*base, *extra, f"{key}={value}"])
    assert getattr(TrainConfig.from_dict(data), name) == want


@pytest.mark.parametrize("overrides, field, want", [
    (["lr_scheduler_type=constant_with_warmup"], "scheduler", "constant"),
    (["bf16=false"], "dtype", "float32"),  # false sets nothing
    (["bf16=false", "dtype=float16"], "dtype", "float16"),
    (["resume_from_checkpoint=true"], "resume", "auto"),
    (["resume_from_checkpoint=false"], "resume", None),
    (["learning_rate=1e-5", "lr=1.0e-5"], "lr", 1e-5),  # the same value twice is fine
    (["save_total_limit=null"], "save_total_limit", 0),  # HF's "keep all"
])
def test_alias_values(overrides, field, want):
    assert getattr(_cfg("model=m", *overrides), field) == want


def test_per_device_batch_size_uses_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert _cfg("model=m", "per_device_train_batch_size=2").batch_size == 8
    assert _cfg("model=m", "per_device_train_batch_size=2", "batch_size=8").batch_size == 8
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size.*batch_size=8.*"
                                          r"`batch_size`=4"):
        _cfg("model=m", "per_device_train_batch_size=2", "batch_size=4")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'.*GLOBAL"):
        _cfg("model=m", "per_device_train_batch_size=2")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="needs WORLD_SIZE.*GLOBAL"):
        _cfg("model=m", "per_device_train_batch_size=2")


@pytest.mark.parametrize("overrides, match", [
    (["learning_rate=1e-5", "lr=3e-5"], r"`learning_rate`=1e-05 .*`lr`=3e-05 .*both set `lr`"),
    (["lr=3e-5", "learning_rate=1e-5"], r"`lr`=3e-05 and `learning_rate`=1e-05"),
    (["bf16=true", "fp16=true"], r"`bf16`=True .*`fp16`=True .*both set `dtype`"),
    (["bf16=true", "dtype=float32"], r"`bf16`=True \(= dtype='bfloat16'\).*`dtype`='float32'"),
    (["global_batch_size=8", "per_device_train_batch_size=4"], "both set `batch_size`"),
])
def test_alias_and_field_conflict(overrides, match, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=match) as err:
        _cfg("model=m", *overrides)
    assert "\n" not in str(err.value)


def test_conflict_in_yaml_names_the_file_and_cli_wins_over_yaml(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model: m\nlearning_rate: 1.0e-5\nlr: 2.0e-5\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: `learning_rate`.*`lr`"):
        TrainConfig.from_yaml(str(p))
    p.write_text("model: m\nlearning_rate: 1.0e-5\ngradient_accumulation_steps: 2\n")
    cfg = TrainConfig.from_yaml(str(p), ["lr=3e-5", "grad_accum=4"])
    assert (cfg.lr, cfg.grad_accum) == (3e-5, 4)


@pytest.mark.parametrize("overrides, match", [
    (["lerning_rate=1"], r"unknown config field.*`lerning_rate` \(did you mean `learning_rate`"
                         r", the HF TrainingArguments spelling of `lr`\?\)"),
    (["batchsize=2"], r"`batchsize` \(did you mean `batch_size`\?\)"),
    (["divergense=kl"], r"did you mean `divergence`"),
    (["zzz=1"], r"unknown config field\(s\): `zzz` \(`drorebel train --help`"),
    (["num_train_epochs=3"], r"`num_train_epochs` is not supported: .*`max_steps`"),
    (["warmup_ratio=0.1"], r"warmup_steps"),
    (["adam_beta2=0.95"], r"adam_betas"),
    (["max_completion_length=16"], r"only mode=online.*`max_length`"),
    (["lr_scheduler_type=cosine_with_restarts"], r"`lr_scheduler_type` must be one of"),
    (["torch_dtype=auto"], r"`torch_dtype` \(→ `dtype`\) must be one of"),
    (["learning_rate=fast"], r"`learning_rate` \(→ `lr`\) must be float"),
    (["bf16=yes please"], r"`bf16` must be true or false"),
    (["per_device_train_batch_size=0"], r"per_device_train_batch_size"),
    (["batch_size=0"], r"`batch_size` \(the GLOBAL micro-batch"),
    (["dtype=fp8"], r"`dtype` must be one of"),
    (["log_steps=0"], r"`log_steps` must be >= 1"),
    (["warmup_steps=-1"], r"`warmup_steps` must be >= 0"),
    (["max_grad_norm=-1"], r"`max_grad_norm` must be > 0 to clip, or 0 / null"),
])
def test_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        _cfg("model=m", *overrides)
    assert "\n" not in str(err.value)


def test_max_grad_norm_zero_is_no_clipping_on_every_engine():
    assert _cfg("model=m", "max_grad_norm=0", "deepspeed=ds.json").max_grad_norm == 0
    assert _cfg("model=m", "max_grad_norm=0").max_grad_norm == 0  # DeepSpeed's meaning of 0
    assert _cfg("model=m", "max_grad_norm=null").max_grad_norm is None


def _train_help(capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["train", "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_train_help_lists_every_field_with_its_help_and_default(capsys, monkeypatch):
    out = _train_help(capsys, monkeypatch)
    flat = " ".join(out.split())
    for f in dataclasses.fields(TrainConfig):
        assert f"\n  {f.name} (default: " in out, f.name
        assert " ".join(f.metadata["help"].split()) in flat, f.name
    for group in GROUPS:
        assert f"\n{group}:\n" in out
    for key, alias in ALIASES.items():
        assert f"{key} -> {alias.field}" in flat
    for key in UNSUPPORTED:
        assert f"{key}: " in flat
    assert "batch_size is the GLOBAL micro-batch" in flat
    assert "batch_size (default: 4)" in out and "lr (default: 0.0001)" in out
    assert " ".join(format_fields_help(100).split()) in flat


def test_train_help_in_a_subprocess():
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "100"}
    out = subprocess.run([sys.executable, "-m", "drorebel.cli", "train", "--help"], env=env,
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert all(f"  {f.name} (default: " in out for f in dataclasses.fields(TrainConfig))


def test_cli_config_error_exits_2_before_any_model_loads(capsys, monkeypatch):
    import drorebel.trainer.loop as loop

    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("train() reached"))
    assert main(["train", "model=m", "learning_rate=1e-5", "lr=2e-5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("drorebel train: error: the command line: `learning_rate`")
    assert err.count("\n") == 1
    assert main(["train", "model=m", "lerning_rate=1"]) == 2
    assert "did you mean `learning_rate`" in capsys.readouterr().err
