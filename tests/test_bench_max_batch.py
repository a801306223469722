"""bench/test_bench_max_batch.py: the largest-micro-batch search (hand-worked memory models and
a real tiny CPU run where the fused head must fit more pairs) and its report.py table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from load_path import load_bench

mb = load_bench("test_bench_max_batch", "drorebel_bench_max_batch")
report = load_bench("report")
MiB = 2**20


def _affine(intercept: int, slope: int, calls: list[int], oom_from: int | None = None):
    def measure(b: int):
        calls.append(b)
        if oom_from is not None and b >= oom_from:
            return mb.Probe(b, None)
        return mb.Probe(b, intercept + slope * b)
    return measure


def test_affine_memory_is_found_in_four_probes() -> None:
    # static 100 + peak 50 + 100·B ≤ 1000  ⇔  B ≤ 8.5  →  B* = 8, verified by 8 (fits) and 9
    calls: list[int] = []
    b, probes = mb.largest_fitting(_affine(50, 100, calls), static=100, cap=1000, b_max=64)
    assert b == 8
    assert calls == [1, 2, 8, 9]
    assert [p.pairs for p in probes] == [1, 2, 8, 9]
    assert mb.predict_pairs(100, 1000, probes[0], probes[1]) == 8


def test_boundary_is_verified_when_memory_is_not_affine() -> None:
    # affine prediction from B=1,2 says 8, but from B=6 on each pair costs twice as much:
    # peak(6)=650+100=750 fits (850), peak(7)=950 (+100 static > 1000) does not
    def measure(b: int):
        return mb.Probe(b, 50 + 100 * b + (0 if b < 6 else 100 * (b - 5)))

    assert mb.largest_fitting(measure, static=100, cap=1000, b_max=64)[0] == 6
    # and upwards: the first probes overstate the slope
    def cheaper(b: int):
        return mb.Probe(b, 50 + 100 * b if b <= 2 else 250 + 40 * (b - 2))

    # static 100: 250 + 40·(B−2) ≤ 900  ⇔  B ≤ 18.25
    assert mb.largest_fitting(cheaper, static=100, cap=1000, b_max=64)[0] == 18


def test_flat_memory_goes_straight_to_the_limit_and_bisection_stays_logarithmic() -> None:
    calls: list[int] = []
    b, _ = mb.largest_fitting(_affine(50, 0, calls), 100, 1000, b_max=256)
    assert (b, calls) == (256, [1, 2, 256])  # the step does not grow: one probe at the limit
    # memory flat up to B=2, then 10 per pair: the prediction (the limit) fails, the pair
    # above B=2 fits, and the bisection needs about log2(256) more probes, not 200
    calls = []
    b, _ = mb.largest_fitting(
        lambda k: (calls.append(k), mb.Probe(k, 100 + 10 * max(0, k - 2)))[1], 100, 1000, 256)
    assert b == 82 and len(calls) <= 4 + 9  # 200 + 10·(82 − 2) = 1000 ≤ 1000 < 1010


def test_out_of_memory_does_not_fit_and_limits_apply() -> None:
    calls: list[int] = []
    # the allocator runs out at B=5 although the measured model predicts 8
    assert mb.largest_fitting(_affine(50, 100, calls, oom_from=5), 100, 1000, 64)[0] == 4
    assert mb.largest_fitting(_affine(50, 100, []), 100, 1000, b_max=3)[0] == 3
    assert mb.largest_fitting(_affine(50, 100, []), 100, 1000, b_max=1)[0] == 1
    b, probes = mb.largest_fitting(_affine(50, 1000, []), 100, 1000, 64)  # B=1 needs 1150
    assert (b, [p.pairs for p in probes]) == (0, [1])
    assert mb.largest_fitting(_affine(50, 100, [], oom_from=2), 100, 1000, 64)[0] == 1


def test_cap_spec_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DROREBEL_BENCH_MAX_BATCH", "64, 1000, fp32, 0.25, 8")
    spec = mb.cap_spec()
    assert spec == mb.CapSpec(64, 1000, "fp32", 2**28, 8)
    assert spec.id == "T64-V1000-fp32-cap0.25GiB"
    monkeypatch.setenv("DROREBEL_BENCH_MAX_BATCH", "64,1000,fp8,1")
    with pytest.raises(ValueError, match="DROREBEL_BENCH_MAX_BATCH"):
        mb.cap_spec()


def test_fused_head_fits_more_pairs_than_materialised_logits_on_cpu() -> None:
    # a vocabulary large against the model, so the [2BT, V] logits dominate the step, and
    # one pair (1024 tokens · 8000 · 4 B = 31 MiB) as large as a CPU chunk (32 MiB): the
    # chunked head's working set does not grow with B
    cpu = torch.device("cpu")
    spec = mb.ts.ModelSpec(h=32, layers=1, inter=64, heads=4, kv_heads=2)
    measure = mb.ts._load_conftest().memory.measure_peak_memory
    found = {}
    for provider in ("materialised-chi2", "drorebel-fused-chi2"):
        probe_cap = mb.CapSpec(t=512, v=8000, dtype_name="fp32", cap_bytes=0, b_max=6)
        model = mb.ts.build_model(spec, probe_cap.v, torch.float32, cpu)
        mb.enable_checkpointing(model)
        runner = mb.CapRunner(model, provider, probe_cap, cpu, measure)
        static = runner.static_bytes()
        one = runner.probe(1)
        # the cap: what the materialised step needs at 2 pairs (the same for both providers,
        # measured on the materialised one)
        if provider == "materialised-chi2":
            two = runner.probe(2)
            cap = static + two.peak_bytes + (two.peak_bytes - one.peak_bytes) // 2
        runner.cap = mb.CapSpec(512, 8000, "fp32", cap, 6)
        b, _ = mb.largest_fitting(runner.probe, static, cap, 6)
        runner.release()
        found[provider] = b
    assert found["materialised-chi2"] == 2
    assert found["drorebel-fused-chi2"] > 2 * found["materialised-chi2"]


def _entry(provider: str, pairs: int, median: float | None) -> dict:
    info = {"bench": "train-step", "mode": "max-batch", "provider": provider, "pairs": pairs,
            "t": 512, "n": 2 * pairs * 512, "v": 32000, "dtype": "bf16", "model": "llama-x",
            "cap_bytes": 48 * 2**30, "static_mem_bytes": 8 * 2**30,
            "peak_mem_bytes": 30 * 2**30, "device_name": "TestGPU"}
    return {"group": "max-batch x", "extra_info": info,
            "stats": None if median is None else {"median": median}}


def test_report_cap_table_ratios(tmp_path: Path) -> None:
    benches = [_entry("materialised-chi2", 4, 0.5), _entry("drorebel-fused-chi2", 10, 1.0),
               _entry("liger-dpo", 6, None)]
    benches[1]["extra_info"]["b_max"] = 10  # the search stopped at its limit
    benches[0]["extra_info"]["b_max"] = 16
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benches}))
    text = report.render_report([str(path)])
    assert "### Largest micro-batch under a memory cap" in text
    assert "### Training step" not in text and "### linear_logps" not in text
    rows = {c[2]: c for c in ([x.strip() for x in ln.strip("|").split("|")]
                              for ln in text.splitlines() if ln.startswith("| llama-x"))}
    # shape, cap, provider, pairs, step ms, tokens/s, used GiB, pairs ratio, tokens/s ratio
    assert rows["materialised-chi2"][3:9] == ["4", "500.00", "8,192", "38.00", "1.00×", "1.00×"]
    # 2·10·512 / 1.0 s = 10,240 tokens/s vs 8,192: 1.25×; 10 / 4 pairs = 2.50×
    assert rows["drorebel-fused-chi2"][3:9] == ["≥ 10", "1000.00", "10,240", "38.00", "2.50×",
                                                "1.25×"]
    assert rows["liger-dpo"][3:9] == ["6", "–", "–", "38.00", "1.50×", "–"]
