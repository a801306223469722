"""Launchers of the ``linear_logps_wgrad`` kernels (Wasserstein hidden-state penalty).

    logp_t = z_t[y_t] − lse_t,   μ_t = Σ_v p_tv W_v,   q_t = ‖W_{y_t} − μ_t‖²,   z_t = W h_t / T

(docs/design.md §1 Wasserstein-REBEL, DRO-REBEL arXiv 2509.19104; derivation of the backward in
docs/wasserstein.md). No [N, V] tensor exists: everything of that size lives in tiles or in one
vocabulary chunk.

Forward, two schemes (``scheme``; ``"auto"``: flash when H ≤ ``FLASH_MAX_H``, else gemm):

* ``"flash"``: ONE online-softmax pass over the vocabulary computes logp, lse and μ (rescaled
  accumulator, ``linear_wgrad_fwd.wgrad_flash_fwd_kernel``). The accumulator of a program
  holds ``BLOCK_D`` columns of μ; with ``ceil(H / BLOCK_D)`` slices the logit tile is
  recomputed per slice, so this scheme is for heads with H ≤ 256 (one or two slices).
* ``"gemm"``: the same kernel without the accumulator (``ACC_MU=False``, vocabulary split
  across programs like ``linear_logps``' forward) gives (logp, lse); then per vocabulary
  chunk a Triton kernel writes ``P_c = exp(z − lse)`` and cuBLAS adds ``P_c @ W_c`` into an
  fp32 μ. Three passes over W (two would need μ's accumulator for all of H in registers,
  which does not fit at H = 4096).

Backward (always vocabulary chunks): per chunk ``wgrad_bwd_tiles_kernel`` forms ``h·W_v`` and
``d·W_v`` in one loop over H and writes ``G_c`` and ``m_c``; cuBLAS does ``dH += G_c W_c`` (fp32
accumulator) and ``dW_c = [G_c; m_c]ᵀ [H; D]``. GEMM count of forward + backward: 3 + 5 (flash:
1 + H/BLOCK_D + 5) against 4 for plain ``linear_logps``.

``DROREBEL_AUTOTUNE=0`` launches the first config that fits instead of autotuning; under
``TRITON_INTERPRET=1`` one small fixed config is used (``INTERPRET_CONFIG``).
"""

from __future__ import annotations

import os

import torch
import triton

from drorebel.kernels.accum import addmm_acc
from drorebel.kernels.common import (
    EVEN_K_HEURISTIC,
    autotune_enabled,
    check_launchable,
    device_smem_limit,
    dot_flags,
    interpreting,
    select_configs,
    smem_pruner,
)
from drorebel.kernels.common import tile_config as _cfg
from drorebel.kernels.linear_wgrad_bwd import wgrad_bwd_tiles_kernel
from drorebel.kernels.linear_wgrad_fwd import wgrad_flash_fwd_kernel, wgrad_probs_kernel

__all__ = ["FLASH_CONFIGS", "PROBS_CONFIGS", "BWD_TILES_CONFIGS", "FLASH_MAX_H",
           "INTERPRET_CONFIG", "configs_for", "smem_estimate", "linear_wgrad_forward",
           "linear_wgrad_backward", "wgrad_vocab_chunk"]

FLASH_MAX_H = 256


# 16-bit inputs use the tensor cores; fp32 the exact "ieee" dot (FMA), hence smaller tiles
FLASH_CONFIGS_16 = [_cfg(64, 64, 64, 4, 2, bd=128), _cfg(64, 128, 64, 8, 2, bd=128),
                    _cfg(128, 64, 64, 8, 2, bd=128), _cfg(64, 64, 64, 8, 2, bd=256)]
FLASH_CONFIGS_32 = [_cfg(32, 64, 32, 4, 2, bd=64), _cfg(64, 64, 32, 4, 2, bd=64)]
PROBS_CONFIGS_16 = [_cfg(128, 256, 64, 8, 3, 16), _cfg(128, 128, 64, 8, 3, 16),
                    _cfg(128, 128, 64, 4, 4, 16), _cfg(256, 128, 64, 8, 3, 8)]
