"""Benchmarks of one full training step of a small Hugging Face Llama with a preference loss.

One step = forward of the model on the stacked ``[a; b]`` responses → final hidden states →
preference loss from the hidden states and the LM head → backward → ``AdamW.step()``:

    L = Σ_i p_i·Δ_i²,  Δ_i = (1/η)[(log π(a_i) − log π_ref(a_i)) − (log π(b_i) − log π_ref(b_i))]
        − (r_a,i − r_b,i)                         (DRO-REBEL, arXiv 2509.19104; docs/design.md §1)

Providers (same model, same batch, same optimiser):

* ``drorebel-fused-{chi2,none}``  ``FusedLinearRebelLoss`` (Triton on CUDA, the chunked PyTorch
  path on the CPU): no ``[tokens × V]`` logits
* ``materialised-{chi2,none}``    the same public loss with ``impl="materialized"``: full
  logits → per-sequence sums → the same ``rebel_loss`` code (the trainer's
  ``loss_impl: materialized``; what a trainer that calls ``lm_head`` does)
* ``liger-dpo``                   Liger-Kernel's chunked ``LigerFusedLinearDPOLoss``
  (``use_ref_model=False``; ``compiled`` on CUDA only, ``DROREBEL_BENCH_LIGER_COMPILED``
  overrides). DPO, not REBEL: a speed and memory yardstick only.

Each result's ``extra_info`` holds tokens/s (``2·B·T`` tokens through the model per step) and
the peak memory of one untimed step beyond the state before it (bench/memory.py: activations,
logits, gradients; parameters and AdamW state are reported apart as ``static_mem_bytes``).
report.py turns the JSON into ratios against ``materialised-*`` and ``liger-dpo`` of the same run.

Grids (the device picks one; environment variables override):

* CPU: Llama H=256, 2 layers, fp32; T ∈ {128, 512} at 2048 tokens/step, V ∈ {8192, 32000}
* CUDA: Llama-3.2-1B geometry (H=2048, 16 layers, GQA 32/8, I=8192), bf16 weights and AdamW;
  T ∈ {512, 2048} at 8192 tokens/step, V ∈ {32000, 128256}

``DROREBEL_BENCH_TRAIN_SHAPES="B,T,V,dtype;..."`` (B pairs), ``DROREBEL_BENCH_TRAIN_MODEL=
"H,layers,intermediate,heads,kv_heads"``, ``DROREBEL_BENCH_ROUNDS="rounds,warmup"``.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

LossFn = Callable[[Tensor, Tensor, dict], Tensor]
ETA = 1.0
DIVERGENCE = {"none": {}, "chi2": {"rho": 0.5}}
LR = 1e-6
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """Llama geometry: hidden size, decoder layers, MLP width, attention and key/value heads."""

    h: int
    layers: int
    inter: int
    heads: int
    kv_heads: int

    @property
    def id(self) -> str:
        return f"llama-H{self.h}-L{self.layers}-I{self.inter}-A{self.heads}/{self.kv_heads}"


@dataclass(frozen=True)
class TrainShape:
    """B pairs of two sequences of T tokens (the first quarter is prompt), vocabulary V."""

    pairs: int
    t: int
    v: int
    dtype_name: str

    @property
    def n(self) -> int:
        """Tokens through the model per step (both responses of every pair)."""
        return 2 * self.pairs * self.t

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype_name]

    @property
    def id(self) -> str:
        return f"B{self.pairs}-T{self.t}-V{self.v}-{self.dtype_name}"


CPU_MODEL = ModelSpec(256, 2, 688, 4, 2)
CUDA_MODEL = ModelSpec(2048, 16, 8192, 32, 8)
CPU_SHAPES = [TrainShape(8, 128, 8192, "fp32"), TrainShape(2, 512, 8192, "fp32"),
              TrainShape(8, 128, 32000, "fp32"), TrainShape(2, 512, 32000, "fp32")]
CUDA_SHAPES = [TrainShape(2, 2048, 128256, "bf16"), TrainShape(8, 512, 128256, "bf16"),
               TrainShape(2, 2048, 32000, "bf16"), TrainShape(8, 512, 32000, "bf16")]
CPU_ROUNDS = (3, 1)
CUDA_ROUNDS = (5, 1)
# the baseline first: if a stage deadline skips the tail, the ratios that exist still have it
PROVIDERS = ["materialised-chi2", "drorebel-fused-chi2", "liger-dpo", "drorebel-fused-none",
             "materialised-none"]


def _device_type() -> str:
    return os.environ.get("DROREBEL_BENCH_DEVICE") or (
        "cuda" if torch.cuda.is_available() else "cpu")


def model_spec() -> ModelSpec:
    """The model benchmarked (``$DROREBEL_BENCH_TRAIN_MODEL`` or the device's default)."""
    spec = os.environ.get("DROREBEL_BENCH_TRAIN_MODEL")
    if spec:
        return ModelSpec(*(int(x) for x in spec.split(",")))
    return CUDA_MODEL if _device_type() == "cuda" else CPU_MODEL


def train_shapes() -> list[TrainShape]:
    """The shape grid (``$DROREBEL_BENCH_TRAIN_SHAPES`` or the device's default)."""
    spec = os.environ.get("DROREBEL_BENCH_TRAIN_SHAPES")
    if not spec:
        return CUDA_SHAPES if _device_type() == "cuda" else CPU_SHAPES
    shapes = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        b, t, v, dtype = (x.strip() for x in item.split(","))
        if dtype not in _DTYPES:
            raise ValueError(f"DROREBEL_BENCH_TRAIN_SHAPES: dtype {dtype!r} not in {list(_DTYPES)}")
        shapes.append(TrainShape(int(b), int(t), int(v), dtype))
    return shapes


def build_model(spec: ModelSpec, vocab: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (untied head, SDPA attention), created on
    ``device`` in ``dtype`` (as ``from_pretrained(..., dtype=...)`` would load it)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=spec.h, intermediate_size=spec.inter,
                      num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                      num_key_value_heads=spec.kv_heads, max_position_embeddings=8192,
                      tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device (a 1B model on the CPU takes long)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.train()


def hidden_states(model: torch.nn.Module, ids: Tensor) -> Tensor:
    """Final hidden states ``[2B, T, H]`` of the decoder (no logits)."""
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


def make_batch(model: torch.nn.Module, s: TrainShape, device: torch.device,
               seed: int = 0) -> dict[str, Tensor]:
    """Stacked ``[a; b]`` ids, aligned labels, rewards and reference log-probs.

    ``labels[:, t] = ids[:, t+1]`` on the response (the last three quarters), ``-100`` on the
    prompt and at the last position, so ``hidden[:, t]`` predicts ``labels[:, t]`` with no
    slicing. Reference log-probs are the initial policy's plus N(0, 1) noise (REBEL records
    log π_t at sampling time), so that residuals and χ² weights are O(1).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, s.v, (2 * s.pairs, s.t), generator=g)
    labels = torch.full_like(ids, -100)
    prompt = max(1, s.t // 4)
    labels[:, prompt - 1:-1] = ids[:, prompt:]
    batch = {"ids": ids.to(device), "labels": labels.to(device),
             "rewards": torch.randn(2 * s.pairs, generator=g).to(device)}
    from drorebel.ops.sequence import linear_sequence_logps

    with torch.no_grad():
        ref = linear_sequence_logps(hidden_states(model, batch["ids"]), model.lm_head.weight,
                                    batch["labels"])
    batch["ref_logps"] = ref + torch.randn(2 * s.pairs, generator=g).to(device)
    return batch


def _rebel(div: str, impl: str) -> LossFn:
    """The public ``FusedLinearRebelLoss`` (the trainer's loss): ``impl="auto"`` is the fused
    path, ``impl="materialized"`` the full-logits baseline of the same loss code."""
    from drorebel.losses.fused_rebel import FusedLinearRebelLoss

    loss_fn = FusedLinearRebelLoss(ETA, div, impl=impl, **DIVERGENCE[div])
    return lambda h, w, x: loss_fn(h, w, x["labels"], x["rewards"], x["ref_logps"]).loss


def _liger(device: torch.device) -> LossFn:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except Exception as exc:  # an external baseline: a broken install skips, never fails
        pytest.skip(f"liger-kernel not importable: {type(exc).__name__}: {exc}")
    compiled = os.environ.get("DROREBEL_BENCH_LIGER_COMPILED", str(int(device.type == "cuda")))
    loss_fn = LigerFusedLinearDPOLoss(use_ref_model=False, compiled=compiled == "1")

    def loss(h: Tensor, w: Tensor, x: dict) -> Tensor:
        out = loss_fn(w, h, x["labels"])
        return out[0] if isinstance(out, tuple) else out

    return loss


def get_loss(name: str, device: torch.device) -> LossFn:
    """``(hidden [2B, T, H], lm_head weight [V, H], batch) -> scalar loss`` of a provider."""
    kind, _, div = name.rpartition("-")
    if kind == "drorebel-fused" and div in DIVERGENCE:
        return _rebel(div, "auto")
    if kind == "materialised" and div in DIVERGENCE:
        return _rebel(div, "materialized")
    if name == "liger-dpo":
        return _liger(device)
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")


@dataclass
class TrainStep:
    """A timed training step (``step``), its untimed ``setup`` and the last loss value."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    batch: dict[str, Tensor]
    last_loss: Tensor | None = None

    def _sync(self) -> None:
        if self.batch["ids"].device.type == "cuda":
            torch.cuda.synchronize()

    def setup(self) -> None:
        """Drop the previous gradients (they would count in the next step's peak memory)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()

    def step(self) -> None:
        """Forward → loss → backward → AdamW step (device synchronised at the end)."""
        hidden = hidden_states(self.model, self.batch["ids"])
        loss = self.loss_fn(hidden, self.model.lm_head.weight, self.batch)
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss.detach()
        self._sync()

    def release(self) -> None:
        """Free the gradients and the optimiser state (the model is shared between tests)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()

    def static_bytes(self) -> int:
        """Bytes of the parameters and the optimiser state (alive across steps)."""
        tensors = list(self.model.parameters())
        tensors += [t for st in self.optimizer.state.values() for t in st.values()
                    if isinstance(t, Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def make_train_step(model: torch.nn.Module, provider: str, batch: dict[str, Tensor],
                    device: torch.device) -> TrainStep:
    """AdamW (fused on CUDA) over all parameters and the provider's loss on ``batch``."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0,
                            fused=device.type == "cuda")
    return TrainStep(model, opt, get_loss(provider, device), batch)


_MODELS: dict[tuple, torch.nn.Module] = {}


def cached_model(spec: ModelSpec, s: TrainShape, device: torch.device) -> torch.nn.Module:
    """One model per (geometry, V, dtype) per session: the providers of a shape share it."""
    key = (spec, s.v, s.dtype_name, device.type)
    if key not in _MODELS:
        _MODELS.clear()  # free the previous vocabulary's model first
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _MODELS[key] = build_model(spec, s.v, s.dtype, device)
    return _MODELS[key]


def step_info(s: TrainShape, spec: ModelSpec, provider: str, ts: TrainStep, mem) -> dict:
    """The ``extra_info`` of one result (report.py reads it); ``mem``: a ``MemoryStats``."""
    return dict(
        bench="train-step", provider=provider, mode="step", pairs=s.pairs, t=s.t, n=s.n,
        h=spec.h, v=s.v, dtype=s.dtype_name, model=spec.id,
        params=sum(p.numel() for p in ts.model.parameters()),
        loss=float(ts.last_loss) if ts.last_loss is not None else None,
        peak_mem_bytes=mem.peak_bytes, retained_mem_bytes=mem.retained_bytes,
        static_mem_bytes=ts.static_bytes(), mem_method=mem.method,
    )


def _record(benchmark, s: TrainShape, spec: ModelSpec, provider: str, ts: TrainStep,
            mem, env: dict) -> None:
    info = benchmark.extra_info
    info.update(**step_info(s, spec, provider, ts, mem), **env)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None when benchmarks are disabled (smoke-test run)
        info["tokens_per_s"] = s.n / stats.stats.median


def _cases() -> list:
    return [pytest.param(s, p, id=f"{s.id}-{p}") for s in train_shapes() for p in PROVIDERS]


@pytest.mark.parametrize(("train_shape", "provider"), _cases())
def test_train_step(benchmark, measure_memory, train_shape, provider, device, env_info) -> None:
    spec = model_spec()
    model = cached_model(spec, train_shape, device)
    ts = make_train_step(model, provider, make_batch(model, train_shape, device), device)
    benchmark.group = f"train-step {spec.id} {train_shape.id}"
    custom = os.environ.get("DROREBEL_BENCH_ROUNDS")
    n_rounds, warmup = (tuple(int(x) for x in custom.split(",")) if custom else
                        CUDA_ROUNDS if device.type == "cuda" else CPU_ROUNDS)
    try:
        benchmark.pedantic(ts.step, setup=ts.setup, rounds=n_rounds, warmup_rounds=warmup,
                           iterations=1)
        ts.setup()
        mem = measure_memory(ts.step, device)
        assert ts.last_loss is not None and math.isfinite(float(ts.last_loss)), ts.last_loss
        _record(benchmark, train_shape, spec, provider, ts, mem, env_info)
    finally:
        ts.release()


# ------------------------------------------------------------- interleaved script mode (CPU)
def _load_conftest():
    """bench/conftest.py by path (device name, versions, the memory probe)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "drorebel_bench_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def _timed(ts: TrainStep, clock: Callable[[], float]) -> float:
    ts.setup()
    start = clock()
    ts.step()
    return clock() - start


def run_interleaved(s: TrainShape, spec: ModelSpec, device: torch.device, rounds: int,
                    warmup: int, conf, clock: str = "wall") -> list[dict]:
    """pytest-benchmark-like entries of every provider at shape ``s``, timed round-robin:
    round r steps each provider once, so a load burst on a shared machine hits all alike.
    ``clock="process"`` (CPU only) times the CPU seconds of this process instead of wall
    time: with ``OMP_NUM_THREADS=1`` that is the work done, whatever the machine's load."""
    if clock == "process" and device.type != "cpu":
        raise ValueError("clock='process' measures CPU time: use it on the CPU only")
    model = build_model(spec, s.v, s.dtype, device)
    batch = make_batch(model, s, device)
    steps = {}
    for provider in PROVIDERS:
        try:
            steps[provider] = make_train_step(model, provider, batch, device)
        except pytest.skip.Exception as exc:
            print(f"skip {provider}: {exc}", flush=True)
    times: dict[str, list[float]] = {p: [] for p in steps}
    for r in range(warmup + rounds):
        for provider, ts in steps.items():
            dt = _timed(ts, CLOCKS[clock])
            if r >= warmup:
                times[provider].append(dt)
    entries = []
    for provider, ts in steps.items():
        ts.setup()
        mem = conf.memory.measure_peak_memory(ts.step, device)
        info = step_info(s, spec, provider, ts, mem)
        ts.release()
        median = statistics.median(times[provider])
        info.update(tokens_per_s=s.n / median, timing="interleaved", clock=clock,
                    device=device.type, device_name=conf.device_name(device), **conf.versions())
        stats = {"median": median, "min": min(times[provider]), "max": max(times[provider]),
                 "rounds": rounds, "data": times[provider]}
        entries.append({"group": f"train-step {spec.id} {s.id}", "extra_info": info,
                        "name": f"interleaved[{s.id}-{provider}]", "stats": stats})
        print(f"{s.id} {provider}: median {median:.3f} s, peak {mem.peak_bytes / 2**20:.1f} MiB",
              flush=True)
    return entries


def main(argv: list[str] | None = None) -> int:
    """``python bench/test_bench_train_step.py --json out.json``: the grid, interleaved timing
    (for loaded CPUs), written in pytest-benchmark's JSON layout so report.py reads it."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="output file")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="process: CPU seconds of this process (CPU; OMP_NUM_THREADS=1)")
    args = parser.parse_args(argv)
    conf = _load_conftest()
    device = conf.bench_device()
    machine = {"bench_device": device.type, "bench_device_name": conf.device_name(device),
               "timing": "interleaved", "clock": args.clock,
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""), **conf.versions()}
    entries = []
    for s in train_shapes():
        entries += run_interleaved(s, model_spec(), device, args.rounds, args.warmup, conf,
                                   args.clock)
        Path(args.json).write_text(json.dumps({"machine_info": machine, "benchmarks": entries},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
