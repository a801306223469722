"""Correctness of the fused kernels at real shapes, against a float64 ground truth.

For ``linear_logps`` (docs/design.md §1, REBEL arXiv 2404.16767)

    logp_t = z_t[y_t] - logsumexp(z_t),   z_t = W h_t / T
    dL/dh_t = g_t/T · (W[y_t] - Σ_v p_tv W[v]),   dL/dW = Σ_t g_t/T · (e_{y_t} - p_t) h_tᵀ

with p_t = softmax(z_t) and an arbitrary upstream gradient g (masked tokens: logp = 0, no
gradient). The truth is computed in float64, in token chunks, without autograd (the
materialised float64 reference of the unit tests would need N·V·8 bytes = 17 GB at the
reference shape). Each implementation (``impl="triton"`` and ``impl="torch"``) is held to
the criterion of the unit tests (docs/design.md §3, tests/tolerances.py), elementwise, for the
output and for dH and dW:

    |impl - truth| <= |reference(same dtype) - truth| + rtol·|truth| + atol·max|truth|

where the reference is ``linear_logps_reference`` (materialised logits) run in the
input dtype: the error PyTorch itself makes in that dtype is the yardstick. An impl named
``<impl>+cache`` runs ``<impl>`` with a softmax cache of about half the rows
(``softmax_cache=``), so that the cached and the recomputed backward both run.

    python bench/gpu_check.py --out gpu_check.json           # CUDA, real shapes
    python bench/gpu_check.py --small --out /tmp/check.json   # CPU-sized dry run

Every case runs even when an earlier one fails or raises (errors are recorded); the exit
status is 0 only when all cases pass.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

IGNORE = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """One correctness case: shape, dtype, temperature and fraction of ignored labels."""

    n: int
    h: int
    v: int
    dtype: str
    temperature: float = 1.0
    masked: float = 0.1

    @property
    def name(self) -> str:
        return f"N{self.n}-H{self.h}-V{self.v}-{self.dtype}-T{self.temperature:g}"


# real shapes: the Llama-3-8B head (reference shape), an odd N with T != 1, fp32 moderate
FULL_CASES = [
    Case(16384, 4096, 128256, "bf16"),
    Case(4099, 4096, 128256, "bf16", temperature=0.7),
    Case(2048, 1024, 32003, "fp32"),
    Case(1000, 2048, 50257, "fp32", temperature=1.3, masked=0.5),
]
SMALL_CASES = [
    Case(67, 48, 1003, "bf16"),
    Case(130, 64, 517, "fp32", temperature=0.7),
    Case(33, 40, 2001, "fp32", masked=0.5),
]


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hidden (N,H), head (V,H) with O(1) logits, labels with ``masked`` ignored, grad g."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    hidden = torch.randn(case.n, case.h, generator=gen, device=device).to(dtype)
    weight = (torch.randn(case.v, case.h, generator=gen, device=device) * case.h**-0.5).to(dtype)
    labels = torch.randint(0, case.v, (case.n,), generator=gen, device=device)
    drop = torch.rand(case.n, generator=gen, device=device) < case.masked
    labels[drop] = IGNORE
    labels[0] = IGNORE  # always at least one fully masked row
    grad = torch.randn(case.n, generator=gen, device=device)
    return {"hidden": hidden, "weight": weight, "labels": labels, "grad": grad}


def truth_float64(inp: dict[str, torch.Tensor], temperature: float, chunk: int = 2048):
    """Float64 logp (N), dH (N,H), dW (V,H) by the closed form above, chunked over tokens."""
    w64 = inp["weight"].double()
    labels, grad = inp["labels"], inp["grad"].double()
    n = labels.shape[0]
    logp = torch.zeros(n, dtype=torch.float64, device=labels.device)
    d_hidden = torch.zeros(inp["hidden"].shape, dtype=torch.float64, device=labels.device)
    d_weight = torch.zeros_like(w64)
    for s in range(0, n, chunk):
        h = inp["hidden"][s : s + chunk].double()
        y, valid = labels[s : s + chunk], labels[s : s + chunk] != IGNORE
        safe_y = torch.where(valid, y, 0)
        z = (h @ w64.T) / temperature
        lse = torch.logsumexp(z, dim=-1)
        logp[s : s + chunk] = torch.where(valid, z.gather(1, safe_y[:, None])[:, 0] - lse, 0.0)
        dz = torch.exp(z - lse[:, None]).neg_()  # -p
        dz[torch.arange(len(y), device=y.device), safe_y] += 1.0  # e_y - p
        dz *= (torch.where(valid, grad[s : s + chunk], 0.0) / temperature)[:, None]
        d_hidden[s : s + chunk] = dz @ w64
        d_weight += dz.T @ h
        del z, dz
    return logp, d_hidden, d_weight


def run_impl(fn, inp: dict[str, torch.Tensor], temperature: float):
    """Forward + backward(g) of ``fn(hidden, weight, labels, ...)``: (logp, dH, dW)."""
    h = inp["hidden"].detach().clone().requires_grad_()
    w = inp["weight"].detach().clone().requires_grad_()
    out = fn(h, w, inp["labels"], ignore_index=IGNORE, temperature=temperature)
    out.backward(inp["grad"])
    return out.detach(), h.grad, w.grad


def _load(path: Path, name: str):
    """Import a file of the repository that is not in a package (bench/, tests/)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def max_err(value: torch.Tensor, truth: torch.Tensor) -> float:
    """max |value - truth| in float64; inf when NaN/inf appear."""
    if value.numel() == 0:
        return 0.0
    err = (value.double() - truth).abs().max().item()
    return err if err == err else float("inf")