PROBS_CONFIGS_32 = [_cfg(64, 64, 32, 4, 2, 16), _cfg(64, 128, 32, 8, 2, 16)]
BWD_TILES_CONFIGS_16 = [_cfg(128, 128, 64, 8, 3, 8), _cfg(64, 128, 64, 4, 3, 8),
                        _cfg(128, 64, 64, 4, 3, 8), _cfg(128, 128, 32, 8, 4, 8)]
BWD_TILES_CONFIGS_32 = [_cfg(64, 64, 32, 4, 2, 8), _cfg(32, 64, 32, 4, 2, 8)]
FLASH_CONFIGS = FLASH_CONFIGS_16 + FLASH_CONFIGS_32
PROBS_CONFIGS = PROBS_CONFIGS_16 + PROBS_CONFIGS_32
BWD_TILES_CONFIGS = BWD_TILES_CONFIGS_16 + BWD_TILES_CONFIGS_32
_BY_KERNEL = {"flash": (FLASH_CONFIGS_16, FLASH_CONFIGS_32),
              "probs": (PROBS_CONFIGS_16, PROBS_CONFIGS_32),
              "bwd_tiles": (BWD_TILES_CONFIGS_16, BWD_TILES_CONFIGS_32)}
# the CPU interpreter's config: BLOCK_D = 32 cuts small test heads into several μ slices
INTERPRET_CONFIG = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_K": 32, "BLOCK_D": 32, "GROUP_N": 2}


def smem_estimate(kernel: str, cfg: triton.Config, elt: int) -> int:
    """Upper estimate of a config's shared memory: the pipelined operand tiles (h, W; and d
    for "bwd_tiles"), plus for "flash" the W[tile, d-slice] operand and the P tile. Equal to
    the compiled kernels' usage for "probs"/"bwd_tiles" (tests/test_kernels_aot.py)."""
    k = cfg.kwargs
    bn, bv, bk = k["BLOCK_N"], k["BLOCK_V"], k["BLOCK_K"]
    rows = 2 * bn + bv if kernel == "bwd_tiles" else bn + bv
    tiles = cfg.num_stages * rows * bk * elt
    if kernel == "flash":
        tiles += (bv * k["BLOCK_D"] + bn * bv) * elt
    return tiles


def configs_for(kernel: str, dtype: torch.dtype, smem_limit: int | None = None
                ) -> list[triton.Config]:
    """Configs of ``kernel`` ("flash", "probs", "bwd_tiles") for ``dtype`` within
    ``smem_limit`` bytes of shared memory per block (None: all)."""
    return select_configs(_BY_KERNEL[kernel], smem_estimate, kernel, dtype, smem_limit)


_RAW = {"flash": wgrad_flash_fwd_kernel, "probs": wgrad_probs_kernel,
        "bwd_tiles": wgrad_bwd_tiles_kernel}
_HEUR = {k: triton.heuristics(EVEN_K_HEURISTIC)(fn) for k, fn in _RAW.items()}
# keyed by the head's H (one model, one head; N deliberately not a key) and, for "flash", by
# the mode (μ accumulator or lse-only pass over vocabulary splits)
_KEYS = {"flash": ["H", "ACC_MU"], "probs": ["H"], "bwd_tiles": ["H", "STORE_M"]}
_TUNED = {k: triton.autotune(_BY_KERNEL[k][0] + _BY_KERNEL[k][1], key=_KEYS[k],
                             prune_configs_by=smem_pruner(configs_for, k))(fn)
          for k, fn in _HEUR.items()}


def _num_splits(n: int, v: int, device: torch.device) -> int:
    """Vocabulary splits of the lse pass: about two programs per SM, ≥ 512 columns each."""
    if device.type != "cuda":
        return 1 if n > 64 else 3  # interpreter: small problems exercise the combine
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return int(max(1, min(64, triton.cdiv(v, 512), triton.cdiv(2 * sms, triton.cdiv(n, 64)))))


