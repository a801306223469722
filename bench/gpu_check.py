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

Two more kinds of case check the other Triton kernels with the same criterion:

* ``sequence``: ``linear_sequence_logps(impl="triton")`` (per-sequence sums from the forward
  epilogue, the [S] gradient read in the backward) vs float64 per-sequence sums of the truth
  above (upstream g = the sequence's gradient on each of its tokens), yardstick
  ``linear_logps_reference`` summed per sequence; tensors sums, dH, dW.
* ``wasserstein``: ``linear_logps_wgrad(impl="triton")`` (logp and q = ‖W_y − E_p[W]‖² per
  token, fused forward/backward) vs the float64 materialised (logp, q) with autograd, and the
  fused loss ``fused_linear_wasserstein_rebel_loss(impl="triton")`` vs the float64 double
  backward oracle ``drorebel.reference.wasserstein.wasserstein_rebel_objective``; yardstick:
  the same materialised computations in the inputs' dtype.

``--only linear,sequence,wasserstein`` runs a subset. Every case runs even when an earlier one
fails or raises (errors are recorded); the exit status is 0 only when all cases pass.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
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


@dataclass(frozen=True)
class SeqCase:
    """A per-sequence (``sequence``) or Wasserstein penalty (``wasserstein``) case: B
    sequences of T tokens (``wasserstein``: B/2 pairs, responses a and b)."""

    kind: str
    b: int
    t: int
    h: int
    v: int
    dtype: str
    temperature: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.kind}-B{self.b}xT{self.t}-H{self.h}-V{self.v}-{self.dtype}" \
               f"-T{self.temperature:g}"


# N = 4096 tokens in sequences of 512 (the Wasserstein bench shape), a 32k vocabulary
FULL_EXTRA = [
    SeqCase("sequence", 8, 512, 4096, 32000, "bf16"),
    SeqCase("wasserstein", 8, 512, 4096, 32000, "bf16"),
]
SMALL_EXTRA = [
    SeqCase("sequence", 3, 37, 48, 1003, "bf16", temperature=0.7),
    SeqCase("wasserstein", 4, 9, 40, 301, "fp32", temperature=0.7),
]
KINDS = ("linear", "sequence", "wasserstein")


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


def compare(ours, ref, truth, dtype: torch.dtype, tolerances,
            names: tuple[str, ...] = ("out", "dH", "dW")) -> dict[str, dict]:
    """Per tensor (default out, dH, dW): max errors of ours and of the reference, the
    criterion's worst excess over its bound (<= 0 passes) and the verdict."""
    result = {}
    for name, o, r, t in zip(names, ours, ref, truth):
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


def _triton_or_torch(device: torch.device) -> str:
    """The Triton path where it can run (CUDA, or the CPU interpreter), else the torch twin."""
    return "triton" if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" \
        else "torch"


