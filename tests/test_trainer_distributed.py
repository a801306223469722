"""The trainer on several processes: DeepSpeed ZeRO-2/3 (and ZeRO-3 with CPU offload of
parameters and optimizer) and torchrun DDP equal one process.

Two CPU ranks (gloo) train the tiny Llama of ``trainer_fixtures`` with χ²-DRO-REBEL (ρ = 0.5:
the weights are far from uniform, so weights over the *global* micro-batch matter) for 3 steps
of 2 accumulated micro-batches. Per-step metrics and the final weights must match a single
process on the same data; a ZeRO-3 run stopped after step 2 and resumed must continue bitwise
like the uninterrupted one (the ZeRO-2 and DDP runs are also stopped and resumed before they
are compared with one process); the final folder (ZeRO-3 weights gathered on rank 0) loads with
``from_pretrained``; a ZeRO-3 run can start from such a folder (``from_pretrained`` into
ZeRO-3 partitions). One ``deepspeed`` launch runs all DeepSpeed cases (its first run JIT-builds
a small communication op, ~1 min) and one ``torchrun`` launch the DDP cases.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from launch import BIN, launch
from safetensors.torch import load_file
from trainer_fixtures.tiny import base_overrides

from drorebel.trainer.config import ConfigError, TrainConfig
from drorebel.trainer.engine import Engine, deepspeed_config
from drorebel.trainer.loop import train
from drorebel.trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "dist_workers" / "trainer_worker.py"
RUN = dict(max_steps=3, batch_size=4, grad_accum=2, divergence="chi2", rho=0.5, lr=3e-3,
           save_steps=1, save_total_limit=3)
COMPARED = ("loss", "grad_norm", "dro/robust_objective", "dro/ess", "dro/weight_max",
            "rebel/loss_mean", "logps/a", "lr")
RTOL = 1e-5  # fp32; sharded reduce-scatter and all-gathers change the summation order


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(tmp: Path, name: str, cfg: dict) -> str:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _launch(cmd: list[str], cwd: Path) -> None:
    launch(cmd, cwd, timeout=400)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("deepspeed")
    launcher = BIN / "deepspeed"
    assert launcher.exists(), f"deepspeed launcher not found beside {sys.executable}"
    tmp = tmp_path_factory.mktemp("dist")
    base = base_overrides(str(tmp), **RUN)
    names = ("single", "z3", "z3r", "z3off", "z2", "ddp", "pre1", "pre3")
    out = {name: tmp / name for name in names}
    train(TrainConfig.from_dict({**base, "output_dir": str(out["single"])}))
    pre = {k: v for k, v in base.items() if k not in ("model_config", "tokenizer")}
    pre.update(model=str(out["single"] / "final"), max_steps=1, grad_accum=1)
    train(TrainConfig.from_dict({**pre, "output_dir": str(out["pre1"])}))
    z3 = {**base, "deepspeed": str(ROOT / "configs" / "ds_zero3.json")}
    z2 = {**base, "deepspeed": str(ROOT / "configs" / "ds_zero2.json")}
    ds_cases = [
        _write(tmp, "z3", {**z3, "output_dir": str(out["z3"])}),
        _write(tmp, "z3stop", {**z3, "output_dir": str(out["z3r"]), "stop_at_step": 2}),
        _write(tmp, "z3resume", {**z3, "output_dir": str(out["z3r"]), "resume": "auto"}),
        _write(tmp, "z2stop", {**z2, "output_dir": str(out["z2"]), "stop_at_step": 1}),
        _write(tmp, "z2resume", {**z2, "output_dir": str(out["z2"]), "resume": "auto"}),
        _write(tmp, "z3off", {**z3, "output_dir": str(out["z3off"]),
                              "deepspeed": str(ROOT / "configs" / "ds_zero3_offload.json")}),
        _write(tmp, "pre3", {**pre, "output_dir": str(out["pre3"]),
                             "deepspeed": z3["deepspeed"]}),
    ]
    _launch([str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()),
             "--no_local_rank", str(WORKER), *ds_cases], tmp)
    ddp = {**base, "output_dir": str(out["ddp"])}
    ddp_cases = [_write(tmp, "ddpstop", {**ddp, "stop_at_step": 2}),
                 _write(tmp, "ddpresume", {**ddp, "resume": "auto"})]
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", str(_free_port()), str(WORKER), *ddp_cases], tmp)
    return out


def _metrics(run: Path) -> list[dict]:
    return read_jsonl(str(run / "metrics.jsonl"))


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _assert_same_run(got: Path, ref: Path, init: dict[str, torch.Tensor],
                     rtol: float = RTOL) -> None:
    """Same per-step metrics; final weights equal up to rounding, and so is the update itself
    (``final − init``: Adam's first steps amplify tiny gradient differences, so 1e-3)."""
    mg, mr = _metrics(got), _metrics(ref)
    assert [r["step"] for r in mg] == [r["step"] for r in mr]
    for a, b in zip(mg, mr):
        assert a["num_tokens"] == b["num_tokens"]
        for key in COMPARED:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=rtol, abs=1e-7), (key, a["step"])
        # η* is a threshold on the losses (it may sit near 0): compare on the losses' scale
        scale = rtol * b["dro/robust_objective"]
        assert a["dro/eta_star"] == pytest.approx(b["dro/eta_star"], abs=scale), a["step"]
    fg, fr = _final(got), _final(ref)
    assert fg.keys() == fr.keys()
    for key, w in fr.items():
        assert (fg[key] - w).abs().max() < 100 * rtol * w.abs().max(), key
        step_ref, step_got = w - init[key], fg[key] - init[key]
        if step_ref.norm() > 1e-6:
            assert (step_got - step_ref).norm() / step_ref.norm() < 1e-3, key


