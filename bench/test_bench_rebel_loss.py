"""Benchmarks of one preference-loss forward + backward from hidden states and the LM head.

    L = Σ_i p_i·Δ_i²,  Δ_i = (1/η)[(log π(a_i) − log π_ref(a_i)) − (log π(b_i) − log π_ref(b_i))]
        − (r_a,i − r_b,i)                         (DRO-REBEL, arXiv 2509.19104; docs/design.md §1)

Providers, all on the same stacked ``[a; b]`` hidden states ``[2B, T, H]``, LM head ``[V, H]``
and labels (every position a response token):

* ``drorebel-fused-{none,chi2,kl}``  ``FusedLinearRebelLoss`` (``impl="auto"``: Triton on CUDA,
  the chunked PyTorch path on the CPU), precomputed reference log-probs
* ``materialised-{none,chi2,kl}``     the same public loss with ``impl="materialized"``: full
  ``[2B·T, V]`` logits → per-sequence sums → the same ``rebel_loss`` code (what the trainer's
  ``loss_impl: materialized`` runs)
* ``liger-dpo``                       Liger-Kernel's ``LigerFusedLinearDPOLoss`` (chunked over
  pairs), ``use_ref_model=False`` so that neither side runs a reference forward;
  ``compiled=True`` on CUDA, ``False`` on the CPU (``DROREBEL_BENCH_LIGER_COMPILED=0|1``
  overrides). DPO, not REBEL: a speed yardstick only.

Timings are wall-clock (CUDA synchronised). Peak memory comes from one extra, untimed run
(bench/memory.py): bytes allocated beyond the inputs, gradients included. FLOP: 6·N·H·V
(the LM-head matmuls of forward + backward), N = 2·B·T tokens.

Shapes: CPU B=4 pairs × T=512 (N=4096), H=256, V=32000, fp32; CUDA B=8 × T=1024 (N=16384),
H=4096, V=128256 bf16 (the docs/design.md §4 reference shape) and B=4 × T=512, H=4096, V=32000 bf16.
On the CPU the default is 2 timed rounds after 1 warm-up (``DROREBEL_BENCH_ROUNDS`` overrides).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

Step = Callable[[], None]


@dataclass(frozen=True)
class LossShape:
    """B pairs of two responses of T tokens each, hidden size H, vocabulary V."""

    b: int
    t: int
    h: int
    v: int
    dtype_name: str

    @property
    def n(self) -> int:
        return 2 * self.b * self.t

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype_name]

    @property
    def id(self) -> str:
        return f"B{self.b}-T{self.t}-H{self.h}-V{self.v}-{self.dtype_name}"


CPU_SHAPES = [LossShape(4, 512, 256, 32000, "fp32")]
CUDA_SHAPES = [LossShape(8, 1024, 4096, 128256, "bf16"), LossShape(4, 512, 4096, 32000, "bf16")]
CPU_ROUNDS = (2, 1)
PROVIDERS = [f"drorebel-fused-{d}" for d in ("none", "chi2", "kl")]
PROVIDERS += [f"materialised-{d}" for d in ("none", "chi2", "kl")] + ["liger-dpo"]
DIVERGENCE = {"none": {}, "chi2": {"rho": 0.5}, "kl": {"rho": 0.2}}
ETA = 1.0


def _shapes() -> list[LossShape]:
    cuda = os.environ.get("DROREBEL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    return CUDA_SHAPES if cuda == "cuda" else CPU_SHAPES


def make_inputs(s: LossShape, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Stacked hidden states (logits O(1)), head, labels, rewards and reference log-probs."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(2 * s.b, s.t, s.h, generator=g, device=device)
    weight = torch.randn(s.v, s.h, generator=g, device=device) * s.h**-0.5
    labels = torch.randint(0, s.v, (2 * s.b, s.t), generator=g, device=device)
    rewards = torch.randn(2 * s.b, generator=g, device=device)
    # reference log-probs near the policy's (≈ −T·log V) so that the residuals are O(1)
    ref = -s.t * torch.log(torch.tensor(float(s.v))) + torch.randn(2 * s.b, generator=g,
                                                                  device=device)
    return {"hidden": hidden.to(s.dtype).requires_grad_(),
            "weight": weight.to(s.dtype).requires_grad_(),
            "labels": labels, "rewards": rewards, "ref_logps": ref.to(device)}


def _rebel(div: str, impl: str) -> Callable[[dict], torch.Tensor]:
    """The public ``FusedLinearRebelLoss`` (the trainer's loss) on the stacked inputs:
    ``impl="auto"`` is the fused path, ``impl="materialized"`` the full-logits baseline."""
    from drorebel.losses.fused_rebel import FusedLinearRebelLoss

    loss_fn = FusedLinearRebelLoss(ETA, div, impl=impl, **DIVERGENCE[div])
    return lambda x: loss_fn(x["hidden"], x["weight"], x["labels"], x["rewards"],
                             x["ref_logps"]).loss


def _liger(device: torch.device) -> Callable[[dict], torch.Tensor]:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except Exception as exc:  # an external baseline: a broken install skips, never fails
        pytest.skip(f"liger-kernel not importable: {type(exc).__name__}: {exc}")
    compiled = os.environ.get("DROREBEL_BENCH_LIGER_COMPILED", str(int(device.type == "cuda")))
    loss_fn = LigerFusedLinearDPOLoss(use_ref_model=False, compiled=compiled == "1")

    def loss(x: dict) -> torch.Tensor:
        out = loss_fn(x["weight"], x["hidden"], x["labels"])
        return out[0] if isinstance(out, tuple) else out

    return loss


def get_provider(name: str, device: torch.device) -> Callable[[dict], torch.Tensor]:
    """The callable ``inputs -> scalar loss`` of a provider."""
    kind, _, div = name.rpartition("-")
    if kind == "drorebel-fused" and div in DIVERGENCE:
        return _rebel(div, "auto")
    if kind == "materialised" and div in DIVERGENCE:
        return _rebel(div, "materialized")
    if name == "liger-dpo":
        return _liger(device)
    raise ValueError(f"unknown provider {name!r}")


def make_step(fn: Callable[[dict], torch.Tensor], x: dict, device: torch.device):
    """The timed step (forward + backward, returns nothing) and its untimed setup."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def setup() -> None:
        x["hidden"].grad = None
        x["weight"].grad = None
        sync()

    def step() -> None:
        fn(x).backward()
        sync()

    return step, setup


def _record(benchmark, s: LossShape, provider: str, env: dict, mem) -> None:
    info = benchmark.extra_info
    info.update(provider=provider, mode="fwdbwd", b=s.b, t=s.t, n=s.n, h=s.h, v=s.v,
                dtype=s.dtype_name, **env)
    info["flop"] = 6 * s.n * s.h * s.v
    info["peak_mem_bytes"] = mem.peak_bytes
    info["retained_mem_bytes"] = mem.retained_bytes
    info["mem_method"] = mem.method
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None when benchmarks are disabled (smoke-test run)
        median = stats.stats.median
        info["tokens_per_s"] = s.n / median
        info["tflops"] = info["flop"] / median / 1e12


@pytest.mark.parametrize("loss_shape", _shapes(), ids=lambda s: s.id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_rebel_loss_fwdbwd(benchmark, measure_memory, loss_shape, provider, device, rounds,
                           env_info) -> None:
    fn = get_provider(provider, device)
    step, setup = make_step(fn, make_inputs(loss_shape, device), device)
    benchmark.group = f"rebel-loss fwdbwd {loss_shape.id}"
    custom = os.environ.get("DROREBEL_BENCH_ROUNDS") or device.type == "cuda"
    n_rounds, warmup = rounds if custom else CPU_ROUNDS
    benchmark.pedantic(step, setup=setup, rounds=n_rounds, warmup_rounds=warmup, iterations=1)
    setup()
    mem = measure_memory(step, device)
    _record(benchmark, loss_shape, provider, env_info, mem)


# ----------------------------------------------------------------------------- GPU script mode
def _time(step: Step, setup: Callable[[], None], reps: int) -> float:
    """Median seconds of ``step`` (CUDA events when on the GPU), after one warm-up."""
    setup()
    step()
    times = []
    for _ in range(reps):
        setup()
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _agreement(device: torch.device) -> dict[str, float]:
    """Fused χ² loss vs the materialised path at a mid-size shape: relative differences."""
    s = LossShape(4, 256, 1024, 32000, "bf16" if device.type == "cuda" else "fp32")
    res = {}
    outs = {}
    for name in ("drorebel-fused-chi2", "materialised-chi2"):
        x = make_inputs(s, device, seed=1)
        loss = get_provider(name, device)(x)
        loss.backward()
        outs[name] = (loss.detach().float(), x["weight"].grad.float(), x["hidden"].grad.float())
    for i, key in enumerate(("loss", "dW", "dH")):
        a, b = outs["drorebel-fused-chi2"][i], outs["materialised-chi2"][i]
        res[key] = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return res


def main() -> None:
    """``python bench/test_bench_rebel_loss.py``: agreement check + timings + peak memory,
    one JSON line per result (for machines without pytest-benchmark)."""
    import json

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps({"agreement_fused_vs_materialised_chi2": _agreement(device)}), flush=True)
    reps = int(os.environ.get("DROREBEL_BENCH_REPS", "5"))
    only = os.environ.get("DROREBEL_BENCH_PROVIDERS")
    for s in _shapes():
        for provider in only.split(",") if only else PROVIDERS:
            try:
                x = make_inputs(s, device)
                step, setup = make_step(get_provider(provider, device), x, device)
                median = _time(step, setup, reps)
                if device.type == "cuda":
                    setup()  # free the previous gradients first: they count in the peak
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    step()
                    peak = torch.cuda.max_memory_allocated(device) - base
                else:
                    peak = -1
                row = {"shape": s.id, "provider": provider, "median_s": median,
                       "tokens_per_s": s.n / median, "peak_mem_mib": peak / 2**20,
                       "tflops": 6 * s.n * s.h * s.v / median / 1e12}
            except (Exception, pytest.skip.Exception) as exc:  # report, go on
                row = {"shape": s.id, "provider": provider, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(row), flush=True)
            x = step = setup = None
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
