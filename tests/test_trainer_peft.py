"""LoRA / PEFT in the trainer (``lora_r > 0``): only the adapters train, the fused head works
frozen and adapted, the reference is the adapter-disabled model, checkpoints hold the adapter
and resume bitwise, ``final/`` holds the adapter (and ``final/merged`` whole weights), the
settings are checked before the model loads, and ZeRO-3 on 2 ranks equals one process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import yaml
from launch import BIN, launch
from safetensors.torch import load_file
from trainer_fixtures.tiny import base_overrides

from drorebel.trainer.checkpoint import checkpoint_problem, latest_checkpoint
from drorebel.trainer.config import ConfigError, TrainConfig
from drorebel.trainer.data import load_rows, normalise_rows, tokenise_pairs
from drorebel.trainer.driver import reference_logps, run_step
from drorebel.trainer.engine import create_engine
from drorebel.trainer.loop import micro_batch, train
from drorebel.trainer.metrics import read_jsonl
from drorebel.trainer.model import load_model, load_tokenizer, sequence_logps, wrap_model

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "dist_workers" / "trainer_worker.py"
LORA = dict(lora_r=4, lora_alpha=8.0, divergence="chi2", rho=0.5, lr=1e-2)
_TIMED = ("tokens_per_s", "peak_memory_gb")


def _cfg(tmp, **kw) -> TrainConfig:
    return TrainConfig.from_dict(base_overrides(str(tmp), **{**LORA, **kw}))


def _data(cfg: TrainConfig, tokenizer):
    rows = normalise_rows(load_rows(cfg.train_file, "train_file"))
    return tokenise_pairs(rows, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.overlong)


def _base_logps(cfg: TrainConfig, data) -> torch.Tensor:
    """log π of the untouched base model (a fresh seeded copy, no peft) on every sequence a."""
    plain = TrainConfig.from_dict({k: v for k, v in cfg.to_dict().items()
                                   if not k.startswith("lora_")})
    wrapper = wrap_model(load_model(plain, torch.device("cpu")), plain).eval()
    return sequence_logps(wrapper, data.ids_a, data.mask_a, data.labels_a)


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in _TIMED} for r in rows]


# ---- training --------------------------------------------------------------------------------

@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj", "lm_head"]],
                         ids=["frozen_head", "adapted_head"])
def test_only_adapters_change_and_reference_is_the_base_model(tmp_path, targets):
    """A few χ² steps: the adapters move, every base weight stays bit-identical; the reference
    (adapter disabled) equals a separate base model exactly, before and after the steps; the
    fused head (merged weight when lm_head is adapted) equals peft's own forward."""
    cfg = _cfg(tmp_path, lora_target_modules=targets, max_steps=3)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg)
    data = _data(cfg, tok)
    engine = create_engine(cfg)
    inner = engine.module.get_base_model()
    assert engine.wrapper.adapted_head == (targets is not None)
    before = {k: v.detach().clone() for k, v in inner.state_dict().items()}
    trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert any("lm_head.lora_" in n for n in trainable) == (targets is not None)
    base = _base_logps(cfg, data)
    engine.eval()
    assert torch.equal(engine.initial_logps(data.ids_a, data.mask_a, data.labels_a), base)
    data.ref_a, data.ref_b = reference_logps(engine.initial_logps, data, 64)
    engine.train()
    for step in range(3):
        run_step(engine, [micro_batch(data, cfg, step)], cfg, step)
    after = inner.state_dict()
    for name, value in before.items():
        moved = not torch.equal(after[name], value)
        assert moved == (".lora_B." in name or ".lora_A." in name), name
    engine.eval()
    ids, mask, labels = data.ids_a, data.mask_a, data.labels_a
    assert torch.equal(engine.initial_logps(ids, mask, labels), base)  # adapter disabled
    policy = engine.sequence_logps(ids, mask, labels)
    assert not torch.allclose(policy, base)
    # peft's own forward (LoRA on the head module included) gives the same log-probs
    with torch.no_grad():
        logits = engine.module(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    y = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    want = (lp * (y != -100)).sum(-1)
    torch.testing.assert_close(policy, want, rtol=1e-5, atol=1e-4)


def test_resume_is_bitwise_exact_and_checkpoints_hold_the_adapter(tmp_path):
    kw = dict(max_steps=3, grad_accum=2, scheduler="cosine", warmup_steps=1)
    train(_cfg(tmp_path / "full", save_steps=3, **kw))
    part = tmp_path / "part"
    train(_cfg(part, save_steps=1, stop_at_step=2, **kw))
    ckpt = latest_checkpoint(str(part / "run"))
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
    assert "model.safetensors" not in files and checkpoint_problem(ckpt) is None
    with open(os.path.join(ckpt, "adapter_model.safetensors"), "r+b") as f:  # damaged → skipped
        f.truncate(100)
    assert "adapter_model.safetensors" in checkpoint_problem(ckpt)
    train(_cfg(part, save_steps=1, resume="auto", **kw))  # from checkpoint-1
    a = load_file(str(tmp_path / "full" / "run" / "final" / "adapter_model.safetensors"))
    b = load_file(str(part / "run" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = _untimed(read_jsonl(str(tmp_path / "full" / "run" / "metrics.jsonl")))
    mb = _untimed(read_jsonl(str(part / "run" / "metrics.jsonl")))
    assert ma == mb


def test_final_adapter_and_merged_weights_load(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path, max_steps=2, lora_save_merged=True,
               lora_target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    final = Path(train(cfg).final_dir)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= \
        set(os.listdir(final))
    assert "model.safetensors" not in os.listdir(final)
    plain = TrainConfig.from_dict({k: v for k, v in cfg.to_dict().items()
                                   if not k.startswith("lora_")})
    adapted = PeftModel.from_pretrained(load_model(plain, torch.device("cpu")), str(final)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(final / "merged")).eval()
    assert not any("lora" in k for k in merged.state_dict())
    base = load_model(plain, torch.device("cpu")).eval()
    ids = torch.tensor([[3, 10, 12, 14, 6, 7, 8, 1]])
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        assert not torch.allclose(want, base(input_ids=ids).logits, atol=1e-4)  # it trained
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the adapter in final/ is the last checkpoint's
    ckpt = latest_checkpoint(str(tmp_path / "run"))
    a = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    b = load_file(str(final / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_online_initial_reference_uses_the_disabled_adapter(tmp_path, monkeypatch):
    """mode=online, reference=initial: no second model is loaded; the run trains."""
    from trainer_fixtures.online_rewards import write_prompts

    import drorebel.trainer.online as online

    calls = []
    real = online.load_model
    monkeypatch.setattr(online, "load_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    pf = str(tmp_path / "prompts.jsonl")
    write_prompts(pf)
    cfg = _cfg(tmp_path, mode="online", prompt_file=pf, reference="initial",
               reward_fn="trainer_fixtures.online_rewards:good_fraction", rollout_batch_size=8,
               batch_size=4, max_new_tokens=6, eta=5.0, max_steps=2, train_file=None)
    rows = read_jsonl(train(cfg).metrics_path)
    assert not calls and len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)


def test_example_config_runs(tmp_path):
    cfg = TrainConfig.from_yaml(str(ROOT / "configs" / "lora_cpu.yaml"), [])
    assert cfg.lora_r > 0 and cfg.lora_save_merged
    over = base_overrides(str(tmp_path))
    cfg = TrainConfig.from_yaml(str(ROOT / "configs" / "lora_cpu.yaml"), [
        f"tokenizer={over['tokenizer']}", f"train_file={over['train_file']}",
        f"output_dir={tmp_path / 'run'}", "max_steps=2", "save_steps=0", "progress=false"])
    r = train(cfg)
    assert os.path.isfile(os.path.join(r.final_dir, "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(r.final_dir, "merged", "model.safetensors"))


# ---- settings --------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"lora_alpha": 16}, "`lora_alpha`=16 has no effect without LoRA"),
    ({"lora_target_modules": ["q_proj"]}, "`lora_target_modules`=['q_proj'] has no effect"),
    ({"lora_save_merged": True}, "`lora_save_merged`=True has no effect without LoRA"),
    ({"lora_r": -1}, "`lora_r` must be >= 0"),
    ({"lora_r": 2.5}, "`lora_r` must be int | None"),
    ({"lora_r": 4, "lora_alpha": 0}, "`lora_alpha` must be > 0"),
    ({"lora_r": 4, "lora_dropout": 1.0}, "`lora_dropout` must be in [0, 1)"),
    ({"lora_r": 4, "lora_target_modules": "q_proj"}, "`lora_target_modules` must be a non-empty"),
    ({"lora_r": 4, "lora_target_modules": []}, "`lora_target_modules` must be a non-empty"),
    ({"lora_r": 4, "lora_target_modules": ["q_proj", ""]}, "must be a non-empty list"),
    ({"use_peft": True}, "`use_peft` is not supported: LoRA is on when `lora_r` > 0"),
])
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"model": "m", **overrides})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_peft_and_unknown_target_are_config_errors(tmp_path, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "peft" else find(name, *a))
    with pytest.raises(ConfigError, match=r"lora_r needs the peft package \(pip install "
                                          r"drorebel\[peft\]\)"):
        TrainConfig.from_dict({"model": "m", "lora_r": 8})
    monkeypatch.undo()
    cfg = _cfg(tmp_path, lora_target_modules=["no_such_proj"])
    with pytest.raises(ConfigError, match="lora_target_modules"):
        wrap_model(load_model(cfg, torch.device("cpu")), cfg)


def test_lora_is_part_of_the_fingerprint_only_when_on():
    off = TrainConfig.from_dict({"model": "m"})
    assert off.fingerprint() == TrainConfig.from_dict({"model": "m", "lora_r": None}).fingerprint()
    assert TrainConfig.from_dict({"model": "m", "lora_r": None}).lora_r == 0
    on = TrainConfig.from_dict({"model": "m", "lora_r": 4})
    assert on.fingerprint() != off.fingerprint()
    assert on.fingerprint() != TrainConfig.from_dict({"model": "m", "lora_r": 8}).fingerprint()
    alpha = TrainConfig.from_dict({"model": "m", "lora_r": 4, "lora_alpha": 4})
    assert alpha.fingerprint() != on.fingerprint()


# ---- ZeRO-3 ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_two_ranks_equal_one_process(tmp_path):
    """2 CPU ranks under ZeRO-3 with LoRA on every linear layer and the LM head (a model
    loaded by from_pretrained straight into ZeRO-3 partitions, then wrapped by peft; the head's
    A and B are external parameters of the wrapper like W): the same per-step metrics, adapter
    and merged weights as one process. (The frozen-head path is this one without the head's
    adapter; one case keeps the launch short.)"""
    pytest.importorskip("deepspeed")
    run = dict(max_steps=2, batch_size=4, grad_accum=2, save_steps=2, lora_save_merged=True)
    pretrained = tmp_path / "pretrained"
    load_model(_cfg(tmp_path, lora_r=0, lora_alpha=None), torch.device("cpu")
               ).save_pretrained(str(pretrained))
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cases = {"head": {"lora_target_modules": [*every, "lm_head"], "model": str(pretrained),
                      "model_config": None}}
    cfgs = []
    for name, extra in cases.items():
        base = base_overrides(str(tmp_path), **{**LORA, **run, **extra})
        train(TrainConfig.from_dict({**base, "output_dir": str(tmp_path / f"{name}1")}))
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**base, "output_dir": str(tmp_path / f"{name}2"),
                                        "deepspeed": str(ROOT / "configs" / "ds_zero3.json")}))
        cfgs.append(str(path))
    launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
            "--no_local_rank", str(WORKER), *cfgs], tmp_path, timeout=500)
    for name in cases:
        one, two = tmp_path / f"{name}1", tmp_path / f"{name}2"
        m1, m2 = read_jsonl(str(one / "metrics.jsonl")), read_jsonl(str(two / "metrics.jsonl"))
        assert len(m1) == len(m2) == run["max_steps"]
        for a, b in zip(m1, m2):
            for key in ("loss", "grad_norm", "dro/robust_objective", "dro/ess", "logps/a"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (name, key)
        # Adam's first steps amplify rounding differences of the sharded reductions: 1e-3 of
        # each tensor's scale (as tests/test_trainer_distributed.py)
        for f in ("adapter_model.safetensors", "merged/model.safetensors"):
            w1, w2 = load_file(str(one / "final" / f)), load_file(str(two / "final" / f))
            assert w1.keys() == w2.keys() and w1, f
            for k, w in w1.items():
                assert (w2[k] - w).abs().max() <= 1e-3 * w.abs().max() + 1e-7, (name, f, k)
