"""The integration examples run (tiny model, 3 steps) and their loss goes down."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from load_path import load_module

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    return load_module(EXAMPLES / f"{name}.py", f"drorebel_example_{name}")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", [
    "plain_loop_rebel", "hf_trainer_rebel",
    pytest.param("trl_rebel", marks=pytest.mark.skipif(
        importlib.util.find_spec("trl") is None, reason="needs trl (pip install drorebel[trl])")),
])
def test_example_trains(name: str) -> None:
    losses = _load(name).main(["--steps", "3"])
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


@pytest.mark.timeout(180)
@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="needs trl (pip install drorebel[trl])")
def test_trl_example_with_average_log_prob() -> None:
    plain = _load("trl_rebel").main(["--steps", "2"])
    mean = _load("trl_rebel").main(["--steps", "2", "--average-log-prob"])
    assert all(math.isfinite(x) for x in mean)
    assert mean[0] == pytest.approx(plain[0])  # policy = reference at step 1: Δ = −(r_a − r_b)
    assert mean[1] != pytest.approx(plain[1])  # after one update the averaged log-ratios differ


def test_hf_trainer_compute_loss_returns_outputs(tmp_path: Path) -> None:
    """``compute_loss(..., return_outputs=True)`` gives the LossOutput (what eval loops use)."""
    import torch
    from transformers import TrainingArguments

    ex = _load("hf_trainer_rebel")
    torch.manual_seed(0)
    model = ex.LlamaForCausalLM(ex.LlamaConfig(vocab_size=ex.VOCAB, hidden_size=32,
                                               intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2))
    rows = ex.make_dataset(model, n_pairs=2)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = ex.RebelTrainer(model=model, args=args,
                              rebel_loss=ex.FusedLinearRebelLoss(eta=1.0, divergence="chi2",
                                                                  rho=0.2))
    model.eval()
    loss, out = trainer.compute_loss(model, ex.collate(rows), return_outputs=True)
    assert loss is out.loss and out.weights.shape == (2,)
    # the pairs were scored by the same model: log-ratios vanish, Δ_i = −(r_a − r_b)
    rewards = ex.collate(rows)["rewards"]
    expected = -(rewards[:2] - rewards[2:])
    assert torch.allclose(out.metrics["rebel/residual_mean"], expected.mean(), atol=1e-5)
