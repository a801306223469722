"""KL-shaped online rewards (`kl_coef`): r = score − β·(log π_t(y|x) − log π_0(y|x)).

The shaping is checked against log-probs computed here, independently of the trainer, from
the Hugging Face models' own logits: π_0 the seeded initial model, π_t the checkpoint the
rollout was sampled from.
"""

from __future__ import annotations

import os

import pytest
import torch
from trainer_fixtures.online_rewards import good_fraction, write_prompts
from trainer_fixtures.tiny import base_overrides

from drorebel.trainer.config import ConfigError, TrainConfig
from drorebel.trainer.loop import train
from drorebel.trainer.metrics import read_jsonl

_FIX = "trainer_fixtures.online_rewards"


def _cfg(tmp, **kw) -> TrainConfig:
    d = str(tmp)
    os.makedirs(d, exist_ok=True)
    pf = os.path.join(d, "prompts.jsonl")
    if not os.path.exists(pf):
        write_prompts(pf)
    base = {"mode": "online", "prompt_file": pf, "reward_fn": f"{_FIX}:good_fraction",
            "rollout_batch_size": 8, "batch_size": 4, "num_passes": 2, "max_new_tokens": 6,
            "lr": 1e-2, "eta": 5.0, "max_steps": 8, "save_steps": 4, "save_total_limit": 0}
    return TrainConfig.from_dict(base_overrides(d, **{**base, **kw}))


def _buffer(run_dir: str, step: int) -> dict:
    path = os.path.join(run_dir, f"checkpoint-{step}", "extra-0.pt")
    return torch.load(path, weights_only=True)["rollout"]


def _hf_logps(model, ids, mask, labels) -> torch.Tensor:
    """Σ_t log softmax(logits)[y_t] over the response tokens, from the HF model's logits."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    lab = labels[:, 1:]
    tok = torch.log_softmax(logits, -1).gather(-1, lab.clamp_min(0)[..., None])[..., 0]
    return (tok * (lab != -100)).sum(-1)


def _model_at(cfg: TrainConfig, checkpoint: str | None):
    from safetensors.torch import load_model as load_weights

    from drorebel.trainer.model import load_model

    model = load_model(cfg, torch.device("cpu"))  # seeded: the initial model π_0
    if checkpoint is not None:
        load_weights(model, os.path.join(checkpoint, "model.safetensors"), strict=True)
    return model.eval()


@pytest.mark.parametrize("kw, fragment", [
    (dict(kl_coef=-0.1), "`kl_coef` must be >= 0 and finite"),
    (dict(kl_coef=float("nan")), "`kl_coef` must be >= 0 and finite"),
    (dict(kl_coef=float("inf")), "`kl_coef` must be >= 0 and finite"),
    (dict(kl_coef=True), "`kl_coef` must be float"),
    (dict(kl_coef=0.1, train_file="pairs.jsonl"), "mode=online only"),
])
def test_kl_coef_is_checked(kw, fragment):
    with pytest.raises(ConfigError) as err:
        TrainConfig(model="m", **kw)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_kl_coef_zero_keeps_the_fingerprint_and_the_rewards(tmp_path):
    assert TrainConfig(model="m", kl_coef=0.0).fingerprint() == \
        TrainConfig(model="m").fingerprint()
    online = dict(mode="online", prompt_file="p.jsonl", reward_fn="m:f")
    assert TrainConfig(model="m", kl_coef=0.1, **online).fingerprint() != \
        TrainConfig(model="m", **online).fingerprint()
    # kl_coef = 0: the rewards the loss regresses on are the raw scores, bit for bit, and
    # nothing new enters the buffer or the metrics (no initial copy, no extra forward)
    cfg = _cfg(tmp_path, kl_coef=0, max_steps=4)
    rows = read_jsonl(train(cfg).metrics_path)
    assert not any(k.startswith("objective/") for k in rows[0])
    buf = _buffer(cfg.output_dir, 4)
    t = buf["tensors"]
    assert not {"kl_a", "scores_a"} & set(t)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    for s in ("a", "b"):
        texts = [tok.decode(ids[lab != -100].tolist(), skip_special_tokens=True)
                 for ids, lab in zip(t[f"ids_{s}"], t[f"labels_{s}"])]
        raw = torch.tensor(good_fraction([], texts), dtype=torch.float64)
        assert torch.equal(t[f"rewards_{s}"], raw)


@pytest.mark.parametrize("reference", ["sampling", "initial"])
def test_shaped_reward_is_score_minus_kl_coef_times_kl(tmp_path, reference):
    beta = 0.5
    cfg = _cfg(tmp_path, kl_coef=beta, reference=reference)
    rows = read_jsonl(train(cfg).metrics_path)
    # iteration 1 (steps 5-8) was sampled by the policy after step 4
    buf = _buffer(cfg.output_dir, 8)
    assert buf["iteration"] == 1
    t = buf["tensors"]
    pi_t = _model_at(cfg, os.path.join(cfg.output_dir, "checkpoint-4"))
    pi_0 = _model_at(cfg, None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    kls, scores, shaped = [], [], []
    for s in ("a", "b"):
        ids, mask, lab = t[f"ids_{s}"], t[f"mask_{s}"], t[f"labels_{s}"]
        lt, l0 = _hf_logps(pi_t, ids, mask, lab), _hf_logps(pi_0, ids, mask, lab)
        kl = lt - l0
        assert kl.abs().max() > 1e-3  # the policy moved: the test has something to check
        texts = [tok.decode(i[y != -100].tolist(), skip_special_tokens=True)
                 for i, y in zip(ids, lab)]
        raw = torch.tensor(good_fraction([], texts), dtype=torch.float64)
        torch.testing.assert_close(t[f"scores_{s}"], raw, rtol=0, atol=0)
        torch.testing.assert_close(t[f"kl_{s}"], kl, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t[f"rewards_{s}"], raw - beta * kl, rtol=1e-5, atol=1e-5)
        # the loss's reference: π_t (REBEL) or π_0, whatever the KL uses
        torch.testing.assert_close(t[f"ref_{s}"], lt if reference == "sampling" else l0,
                                   rtol=1e-5, atol=1e-5)
        kls.append(kl)
        scores.append(raw)
        shaped.append(raw - beta * kl)
    row = rows[-1]  # step 8, iteration 1
    assert row["objective/kl"] == pytest.approx(float(torch.cat(kls).mean()), abs=1e-5)
    assert row["objective/scores"] == pytest.approx(float(torch.cat(scores).mean()), abs=1e-12)
    assert row["objective/rlhf_reward"] == pytest.approx(float(torch.cat(shaped).mean()),
                                                         abs=1e-5)
    assert row["objective/non_score_reward"] == pytest.approx(-beta * row["objective/kl"],
                                                              abs=1e-9)
    assert row["rewards/mean"] == pytest.approx(row["objective/rlhf_reward"], abs=1e-9)
    # iteration 0 is sampled by π_0 itself: its KL is 0
    assert abs(rows[0]["objective/kl"]) < 1e-5
    assert rows[0]["objective/scores"] == pytest.approx(rows[0]["objective/rlhf_reward"],
                                                        abs=1e-5)


def test_example_config_validates():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "online_kl_cpu.yaml"
    cfg = TrainConfig.from_yaml(str(path))
    assert cfg.mode == "online" and cfg.kl_coef > 0
