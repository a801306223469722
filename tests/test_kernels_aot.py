"""Ahead-of-time compilation of every Triton kernel x config for sm_80 and sm_90 (no GPU).

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the whole CUDA
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) on the CPU, which catches most
GPU-only failures (layouts, shared-memory overflow, unsupported ops). Pointer and size
arguments carry the 16-divisibility hints the JIT gives aligned tensors and H % 16 == 0,
so the loads are pipelined exactly as on the GPU and the shared memory reported is the real
one. The JIT objects are InterpretedFunctions under TRITON_INTERPRET=1, so the compilation
runs in one subprocess (this file as a script) without that variable.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

# max shared memory per block: H100 (sm_90) 227 KB, A100 (sm_80) 163 KB
SMEM_LIMIT = {90: 232448, 80: 166912}
_PTR_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_INT_ARGS = {"N", "V", "H", "stride_hn", "stride_wv", "stride_gn", "ignore_index", "v_start",
             "v_stop", "stride_pn", "stride_on", "S", "stride_part", "cache_rows", "stride_cn",
             "stride_tn"}
# ints the JIT sees as multiples of 16
_ALIGNED = {"H", "stride_hn", "stride_wv", "stride_gn", "stride_pn", "stride_on"}
# pointers in the input dtype (the others are fp32, labels int64)
_INPUT_DTYPE_PTRS = {"hidden_ptr", "weight_ptr", "glogits_ptr", "probs_ptr", "d_ptr",
                     "g_out_ptr", "m_out_ptr"}
# kind -> (module under drorebel.kernels, kernel); "wgrad_*": linear_logps_wgrad's kernels
KERNELS = {"fwd": ("linear_logps_fwd", "linear_logps_fwd_kernel"),
           "grad_logits": ("linear_logps_bwd", "linear_logps_grad_logits_kernel"),
           "bwd": ("linear_logps_bwd", "linear_logps_bwd_kernel"),
           "combine": ("linear_logps_fwd", "linear_logps_combine_kernel"),
           "wgrad_flash": ("linear_wgrad_fwd", "wgrad_flash_fwd_kernel"),
           "wgrad_probs": ("linear_wgrad_fwd", "wgrad_probs_kernel"),
           "wgrad_bwd_tiles": ("linear_wgrad_bwd", "wgrad_bwd_tiles_kernel")}


def _signature(kernel, dtype_name: str, aligned: bool):
    """(signature, attrs) for ``kernel``: input pointers in the dtype, the rest fp32/i64."""
    elt = _PTR_TYPES[dtype_name]
    typed = {**{name: elt for name in _INPUT_DTYPE_PTRS}, "labels_ptr": "i64", "seq_ptr": "i32",
             # the softmax cache: bf16 for bf16 inputs, fp32 otherwise
             "cache_ptr": "bf16" if dtype_name == "bfloat16" else "fp32"}
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if kernel.params[i].is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + typed.get(name, "fp32")
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _INT_ARGS:
            sig[name] = "i32"
            if aligned and name in _ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    return sig, attrs


def _launcher(kind: str):
    from drorebel.kernels import linear_logps, linear_wgrad

    return (linear_wgrad, kind[len("wgrad_"):]) if kind.startswith("wgrad_") else \
        (linear_logps, kind)


def _variants(kind: str) -> list[dict]:
    # per-token outputs, then the per-sequence epilogue / per-sequence gradient variants, and
    # the forward with the softmax cache (CACHE_P) in both modes
    plain = dict(SEQ_SUM=False, STORE_LOGP=True, CACHE_P=False)
    seq = dict(SEQ_SUM=True, STORE_LOGP=False, CACHE_P=False)
    if kind == "fwd":
        return [dict(SPLIT_V=True, **plain), dict(SPLIT_V=False, **plain),
                dict(SPLIT_V=False, **seq), dict(SPLIT_V=True, **{**plain, "CACHE_P": True}),
                dict(SPLIT_V=False, **{**seq, "CACHE_P": True})]
    if kind == "combine":
        return [plain, seq]
    if kind in ("grad_logits", "bwd"):
        return [dict(SEQ_GRAD=False), dict(SEQ_GRAD=True)]
    if kind == "wgrad_bwd_tiles":
        return [dict(STORE_M=True), dict(STORE_M=False)]
    if kind == "wgrad_flash":
        return [dict(ACC_MU=True), dict(ACC_MU=False)]
    return [{}]


def _jobs():
    import torch

    for cc in SMEM_LIMIT:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for kind, (_, kname) in KERNELS.items():
                launch, name = _launcher(kind)
                for i, cfg in enumerate(launch.configs_for(name, dtype, SMEM_LIMIT[cc])):
                    variants = _variants(kind)
                    for j, extra in enumerate(variants if i == 0 else variants[:1]):
                        aligned = not (i == 0 and j == 0 and dtype == torch.bfloat16)
                        yield dict(cc=cc, dtype=str(dtype).split(".")[1], kind=kind, kernel=kname,
                                   kwargs=dict(cfg.kwargs), warps=cfg.num_warps,
                                   stages=cfg.num_stages, extra=extra, aligned=aligned)


def _compile(job):
    import triton
    from triton.backends.compiler import GPUTarget

    module = importlib.import_module(f"drorebel.kernels.{KERNELS[job['kind']][0]}")
    kernel = getattr(module, job["kernel"])
    sig, attrs = _signature(kernel, job["dtype"], job["aligned"])
    fp32 = job["dtype"] == "float32"
    constexprs = {**job["kwargs"], **job["extra"], "UPCAST_DOT": False,
                  "DOT_PRECISION": "ieee" if fp32 else "tf32"}
    constexprs["EVEN_K"] = job["aligned"]
    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    try:
        out = triton.compile(src, target=GPUTarget("cuda", job["cc"], 32),
                             options={"num_warps": job["warps"], "num_stages": job["stages"]})
        launch, name = _launcher(job["kind"])
        cfg = triton.Config(job["kwargs"], num_warps=job["warps"], num_stages=job["stages"])
        elt = {"float32": 4}.get(job["dtype"], 2)
        return {**job, "ok": True, "shared": out.metadata.shared,
                "estimate": launch.smem_estimate(name, cfg, elt),
                "wgmma": "wgmma" in out.asm["ptx"], "cp_async": "cp.async" in out.asm["ptx"]}
    except Exception as exc:  # report every failure, not only the first
        return {**job, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}


def main() -> None:
    jobs = list(_jobs())
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(_compile, jobs))
    print(json.dumps(results))


@pytest.fixture(scope="module")
def aot_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ptxas_is_shipped():
    """Triton brings its own ptxas (the AOT compile needs it, no CUDA toolkit required)."""
    from triton.backends.nvidia import compiler

    path = os.path.join(os.path.dirname(compiler.__file__), "bin", "ptxas")
    assert os.path.exists(path), f"ptxas not found at {path}"
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "cuda compilation tools" in version.stdout.lower()


def test_every_kernel_and_config_compiles(aot_results):
    failed = [f"{r['kernel']} sm_{r['cc']} {r['dtype']} {r['kwargs']} {r['extra']}: {r['error']}"
              for r in aot_results if not r["ok"]]
    assert not failed, "\n".join(failed)
    kinds = {(r["kind"], r["cc"], r["dtype"]) for r in aot_results}
    assert len(kinds) == len(KERNELS) * 2 * 3  # kernels x 2 targets x 3 dtypes


def test_shared_memory_fits(aot_results):
    over = [f"{r['kernel']} sm_{r['cc']} {r['dtype']} {r['kwargs']} stages={r['stages']}: "
            f"{r['shared']} B > {SMEM_LIMIT[r['cc']]}"
            for r in aot_results if r["ok"] and r["shared"] > SMEM_LIMIT[r["cc"]]]
    assert not over, "\n".join(over)
    # the estimate the autotuner prunes with is an upper bound of the real usage
    under = [r for r in aot_results if r["ok"] and r["shared"] > r["estimate"]]
    assert not under, under


def test_aligned_16bit_kernels_use_hopper_paths(aot_results):
    """sm_90 bf16/fp16: tensor-core wgmma; all aligned kernels: pipelined cp.async loads
    (except "combine", an elementwise pass without a GEMM)."""
    for r in aot_results:
        gemm = r["kind"] != "combine"
        if r["ok"] and r["aligned"] and r["cc"] == 90 and r["dtype"] != "float32" and gemm:
            assert r["wgmma"], r
        if r["ok"] and r["aligned"] and r["kind"] != "bwd" and gemm:
            assert r["cp_async"], r


if __name__ == "__main__":
    main()