def _lse_pass(hidden, weight, labels, ignore_index, temperature, flags):
    """``(logp, lse)`` by the online-logsumexp kernel over S vocabulary splits + a merge:
    ``lse = M + log Σ_i s_i e^{m_i − M}`` (M = max_i m_i), ``logp = Σ_i z_label,i − lse``."""
    n, h = hidden.shape
    splits = _num_splits(n, weight.shape[0], hidden.device)
    part = torch.empty((3, splits, n), dtype=torch.float32, device=hidden.device)
    args = (hidden, weight, labels, part, part, part, part, n, weight.shape[0], h,
            hidden.stride(0), weight.stride(0), 1.0 / temperature, ignore_index)
    _launch("flash", lambda m: (splits, triton.cdiv(n, m["BLOCK_N"])), args,
            {**flags, "ACC_MU": False}, hidden.dtype, h)
    m, s, z_label = part.unbind(0)
    top = m.amax(dim=0)
    top = torch.where(torch.isfinite(top), top, 0.0)  # every split empty: an ignored token
    total = (s * torch.exp(m - top)).sum(dim=0)
    lse = torch.where(total > 0, top + torch.log(total), 0.0)
    logp = torch.where(labels != ignore_index, z_label.sum(dim=0) - lse, 0.0)
    return logp, lse


def _launch(kind: str, grid_fn, args: tuple, flags: dict, dtype: torch.dtype, h: int) -> None:
    """Interpreter config, autotuned configs, or (``DROREBEL_AUTOTUNE=0``) the first config."""
    if interpreting():
        names = {"flash": ("BLOCK_N", "BLOCK_V", "BLOCK_K", "BLOCK_D")}.get(
            kind, ("BLOCK_N", "BLOCK_V", "BLOCK_K", "GROUP_N"))
        meta = {k: INTERPRET_CONFIG[k] for k in names}
        meta["EVEN_K"] = h % meta["BLOCK_K"] == 0
        _RAW[kind][grid_fn(meta)](*args, **meta, **flags)
    elif autotune_enabled():
        _TUNED[kind][grid_fn](*args, **flags)
    else:
        cfg = configs_for(kind, dtype, device_smem_limit(args[0].device))[0]
        _HEUR[kind][grid_fn(cfg.kwargs)](*args, **cfg.all_kwargs(), **flags)


