"""Smoke test of bench/test_bench_train_step.py (one tiny shape, no timing) and of the
train-step / rebel-loss tables of bench/report.py (hand-worked ratios)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from load_path import load_bench

ts = load_bench("test_bench_train_step", "drorebel_bench_train_step")
report = load_bench("report")
SPEC = ts.ModelSpec(h=32, layers=1, inter=64, heads=4, kv_heads=2)
SHAPE = ts.TrainShape(pairs=2, t=12, v=97, dtype_name="fp32")  # V misses every block size
CPU = torch.device("cpu")


def _liger_or_skip(provider: str) -> None:
    if provider == "liger-dpo":
        pytest.importorskip("liger_kernel.chunked_loss")


def _first_step(provider: str) -> tuple[float, dict, torch.nn.Module]:
    model = ts.build_model(SPEC, SHAPE.v, SHAPE.dtype, CPU, seed=0)
    batch = ts.make_batch(model, SHAPE, CPU, seed=0)
    step = ts.make_train_step(model, provider, batch, CPU)
    step.setup()
    step.step()
    return float(step.last_loss), batch, model


def test_make_batch_labels_are_aligned() -> None:
    model = ts.build_model(SPEC, SHAPE.v, SHAPE.dtype, CPU)
    x = ts.make_batch(model, SHAPE, CPU)
    ids, labels = x["ids"], x["labels"]
    assert ids.shape == labels.shape == (4, 12)
    prompt = 12 // 4
    assert (labels[:, : prompt - 1] == -100).all() and (labels[:, -1] == -100).all()
    assert torch.equal(labels[:, prompt - 1 : -1], ids[:, prompt:])  # hidden[t] predicts t+1
    assert x["ref_logps"].shape == x["rewards"].shape == (4,)
    assert torch.isfinite(x["ref_logps"]).all()


@pytest.mark.parametrize("provider", ts.PROVIDERS)
def test_train_step_runs_and_updates_every_part(provider: str) -> None:
    _liger_or_skip(provider)
    model = ts.build_model(SPEC, SHAPE.v, SHAPE.dtype, CPU, seed=0)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    step = ts.make_train_step(model, provider, ts.make_batch(model, SHAPE, CPU), CPU)
    step.setup()
    step.step()
    assert step.last_loss is not None and math.isfinite(float(step.last_loss))
    after = dict(model.named_parameters())
    for name in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.embed_tokens.weight"):
        assert not torch.equal(before[name], after[name]), f"{provider}: {name} not updated"
    # AdamW state exists for every parameter: static bytes = params + 2 moments (+ steps)
    n_params = sum(p.numel() for p in model.parameters())
    assert step.static_bytes() >= 3 * 4 * n_params


def _hand_logps(model: torch.nn.Module, x: dict) -> torch.Tensor:
    """float64 sequence log-probs of the batch under the model's initial parameters."""
    with torch.no_grad():
        h = ts.hidden_states(model, x["ids"]).double()
        logp = torch.log_softmax(h @ model.lm_head.weight.double().T, -1)
        valid = x["labels"] != -100
        tok = logp.gather(-1, x["labels"].clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return torch.where(valid, tok, torch.zeros_like(tok)).sum(-1)


def test_first_step_losses_match_hand_computed() -> None:
    model = ts.build_model(SPEC, SHAPE.v, SHAPE.dtype, CPU, seed=0)
    x = ts.make_batch(model, SHAPE, CPU, seed=0)
    lp, ref, rew, b = _hand_logps(model, x), x["ref_logps"].double(), x["rewards"].double(), 2
    delta = ((lp[:b] - ref[:b]) - (lp[b:] - ref[b:])) / ts.ETA - (rew[:b] - rew[b:])
    rebel = float((delta**2).mean())
    losses = {p: _first_step(p)[0] for p in ("drorebel-fused-none", "materialised-none",
                                              "drorebel-fused-chi2", "materialised-chi2")}
    assert losses["drorebel-fused-none"] == pytest.approx(rebel, rel=1e-4)
    assert losses["materialised-none"] == pytest.approx(rebel, rel=1e-4)
    assert losses["drorebel-fused-chi2"] == pytest.approx(losses["materialised-chi2"], rel=1e-4)
    assert losses["drorebel-fused-chi2"] >= rebel * (1 - 1e-4)  # a sup over a ball with P̂
    pytest.importorskip("liger_kernel.chunked_loss")
    dpo = float(-F.logsigmoid(0.1 * (lp[:b] - lp[b:])).mean())  # Liger's default β, no ref
    assert _first_step("liger-dpo")[0] == pytest.approx(dpo, rel=1e-4)


def test_shape_and_model_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DROREBEL_BENCH_TRAIN_SHAPES", "2,64,1000,fp32; 4,32,500,bf16")
    monkeypatch.setenv("DROREBEL_BENCH_TRAIN_MODEL", "64,1,128,4,2")
    shapes = ts.train_shapes()
    assert [s.id for s in shapes] == ["B2-T64-V1000-fp32", "B4-T32-V500-bf16"]
    assert shapes[0].n == 256
    assert ts.model_spec() == ts.ModelSpec(64, 1, 128, 4, 2)
    monkeypatch.setenv("DROREBEL_BENCH_TRAIN_SHAPES", "2,64,1000,fp8")
    with pytest.raises(ValueError, match="dtype"):
        ts.train_shapes()
    with pytest.raises(ValueError, match="unknown provider"):
        ts.get_loss("materialised-kl", CPU)


def _train_entry(provider: str, median: float, peak: int) -> dict:
    info = {"bench": "train-step", "provider": provider, "mode": "step", "pairs": 2, "t": 512,
            "n": 2048, "h": 256, "v": 32000, "dtype": "fp32", "model": "llama-test",
            "device_name": "TestCPU", "peak_mem_bytes": peak, "static_mem_bytes": 2**20}
    return {"group": "train-step x", "extra_info": info, "stats": {"median": median}}


def test_report_train_step_ratios(tmp_path: Path) -> None:
    mib = 2**20
    benches = [_train_entry("materialised-chi2", 0.200, 400 * mib),
               _train_entry("drorebel-fused-chi2", 0.100, 100 * mib),
               _train_entry("drorebel-fused-none", 0.080, 100 * mib),
               _train_entry("liger-dpo", 0.250, 200 * mib)]
    rebel = {"group": "rebel-loss fwdbwd B4", "stats": {"median": 0.1}, "extra_info": {
        "provider": "materialised-chi2", "mode": "fwdbwd", "b": 4, "t": 512, "n": 4096,
        "h": 256, "v": 32000, "dtype": "fp32", "peak_mem_bytes": mib}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": [*benches, rebel]}))
    text = report.render_report([str(path)])
    assert "### Training step" in text and "### REBEL loss" in text
    assert "### linear_logps" not in text  # the rebel-loss entry is not a linear row
    rows = {c[2]: c for c in ([x.strip() for x in ln.strip("|").split("|")]
                              for ln in text.splitlines() if ln.startswith("| llama-test"))}
    # provider, step ms, tokens/s, peak, static, speed/mem vs materialised, speed/mem vs Liger
    assert rows["drorebel-fused-chi2"][3:] == ["100.00", "20,480", "100.0", "1.0", "2.00×",
                                               "25.0%", "2.50×", "50.0%", "TestCPU"]
    # no materialised-none measured: compared with materialised-chi2
    assert rows["drorebel-fused-none"][7:9] == ["2.50×", "25.0%"]
    assert rows["liger-dpo"][7:11] == ["0.80×", "50.0%", "1.00×", "100.0%"]


def test_interleaved_mode_writes_report_readable_entries(tmp_path: Path) -> None:
    conf = ts._load_conftest()
    entries = ts.run_interleaved(SHAPE, SPEC, CPU, rounds=2, warmup=0, conf=conf,
                                 clock="process")
    providers = [e["extra_info"]["provider"] for e in entries]
    expected = [p for p in ts.PROVIDERS if p != "liger-dpo" or "liger-dpo" in providers]
    assert providers == expected
    for e in entries:
        assert len(e["stats"]["data"]) == 2 and e["stats"]["median"] > 0
        assert math.isfinite(e["extra_info"]["loss"]) and e["extra_info"]["peak_mem_bytes"] > 0
    path = tmp_path / "i.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": entries}))
    rows = report.load_step_rows(path, "train-step")
    assert sorted(r.provider for r in rows) == sorted(providers)
    assert "CPU seconds" in report.render_step_markdown(rows, train=True)


def test_report_wasserstein_table_is_apart_from_linear(tmp_path: Path) -> None:
    def entry(provider: str, median: float, peak: int | None) -> dict:
        info = {"provider": provider, "mode": "fwdbwd", "n": 4096, "h": 256, "v": 32000,
                "dtype": "fp32", "device_name": "TestCPU", "peak_mem_bytes": peak}
        return {"group": "wasserstein fwdbwd x", "extra_info": info, "stats": {"median": median}}

    mib = 2**20
    benches = [entry("plain-logps", 0.1, 10 * mib), entry("fused-hidden", 0.25, 20 * mib),
               entry("materialised-double-bwd", 1.0, 80 * mib)]
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benches}))
    text = report.render_report([str(path)])
    assert "### Wasserstein penalty" in text and "### linear_logps" not in text
    row = next([c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines()
               if "| fused-hidden |" in ln)
    # fwd+bwd ms, peak, time / plain, speed vs double-bwd, memory vs double-bwd
    assert row[3:8] == ["250.00", "20.0", "2.50×", "4.00×", "25.0%"]