def _initial_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from drorebel.trainer.model import load_model

    init = TrainConfig.from_dict(base_overrides(str(run_dir), **RUN))
    return {k: v.detach() for k, v in load_model(init, torch.device("cpu")).state_dict().items()}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["z3", "z3off", "z2", "ddp"])
def test_two_ranks_equal_one_process(runs: dict[str, Path], backend: str) -> None:
    ref = _metrics(runs["single"])
    assert ref[0]["dro/ess"] < RUN["batch_size"] - 1  # χ² weights far from uniform
    assert ref[-1]["dro/robust_objective"] < 0.5 * ref[0]["dro/robust_objective"]
    _assert_same_run(runs[backend], runs["single"], _initial_weights(runs["single"].parent))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deepspeed_resume_continues_identically(runs: dict[str, Path]) -> None:
    names = sorted(os.listdir(runs["z3r"]))
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "final", "metrics.jsonl"]
    ck = runs["z3r"] / "checkpoint-2"
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["backend"] == "deepspeed" and state["world_size"] == 2
    assert (ck / "rng-0.pt").exists() and (ck / "rng-1.pt").exists()
    assert not list(runs["z3r"].glob(".tmp-*"))
    timed = ("tokens_per_s", "peak_memory_gb")
    untimed = [[{k: v for k, v in r.items() if k not in timed} for r in _metrics(runs[name])]
               for name in ("z3r", "z3")]
    assert untimed[0] == untimed[1]  # bitwise: same floats in the JSONL
    got, want = _final(runs["z3r"]), _final(runs["z3"])
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_final_dir_loads_and_zero3_starts_from_pretrained(runs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(runs["z3"] / "final"))
    saved, single = _final(runs["z3"]), _final(runs["single"])
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for name, p in state.items():
        assert torch.equal(p, saved[name]), name
        assert (p - single[name]).abs().max() < 1e-4 * single[name].abs().max(), name
    # 1 step from that folder: ZeRO-3 (weights loaded into partitions) == one process
    _assert_same_run(runs["pre3"], runs["pre1"], single)


# --------------------------------------------------------------------------- fast checks
def test_deepspeed_config_is_filled_from_train_config(tmp_path: Path) -> None:
    cfg = TrainConfig.from_dict(base_overrides(
        str(tmp_path), batch_size=8, grad_accum=3, max_grad_norm=None, dtype="bfloat16",
        deepspeed=str(ROOT / "configs" / "ds_zero3.json")))
    ds = deepspeed_config(cfg, world_size=4, hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 640
    assert zero["reduce_bucket_size"] == 4096 and zero["stage3_prefetch_bucket_size"] == 3686
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    for name in ("ds_zero2.json", "ds_zero2_offload.json", "ds_zero3_offload.json"):
        other = TrainConfig.from_dict({**cfg.to_dict(), "deepspeed": str(ROOT / "configs" / name)})
        filled = deepspeed_config(other, world_size=2, hidden_size=64)
        assert "auto" not in json.dumps(filled), name
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({"gradient_accumulation_steps": 5, "zero_optimization": {}}))
    bad = TrainConfig.from_dict({**cfg.to_dict(), "deepspeed": str(clash)})
    with pytest.raises(ConfigError, match="gradient_accumulation_steps.*disagrees"):
        deepspeed_config(bad, world_size=1, hidden_size=64)