def _record(name: str, fields: dict, impl: str, run_ours, ref, truth, names, dtype,
            device: torch.device) -> dict:
    """One record: run ``run_ours()`` (tracked time and peak memory), compare to the truth."""
    memory = _load(REPO / "bench" / "memory.py", "drorebel_bench_memory")
    tolerances = _load(REPO / "tests" / "tolerances.py", "drorebel_tests_tolerances")
    rec = {"case": name, **fields, "impl": impl}
    try:
        start = time.perf_counter()
        with memory.track_peak_memory(device) as mem:
            ours = run_ours()
        rec["seconds_first_call"] = time.perf_counter() - start
        rec["peak_mem_bytes"] = mem.peak_bytes
        rec["tensors"] = compare(ours, ref, truth, dtype, tolerances, names)
        rec["pass"] = all(t["pass"] for t in rec["tensors"].values())
        del ours
    except Exception as exc:  # record and go on
        rec["pass"] = False
        rec["exception"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc(limit=8)
    _free(device)
    _print(rec)
    return rec


def check_sequence(case: SeqCase, device: torch.device) -> list[dict]:
    """``linear_sequence_logps`` (padded [B, T] layout) vs float64 per-sequence sums."""
    from drorebel.ops.sequence import linear_sequence_logps
    from drorebel.reference.logps import linear_logps_reference

    b, t, temp = case.b, case.t, case.temperature
    inp = make_inputs(Case(b * t, case.h, case.v, case.dtype, temp), device)
    labels = inp["labels"]
    labels.view(b, t)[:, : min(8, t)] = IGNORE  # a prompt in every sequence
    gseq = torch.randn(b, generator=torch.Generator(device=device).manual_seed(1), device=device)
    inp["grad"] = gseq.repeat_interleave(t)  # each token gets its sequence's gradient
    tok, d_hidden, d_weight = truth_float64(inp, temp)
    truth = (tok.view(b, t).sum(-1), d_hidden, d_weight)

    def run(fn):
        h = inp["hidden"].detach().clone().requires_grad_()
        w = inp["weight"].detach().clone().requires_grad_()
        out = fn(h, w)
        out.backward(gseq.to(out.dtype))
        return out.detach(), h.grad, w.grad

    def reference(h, w):
        tok = linear_logps_reference(h, w, labels, ignore_index=IGNORE, temperature=temp)
        return tok.view(b, t).sum(-1)

    impl = _triton_or_torch(device)

    def ours(h, w):
        return linear_sequence_logps(h.view(b, t, -1), w, labels.view(b, t), temperature=temp,
                                     ignore_index=IGNORE, impl=impl)

    ref = run(reference)
    _free(device)
    return [_record(case.name, asdict(case), impl, lambda: run(ours), ref, truth,
                    ("sums", "dH", "dW"), DTYPES[case.dtype], device)]


def check_wasserstein(case: SeqCase, device: torch.device) -> list[dict]:
    """The fused penalty op ``linear_logps_wgrad`` (logp, q, dH, dW) and the fused Wasserstein
    loss (value, dW, dHa, dHb), each vs float64 and the same-dtype materialised yardstick."""
    from drorebel.losses.rebel import rebel_residuals
    from drorebel.losses.wasserstein import fused_linear_wasserstein_rebel_loss
    from drorebel.ops.linear_wgrad import linear_logps_wgrad
    from drorebel.reference.wasserstein import (
        linear_logps_wgrad_reference,
        wasserstein_rebel_objective,
    )

    b, t, temp, dtype = case.b, case.t, case.temperature, DTYPES[case.dtype]
    inp = make_inputs(Case(b * t, case.h, case.v, case.dtype, temp), device)
    hidden, weight, labels, g1 = inp["hidden"], inp["weight"], inp["labels"], inp["grad"]
    gen = torch.Generator(device=device).manual_seed(2)
    g2 = torch.randn(b * t, generator=gen, device=device)
    impl = _triton_or_torch(device)
    records = []

    def run_op(fn, h, w):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        lp, q = fn(h, w, labels)
        loss = (lp * g1.to(lp.dtype)).sum() + (q * g2.to(q.dtype)).sum()
        return (lp.detach(), q.detach(), *torch.autograd.grad(loss, (h, w)))

    mat = lambda h, w, y: linear_logps_wgrad_reference(h, w, y, temp)  # noqa: E731
    truth = run_op(mat, hidden.double(), weight.double())
    ref = run_op(mat, hidden, weight)
    _free(device)
    fused = lambda h, w, y: linear_logps_wgrad(h, w, y, ignore_index=IGNORE,  # noqa: E731
                                               temperature=temp, impl=impl)
    records.append(_record(f"{case.name}-op", asdict(case), impl,
                           lambda: run_op(fused, hidden, weight), ref, truth,
                           ("logp", "q", "dH", "dW"), dtype, device))
    del truth, ref
    _free(device)

    # the loss: B/2 pairs, responses a = the first B/2 sequences, b = the rest
    pairs, rho, eta = b // 2, 0.5, 1.0
    ya, yb = labels[: pairs * t].view(pairs, t), labels[pairs * t : 2 * pairs * t].view(pairs, t)
    per = [torch.randn(pairs, generator=gen, device=device, dtype=torch.float64)
           for _ in range(4)]

    def split(x):
        return x[: pairs * t].view(pairs, t, -1), x[pairs * t : 2 * pairs * t].view(pairs, t, -1)

    def run_loss(fn, h, w):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        ha, hb = split(h)
        val = fn(ha, hb, w)
        d_w, d_h = torch.autograd.grad(val, (w, h))
        da, db = split(d_h)
        return val.detach().reshape(1), d_w, da, db

    def oracle(ha, hb, w):
        lp = [linear_logps_wgrad_reference(x.reshape(-1, x.shape[-1]), w, y.reshape(-1), temp)[0]
              .view(pairs, t).sum(-1) for x, y in ((ha, ya), (hb, yb))]
        resid = rebel_residuals(*lp, *(p.to(lp[0].dtype) if lp[0].dtype == torch.float64
                                       else p.float() for p in per), eta)
        return wasserstein_rebel_objective(resid * resid, [ha, hb], rho)

    def ours(ha, hb, w):
        return fused_linear_wasserstein_rebel_loss(
            ha, hb, w, ya, yb, *(p.float() for p in per), eta=eta, rho=rho, temperature=temp,
            ignore_index=IGNORE, impl=impl).loss

    truth = run_loss(oracle, hidden.double(), weight.double())
    ref = run_loss(oracle, hidden, weight)
    _free(device)
    records.append(_record(f"{case.name}-loss", asdict(case), impl,
                           lambda: run_loss(ours, hidden, weight), ref, truth,
                           ("value", "dW", "dHa", "dHb"), dtype, device))
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
    parser.add_argument("--only", default=",".join(KINDS),
                        help=f"comma list of case kinds to run, of {','.join(KINDS)} (default all)")
    args = parser.parse_args(argv)
    kinds = args.only.split(",")
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"--only: unknown kind(s) {sorted(unknown)}; choose from {KINDS}")
    device = torch.device(args.device)
    default = "triton,torch,triton+cache,torch+cache" if device.type == "cuda" else "torch"
    impls = (args.impls or default).split(",")
    cases = [c for c in (SMALL_CASES if args.small else FULL_CASES) if "linear" in kinds]
    cases += [c for c in (SMALL_EXTRA if args.small else FULL_EXTRA) if c.kind in kinds]
    checks = {"sequence": check_sequence, "wasserstein": check_wasserstein}
    report = {"environment": environment(device), "tolerances": tolerance_table(), "cases": []}
    print(f"gpu_check on {report['environment']} impls={impls}", flush=True)
    out = Path(args.out)
    for case in cases:
        _write(out, report)  # after every case: a timeout still leaves the finished ones
        try:
            if isinstance(case, SeqCase):
                report["cases"] += checks[case.kind](case, device)
            else:
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