def wgrad_vocab_chunk(rows: int, v: int, elt: int, chunk_bytes: int | None = None) -> int:
    """Vocabulary rows per chunk: ``rows · V_c · elt ≤ chunk_bytes`` (default 256 MiB),
    a multiple of 256."""
    budget = chunk_bytes if chunk_bytes is not None else 256 * 2**20
    return min(v, max(256, (budget // max(1, rows * elt)) // 256 * 256))


def _d_from_mu(weight, labels, mu, ignore_index):
    """``d = W_y − μ`` (fp32 [N, H]; ignored tokens: W_0 − μ, never used)."""
    return weight[torch.where(labels != ignore_index, labels, 0)].float().sub_(mu)


def linear_wgrad_forward(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    temperature: float = 1.0, scheme: str = "auto", chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, q, lse, mu)`` fp32 for row-major ``hidden [N, H]``, ``weight [V, H]``
    (``mu [N, H]``); logp and q are 0 at ignored tokens, lse and μ unspecified there.
    ``scheme``: "auto", "flash" or "gemm" (module docstring)."""
    n, h = hidden.shape
    v = weight.shape[0]
    if scheme == "auto":
        scheme = os.environ.get("DROREBEL_WGRAD_FWD", "flash" if h <= FLASH_MAX_H else "gemm")
    if scheme not in ("flash", "gemm"):
        raise ValueError(f"scheme must be 'auto', 'flash' or 'gemm', got {scheme!r}")
    check_launchable(hidden, interpreting())
    f32 = dict(dtype=torch.float32, device=hidden.device)
    mu = torch.zeros((n, h), **f32)
    if n == 0:
        e = torch.zeros(0, **f32)
        return e, e.clone(), e.clone(), mu
    flags = dot_flags(hidden.dtype, interpreting())
    if scheme == "flash":
        logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)
        args = (hidden, weight, labels, logp, lse, mu, mu, n, v, h, hidden.stride(0),
                weight.stride(0), 1.0 / temperature, ignore_index)
        grid = lambda m: (triton.cdiv(h, m["BLOCK_D"]), triton.cdiv(n, m["BLOCK_N"]))  # noqa: E731
        _launch("flash", grid, args, {**flags, "ACC_MU": True}, hidden.dtype, h)
    else:
        logp, lse = _lse_pass(hidden, weight, labels, ignore_index, temperature, flags)
        vc = wgrad_vocab_chunk(n, v, hidden.element_size(), chunk_bytes)
        buf = torch.empty((n, vc), dtype=hidden.dtype, device=hidden.device)
        mass = torch.zeros(n, **f32)
        for v0 in range(0, v, vc):
            v1 = min(v, v0 + vc)
            args = (hidden, weight, labels, lse, buf, n, h, v0, v1, hidden.stride(0),
                    weight.stride(0), buf.stride(0), 1.0 / temperature, ignore_index)
            grid = lambda m, w=v1 - v0: (  # noqa: E731
                triton.cdiv(n, m["BLOCK_N"]) * triton.cdiv(w, m["BLOCK_V"]),)
            _launch("probs", grid, args, flags, hidden.dtype, h)
            addmm_acc(mu, buf[:, : v1 - v0], weight[v0:v1])
            mass += buf[:, : v1 - v0].sum(1, dtype=torch.float32)
        # self-normalise like the flash scheme: Σ_v P_v differs from 1 by the rounding of
        # z − lse (two passes) and of P, and q = ‖W_y − μ‖² amplifies that for large logits
        mu.div_(torch.where(mass > 0, mass, 1.0).unsqueeze(1))
    d = _d_from_mu(weight, labels, mu, ignore_index)
    q = torch.where(labels != ignore_index, d.square_().sum(1), 0.0)
    return logp, q, lse, mu


def linear_wgrad_backward(
    grad_logp: torch.Tensor, grad_q: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
    labels: torch.Tensor, lse: torch.Tensor, mu: torch.Tensor, ignore_index: int = -100,
    temperature: float = 1.0, need_dh: bool = True, need_dw: bool = True,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dH, dW)`` in the input dtype for upstream ``grad_logp, grad_q [N]`` (None where not
    needed); formulas in ``linear_wgrad_bwd``."""
    check_launchable(hidden, interpreting())
    n, h = hidden.shape
    v = weight.shape[0]
    dt = hidden.dtype
    valid = labels != ignore_index
    gs = torch.where(valid, grad_logp.float(), 0.0).div_(temperature).contiguous()
    gqs = torch.where(valid, grad_q.float(), 0.0).mul_(2.0 / temperature).contiguous()
    # d in the input dtype (the kernel's dot operand); μ·d with that same rounded d
    d_lp = _d_from_mu(weight, labels, mu, ignore_index).to(dt)
    md = (mu * d_lp).sum(1)
    dh = torch.zeros((n, h), dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    if n == 0 or not (need_dh or need_dw):
        return (dh.to(dt) if need_dh else None), (dw.zero_() if need_dw else None)
    hd = None
    if need_dw:  # [H; D], D_t = 2 g_q d_t: dW_c = [G_c; m_c]ᵀ [H; D] is ONE GEMM over 2N rows
        hd = torch.empty((2 * n, h), dtype=dt, device=hidden.device)
        hd[:n].copy_(hidden)
        torch.mul(d_lp, (gqs * temperature).unsqueeze(1), out=hd[n:])
    rows = 2 * n if need_dw else n  # m_c (bottom half) only feeds dW
    vc = wgrad_vocab_chunk(rows, v, hidden.element_size(), chunk_bytes)
    buf = torch.empty((rows, vc), dtype=dt, device=hidden.device)
    flags = {**dot_flags(dt, interpreting()), "STORE_M": need_dw}
    for v0 in range(0, v, vc):
        v1 = min(v, v0 + vc)
        args = (hidden, weight, labels, lse, d_lp, md, gs, gqs, buf, buf[rows - n:], n, h, v0, v1,
                hidden.stride(0), weight.stride(0), buf.stride(0), 1.0 / temperature)
        grid = lambda m, w=v1 - v0: (  # noqa: E731
            triton.cdiv(n, m["BLOCK_N"]) * triton.cdiv(w, m["BLOCK_V"]),)
        _launch("bwd_tiles", grid, args, flags, dt, h)
        chunk = buf[:, : v1 - v0]
        if need_dw:
            torch.mm(chunk.t(), hd, out=dw[v0:v1])
        if need_dh:
            addmm_acc(dh, chunk[:n], weight[v0:v1])
    return (dh.to(dt) if need_dh else None), dw