def compare(ours, ref, truth, dtype: torch.dtype, tolerances) -> dict[str, dict]:
    """Per tensor (out, dH, dW): max errors of ours and of the reference, the criterion's
    worst excess over its bound (<= 0 passes) and the verdict."""
    result = {}
    for name, o, r, t in zip(("out", "dH", "dW"), ours, ref, truth):
        ok, excess = tolerances.within(o, r, t, dtype)
        result[name] = {
            "err": max_err(o, t),
            "ref_err": max_err(r, t),
            "excess": excess,
            "max_truth": t.abs().max().item(),
            "pass": ok,
        }
    return result


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _impl_fn(impl: str):
    from drorebel.kernels.softmax_cache import cache_dtype
    from drorebel.ops.linear_logps import linear_logps

    base, _, extra = impl.partition("+")

    def fn(h, w, y, **kw):
        if extra == "cache":  # the softmax of the first N/2 + 1 rows is cached
            elt = torch.empty((), dtype=cache_dtype(h.dtype)).element_size()
            kw["softmax_cache"] = (h.shape[0] // 2 + 1) * w.shape[0] * elt
        return linear_logps(h, w, y, impl=base, **kw)

    return fn


def check_case(case: Case, impls: list[str], device: torch.device) -> list[dict]:
    """All records of one case: one per impl, with the reference's errors as yardstick."""
    from drorebel.reference.logps import linear_logps_reference

    memory = _load(REPO / "bench" / "memory.py", "drorebel_bench_memory")
    tolerances = _load(REPO / "tests" / "tolerances.py", "drorebel_tests_tolerances")
    dtype = DTYPES[case.dtype]
    inp = make_inputs(case, device)
    truth = truth_float64(inp, case.temperature)
    ref = run_impl(linear_logps_reference, inp, case.temperature)
    _free(device)
    records = []
    for impl in impls:
        rec = {"case": case.name, **asdict(case), "impl": impl}
        try:
            start = time.perf_counter()
            with memory.track_peak_memory(device) as mem:
                ours = run_impl(_impl_fn(impl), inp, case.temperature)
            rec["seconds_first_call"] = time.perf_counter() - start
            rec["peak_mem_bytes"] = mem.peak_bytes
            rec["tensors"] = compare(ours, ref, truth, dtype, tolerances)
            rec["pass"] = all(t["pass"] for t in rec["tensors"].values())
            del ours
        except Exception as exc:  # record and go on: one broken case must not hide the rest
            rec["pass"] = False
            rec["exception"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc(limit=8)
        _free(device)
        records.append(rec)
        _print(rec)
    return records


def _print(rec: dict) -> None:
    status = "PASS" if rec["pass"] else "FAIL"
    if "tensors" in rec:
        detail = "  ".join(
            f"{k}: {t['err']:.2e} (ref {t['ref_err']:.2e}, excess {t['excess']:+.1e})"
            for k, t in rec["tensors"].items()
        )
    else:
        detail = rec.get("exception", "")
    print(f"[{status}] {rec['case']:<30} {rec['impl']:<6} {detail}", flush=True)


def tolerance_table() -> dict[str, dict[str, float]]:
    """tests/tolerances.py's TOL, JSON-friendly."""
    tolerances = _load(REPO / "tests" / "tolerances.py", "drorebel_tests_tolerances")
    return {str(k): {"rtol": v.rtol, "atol": v.atol} for k, v in tolerances.TOL.items()}


def _write(path: Path, report: dict) -> None:
    report.setdefault("all_pass", False)  # final value set when every case has run
    path.write_text(json.dumps(report, indent=2))


def environment(device: torch.device) -> dict[str, str]:
    env = {"device": device.type, "torch": torch.__version__}
    env["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        env["triton"] = "n/a"
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU dry run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impls", help="comma list; default triton,torch,triton+cache,torch+cache "
                        "torch on CPU (+cache: a softmax cache of half the rows)")
    parser.add_argument("--out", default="gpu_check.json", help="JSON report path")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    default = "triton,torch,triton+cache,torch+cache" if device.type == "cuda" else "torch"
    impls = (args.impls or default).split(",")
    cases = SMALL_CASES if args.small else FULL_CASES
    report = {"environment": environment(device), "tolerances": tolerance_table(), "cases": []}
    print(f"gpu_check on {report['environment']} impls={impls}", flush=True)
    out = Path(args.out)
    for case in cases:
        _write(out, report)  # after every case: a timeout still leaves the finished ones
        try:
            report["cases"] += check_case(case, impls, device)
        except Exception as exc:  # truth / reference failed (e.g. out of memory)
            report["cases"].append(
                {"case": case.name, "pass": False, "exception": f"{type(exc).__name__}: {exc}"}
            )
            print(f"[FAIL] {case.name}: {type(exc).__name__}: {exc}", flush=True)
            _free(device)
    report["all_pass"] = bool(report["cases"]) and all(c["pass"] for c in report["cases"])
    _write(out, report)
    print(f"all_pass={report['all_pass']} -> {args.out}", flush=True)
    return 0 if report["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
