"""Wasserstein DRO-REBEL in the trainer: ρ = 0 is REBEL, ρ > 0 adds the penalty, both z."""

from __future__ import annotations

import pytest
import torch
from trainer_fixtures.tiny import base_overrides

from drorebel.trainer.config import ConfigError, TrainConfig
from drorebel.trainer.loop import train
from drorebel.trainer.metrics import read_jsonl


def _run(tmp, name: str, **kw) -> list[dict]:
    cfg = TrainConfig.from_dict(base_overrides(str(tmp), output_dir=str(tmp / name),
                                               max_steps=2, **kw))
    return read_jsonl(train(cfg).metrics_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("wtrain")
    return {
        "none": _run(tmp, "none"),
        "w0": _run(tmp, "w0", divergence="wasserstein", rho=0.0),
        "wh": _run(tmp, "wh", divergence="wasserstein", rho=0.3),
        "we": _run(tmp, "we", divergence="wasserstein", rho=0.3, w_target="embeddings"),
    }


def test_rho_zero_is_rebel(runs) -> None:
    for a, b in zip(runs["none"], runs["w0"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_penalty_adds_rho_times_gradient_rms(runs) -> None:
    """Step 1 (same initial policy and batch): L_W = mean ℓ + ρ·rms_i ‖∇_z ℓ_i‖ > REBEL's loss."""
    base = runs["none"][0]["loss"]
    for key in ("wh", "we"):
        row = runs[key][0]
        rms = row["wasserstein/grad_norm_rms"]
        assert rms > 0
        assert row["loss"] == pytest.approx(base + 0.3 * rms, rel=1e-4)
    # the two choices of z perturb different things, so their penalties differ
    assert runs["wh"][0]["wasserstein/grad_norm_rms"] != pytest.approx(
        runs["we"][0]["wasserstein/grad_norm_rms"], rel=1e-3)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for v in runs.values() for r in v)


@pytest.mark.parametrize("kw, match", [
    (dict(divergence="wasserstein"), "needs `rho`"),
    (dict(divergence="wasserstein", rho=0.1, tau=1.0), "takes `rho`"),
    (dict(divergence="wasserstein", rho=0.1, loss_impl="materialized"), "fused only"),
    (dict(divergence="wasserstein", rho=0.1, w_target="logits"), "w_target"),
])
def test_bad_wasserstein_config(tmp_path, kw, match) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(base_overrides(str(tmp_path), **kw))


def test_embeddings_target_picks_eager_attention(tmp_path) -> None:
    cfg = TrainConfig.from_dict(base_overrides(str(tmp_path), divergence="wasserstein", rho=0.1,
                                               w_target="embeddings"))
    assert cfg.attn_implementation == "eager"
    with pytest.raises(ConfigError, match="eager"):
        TrainConfig.from_dict(base_overrides(str(tmp_path), divergence="wasserstein", rho=0.1,
                                             w_target="embeddings", attn_implementation="sdpa"))