def test_missing_deepspeed_config_is_refused(tmp_path: Path) -> None:
    cfg = TrainConfig.from_dict(base_overrides(str(tmp_path), deepspeed=str(tmp_path / "no.json")))
    with pytest.raises(ConfigError, match="does not exist"):
        train(cfg)


def test_gradient_checkpointing_same_result_and_liger_skipped_on_cpu(tmp_path: Path) -> None:
    kw = dict(max_steps=2, divergence="kl", rho=0.3)
    a = train(TrainConfig.from_dict(base_overrides(str(tmp_path / "a"), **kw)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = train(TrainConfig.from_dict(base_overrides(
            str(tmp_path / "b"), gradient_checkpointing=True, liger_kernel=True, **kw)))
    assert any("liger_kernel" in str(w.message) for w in caught)
    for ra, rb in zip(read_jsonl(a.metrics_path), read_jsonl(b.metrics_path)):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)


def test_extra_state_round_trips_and_deepspeed_world_size_is_checked(tmp_path: Path) -> None:
    from drorebel.trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from drorebel.trainer.engine import create_engine

    cfg = TrainConfig.from_dict(base_overrides(str(tmp_path)))
    engine = create_engine(cfg)
    assert isinstance(engine, Engine) and (engine.rank, engine.world_size) == (0, 1)
    extra = {"buffer": torch.arange(5.0), "prompt_pos": 7, "names": ["a", "b"]}
    path = save_checkpoint(cfg.output_dir, 3, engine, cfg.fingerprint(), 2, extra_state=extra)
    step, got = load_checkpoint(path, engine, cfg.fingerprint())
    assert step == 3 and torch.equal(got["buffer"], extra["buffer"])
    assert got["prompt_pos"] == 7 and got["names"] == ["a", "b"]
    state = json.loads(Path(path, "trainer_state.json").read_text())
    Path(path, "trainer_state.json").write_text(json.dumps(
        {**state, "backend": "deepspeed", "world_size": 2}))
    with pytest.raises(CheckpointError, match="deepspeed on 2 rank"):
        load_checkpoint(path, engine, cfg.fingerprint())


def test_deepspeed_step_reports_skipped_and_non_finite_steps() -> None:
    """DeepSpeed skips an overflowing step itself; the engine turns that into TrainingDiverged."""
    from drorebel.trainer.engine import DeepSpeedEngine, TrainingDiverged

    class FakeDS:
        def __init__(self, norm: float | None, skip: bool) -> None:
            self.norm, self.skip, self.skipped_steps = norm, skip, 0

        def step(self) -> None:
            self.skipped_steps += int(self.skip)

        def get_global_grad_norm(self) -> float | None:
            return self.norm

    engine = object.__new__(DeepSpeedEngine)
    for norm, skip, ok in ((2.5, False, True), (None, False, True), (float("inf"), False, False),
                           (float("nan"), True, False), (1.0, True, False)):
        engine.ds = FakeDS(norm, skip)
        if ok:
            got = engine.step(4)
            assert got == norm if norm is not None else got != got
        else:
            with pytest.raises(TrainingDiverged, match="at step 5"):
                engine.step(4)


def test_close_process_group_destroys_only_the_trainers_own_group(monkeypatch) -> None:
    # a process exiting with a live gloo group can abort in the communicator's destructor
    # (SIGABRT after a finished run, seen in CI): the commands destroy the group they created
    import torch.distributed as dist

    from drorebel.trainer import engine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    assert not dist.is_initialized()
    engine._init_process_group(use_deepspeed=False)
    assert dist.is_initialized()
    engine.close_process_group()
    assert not dist.is_initialized()
    # a group the caller created is left alone
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        engine._init_process_group(use_deepspeed=False)  # already there: not ours
        engine.close_process_group(synchronise=False)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
