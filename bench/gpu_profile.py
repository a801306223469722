"""Where the time of one ``linear_logps`` forward + backward goes, by kernel category.

One warm-up call (Triton compilation and autotuning), then one profiled forward + backward
under ``torch.profiler`` at the reference shape (N=16384, H=4096, V=128256, bf16, the
Llama-3-8B head; REBEL arXiv 2404.16767 log-probs). Device time of every kernel is summed into

* ``triton_forward``   the Triton forward kernel(s) (``linear_logps_fwd_kernel``, combine)
* ``triton_backward``  the Triton backward kernel(s) (``linear_logps_bwd_kernel``,
                       ``linear_logps_grad_logits_kernel``)
* ``gemm``             cuBLAS / CUTLASS matrix products (e.g. the GEMM backward's dH, dW)
* ``other``            everything else (elementwise, reductions, copies, memset)

and written to ``profile.json`` (ms, % and kernel names per category) with a small table on
stdout. Without CUDA (``--small``) it profiles ``impl="torch"`` at a tiny shape on the CPU
(CPU operator self time in place of device time): a dry run of the script itself.

    python bench/gpu_profile.py --out-dir gpu_out            # CUDA
    python bench/gpu_profile.py --small --out-dir /tmp/prof   # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

CATEGORIES = ("triton_forward", "triton_backward", "gemm", "other")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_GEMM = re.compile(r"gemm|cublas|cutlass|xmma|nvjet|matmul|^aten::(mm|addmm_?|bmm|baddbmm|linear)$",
                   re.IGNORECASE)


def category(name: str) -> str:
    """The category of a kernel (or, on the CPU, an operator) name."""
    low = name.lower()
    if "linear_logps" in low or "wgrad" in low:
        if "bwd" in low or "grad_logits" in low or "backward" in low:
            return "triton_backward"
        if "fwd" in low or "combine" in low or "forward" in low:
            return "triton_forward"
    if _GEMM.search(name):
        return "gemm"
    return "other"


def _events(prof, cuda: bool) -> list[tuple[str, float]]:
    """(name, self time in µs) of every kernel (CUDA) or leaf CPU operator (CPU)."""
    out = []
    for evt in prof.key_averages():
        if cuda:
            us = getattr(evt, "self_device_time_total", None)
            if us is None:  # older torch
                us = getattr(evt, "self_cuda_time_total", 0.0)
            # kernels: device-side events (operators also carry their kernels' time)
            kind = getattr(evt, "device_type", None)
            kernel = (kind == torch.autograd.DeviceType.CUDA if kind is not None
                      else evt.self_cpu_time_total == 0)
            if us > 0 and kernel:
                out.append((evt.key, float(us)))
        elif evt.self_cpu_time_total > 0 and evt.key.startswith("aten::"):
            out.append((evt.key, float(evt.self_cpu_time_total)))
    return out


def summarise(events: list[tuple[str, float]]) -> dict:
    total = sum(us for _, us in events)
    cats = {c: {"ms": 0.0, "pct": 0.0, "kernels": {}} for c in CATEGORIES}
    for name, us in events:
        c = cats[category(name)]
        c["ms"] += us / 1e3
        c["kernels"][name] = c["kernels"].get(name, 0.0) + us / 1e3
    for c in cats.values():
        c["pct"] = 100.0 * c["ms"] * 1e3 / total if total else 0.0
        c["kernels"] = dict(sorted(c["kernels"].items(), key=lambda kv: -kv[1]))
    return {"total_ms": total / 1e3, "categories": cats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shape, CPU dry run")
    parser.add_argument("--shape", default=None, help="N,H,V,dtype (default: the reference "
                        "shape 16384,4096,128256,bf16; --small: 512,64,1000,fp32)")
    parser.add_argument("--impl", default=None, help="default triton on CUDA, torch otherwise")
    parser.add_argument("--out-dir", default=".", help="where profile.json goes")
    args = parser.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from drorebel.ops.linear_logps import linear_logps

    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    shape = args.shape or ("512,64,1000,fp32" if args.small else "16384,4096,128256,bf16")
    n, h, v, dt = shape.split(",")
    n, h, v, dtype = int(n), int(h), int(v), DTYPES[dt]
    impl = args.impl or ("triton" if cuda else "torch")
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, generator=gen, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, device=device) * h**-0.5).to(dtype)
    weight.requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    grad = torch.randn(n, generator=gen, device=device)

    def step():
        hidden.grad = weight.grad = None
        linear_logps(hidden, weight, labels, impl=impl).backward(grad)

    step()  # warm-up: compilation, autotuning, allocator
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    report = {"shape": {"n": n, "h": h, "v": v, "dtype": dt}, "impl": impl,
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "time": "device kernel time" if cuda else "CPU operator self time",
              "torch": torch.__version__, **summarise(_events(prof, cuda))}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(report, indent=2))
    print(f"linear_logps fwd+bwd {shape} impl={impl} on {report['device']}: "
          f"{report['total_ms']:.2f} ms ({report['time']})")
    print(f"{'category':<16} {'ms':>9} {'%':>6}  kernels")
    for name, c in report["categories"].items():
        kernels = ", ".join(list(c["kernels"])[:4]) + (" ..." if len(c["kernels"]) > 4 else "")
        print(f"{name:<16} {c['ms']:>9.3f} {c['pct']:>6.1f}  {kernels}")
    print(f"-> {out / 'profile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
