"""Launchers of the fused linear log-prob kernels (docs/design.md §1-§3; REBEL arXiv 2404.16767).

    logp_t = z_t[y_t] - logsumexp(z_t),      z_t = W h_t / T
    dH = G @ W,   dW = G^T @ h,              G = (onehot(y) - softmax(z)) * g / T

Forward (``linear_logps_forward``): one Triton kernel, online logsumexp over vocabulary
tiles (``linear_logps_fwd.py``); only ``lse`` (fp32, one per token) is saved for the
backward. The vocabulary is split across ``S`` programs per token block. ``S`` is chosen so
that (a) the grid fills the GPU when N is small and (b) the hidden rows of the token blocks
in flight fit in about a third of L2 (the programs in flight are then S splits x a few token
blocks: W is read about ``N·H·elt / (L2/3)`` times from HBM instead of each program
re-streaming its hidden rows from HBM for every W tile). The S partial triples
(max, rescaled sum, label logit) are merged by a small Triton kernel over [3, S, N].

Backward (``linear_logps_backward``), two exact schemes, neither with an N x V buffer:

* ``"gemm"`` (default): the vocabulary is cut into chunks of ``V_c`` rows (``N·V_c`` elements
  of the input dtype within ``chunk_bytes``). For each chunk a Triton kernel recomputes the
  logits (one pass over W_c), writes ``G_c`` (input dtype, like a materialised backward), and
  two cuBLAS GEMMs finish: ``dW[c] = G_c^T @ h`` (complete: its reduction is over tokens)
  and ``dH += G_c @ W_c`` into an fp32 accumulator (``addmm`` with ``out_dtype=float32``).
  Passes over W: 3 (recompute, dH, dW); extra memory: one chunk plus an fp32 [N, H].
* ``"atomic"`` (Cut-Cross-Entropy): one kernel over (token block, vocab block) tiles that
  recomputes a G tile and ``atomic_add``s ``G @ W_tile`` and ``G^T @ h_tile`` into fp32 dH
  and dW. Passes over W: 2; atomic traffic ``4·H·(N·ceil(V/BLOCK_V) + V·ceil(N/BLOCK_N))``
  bytes, e.g. ~540 GB at N=16384, H=4096, V=128256 with 128x128 tiles, which is why it is
  not the default (L2 atomics are far slower than tensor cores), plus fp32 [V, H] memory.

Per-sequence mode (``sequence_logps_forward``/``_backward``, behind
``drorebel.ops.sequence.linear_sequence_logps``): with an int32 sequence id per token the
forward's epilogue (the one-split kernel, or the combine kernel after a vocabulary split) adds
each token's log-prob into an fp32 ``[num_seqs]`` output with ``tl.atomic_add`` (one atomic per
token block when the block lies in one sequence, else one per token), and writes the per-token
log-probs only when asked. The backward kernels take the ``[num_seqs]`` upstream gradient and
read ``g[seq_t]`` per token in registers, so the only [N] tensors are ``lse`` (saved by the
forward, needed by any recompute backward) and the int32 ids. fp32 atomics make the sums depend
on the order blocks finish in (last-bit differences between runs on a GPU).

Softmax cache (``probs [R, V]`` of the launchers, ``softmax_cache=`` of the ops): the forward
kernel (``CACHE_P``) also stores the first R rows' ``exp(z - m_tile)`` and tile maxima, and
:func:`~drorebel.kernels.softmax_cache.rescale_cache` turns them into probabilities once
``lse`` is known. The ``"gemm"`` backward then fills each chunk's ``G_c`` rows below R from the
cache (one elementwise torch pass) and launches the recompute kernel for rows ``>= R`` only:
the chunk still feeds the same two GEMMs, so cached rows cost 3 GEMM passes instead of 4.

Environment knobs: ``DROREBEL_BWD_SCHEME=atomic`` selects the CCE backward;
``DROREBEL_AUTOTUNE=0`` launches the first config that fits instead of autotuning (tests).

``tl.dot`` precision: fp32 inputs use ``input_precision="ieee"`` (exact fp32, no TF32);
bf16/fp16 use the tensor cores with fp32 accumulation. Under ``TRITON_INTERPRET=1`` (CPU)
one small fixed config is used, and bf16 dot operands are upcast to fp32 (``UPCAST_DOT``)
because the interpreter's bf16 ``tl.dot`` is wrong.
"""

from __future__ import annotations

import math
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
    smem_pruner,
)
from drorebel.kernels.linear_logps_bwd import (
    linear_logps_bwd_kernel,
    linear_logps_grad_logits_kernel,
)
from drorebel.kernels.linear_logps_configs import (
    BWD_CONFIGS,
    COMBINE_CONFIGS,
    FWD_CONFIGS,
    GRAD_LOGITS_CONFIGS,
    INTERPRET_CONFIG,
    configs_for,
    smem_estimate,
)
from drorebel.kernels.linear_logps_fwd import (
    linear_logps_combine_kernel,
    linear_logps_fwd_kernel,
)
from drorebel.kernels.softmax_cache import CACHE_GRANULE, cached_grad_logits, rescale_cache

__all__ = [
    "COMBINE_CONFIGS",
    "FWD_CONFIGS",
    "BWD_CONFIGS",
    "GRAD_LOGITS_CONFIGS",
    "INTERPRET_CONFIG",
    "configs_for",
    "linear_logps_forward",
    "linear_logps_backward",
    "num_vocab_splits",
    "sequence_logps_backward",
    "sequence_logps_forward",
    "smem_estimate",
    "vocab_chunk",
]


_fwd_heuristic = triton.heuristics(EVEN_K_HEURISTIC)(linear_logps_fwd_kernel)
_grad_logits_heuristic = triton.heuristics(EVEN_K_HEURISTIC)(linear_logps_grad_logits_kernel)
_bwd_heuristic = triton.heuristics(EVEN_K_HEURISTIC)(linear_logps_bwd_kernel)
# exact (H, V) values are the buckets: a model has one head, and N is deliberately not a key
_fwd_tuned = triton.autotune(
    FWD_CONFIGS, key=["H", "V", "SPLIT_V"], prune_configs_by=smem_pruner(configs_for, "fwd"),
    reset_to_zero=["seqsum_ptr"],  # the epilogue's atomics must not add up over benchmark runs
)(_fwd_heuristic)
_grad_logits_tuned = triton.autotune(
    GRAD_LOGITS_CONFIGS, key=["H"], prune_configs_by=smem_pruner(configs_for, "grad_logits")
)(_grad_logits_heuristic)
_bwd_tuned = triton.autotune(
    BWD_CONFIGS, key=["H", "V"], prune_configs_by=smem_pruner(configs_for, "bwd"),
    reset_to_zero=["dh_ptr", "dw_ptr"],
)(_bwd_heuristic)


_KERNELS = {
    "fwd": (linear_logps_fwd_kernel, _fwd_heuristic, _fwd_tuned),
    "grad_logits": (linear_logps_grad_logits_kernel, _grad_logits_heuristic,
                    _grad_logits_tuned),
    "bwd": (linear_logps_bwd_kernel, _bwd_heuristic, _bwd_tuned),
}


def _interp_meta(h: int, group: bool) -> dict:
    meta = {k: v for k, v in INTERPRET_CONFIG.items() if group or k != "GROUP_N"}
    meta["EVEN_K"] = h % meta["BLOCK_K"] == 0
    return meta


def _launch(kind: str, grid_fn, args: tuple, flags: dict, dtype: torch.dtype, h: int) -> None:
    """Launch kernel ``kind`` with ``grid_fn(meta)``: interpreter config, autotuned configs, or
    (``DROREBEL_AUTOTUNE=0``) the first config of the list without benchmarking."""
    raw, heuristic, tuned = _KERNELS[kind]
    if interpreting():
        meta = _interp_meta(h, group=kind != "fwd")
        raw[grid_fn(meta)](*args, **meta, **flags)
    elif autotune_enabled():
        tuned[grid_fn](*args, **flags)
    else:
        cfg = configs_for(kind, dtype, device_smem_limit(args[0].device))[0]
        heuristic[grid_fn(cfg.kwargs)](*args, **cfg.all_kwargs(), **flags)


def num_vocab_splits(n: int, h: int, v: int, elt: int, device: torch.device) -> int:
    """Vocabulary splits S of the forward grid (see the module docstring)."""
    if device.type != "cuda":
        return 1 if n > 64 else 2  # interpreter: exercise both paths on small shapes
    props = torch.cuda.get_device_properties(device)
    n_sm = props.multi_processor_count
    l2 = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
    nominal_block = 128
    token_blocks = max(1, math.ceil(n / nominal_block))
    rows_in_l2 = max(nominal_block, (l2 // 3) // max(1, h * elt))
    blocks_in_flight = max(1, rows_in_l2 // nominal_block)
    splits = max(math.ceil(n_sm / token_blocks), math.ceil(n_sm / blocks_in_flight))
    if token_blocks >= 4 * n_sm and blocks_in_flight >= token_blocks:
        splits = 1
    return int(max(1, min(splits, math.ceil(v / 512), 64)))


def _cache_args(probs, n, v, dev):
    """(cache, tile max, rows, strides) kernel arguments of the softmax cache (placeholders
    without one)."""
    if probs is None or probs.shape[0] == 0:
        one = torch.empty(1, dtype=torch.float32, device=dev)
        return (one, one, 0, 0, 0), None
    r = probs.shape[0]
    assert r <= n and probs.shape[1] == v and probs.stride(1) == 1
    # token blocks whose labels are all ignored skip the vocabulary loop and write nothing:
    # zeros there keep their (never used: g = 0) gradient rows finite
    probs.zero_()
    tmax = torch.zeros((r, triton.cdiv(v, CACHE_GRANULE)), dtype=torch.float32, device=dev)
    return (probs, tmax, r, probs.stride(0), tmax.stride(0)), tmax


def _forward(hidden, weight, labels, seq, num_seqs, ignore_index, temperature, num_splits,
             store_logp, probs=None):
    """(logp or empty, lse, seq sums or empty); ``seq`` None: per-token mode; ``probs [R, V]``
    (optional): filled with the softmax of the first R rows."""
    check_launchable(hidden, interpreting())
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    seq_sum = seq is not None
    # unused pointer arguments get 1-element placeholders (never a null pointer)
    logp = torch.empty(n if store_logp else 1, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    seqsum = torch.zeros(max(1, num_seqs if seq_sum else 0), dtype=torch.float32, device=dev)
    seq, _ = _seq_args(seq, dev)
    outputs = (logp if store_logp else logp[:0], lse, seqsum[:num_seqs] if seq_sum else seqsum[:0])
    if n == 0:
        return outputs
    splits = num_splits or num_vocab_splits(n, h, v, hidden.element_size(), dev)
    part = torch.empty((3, splits, n) if splits > 1 else (1,), dtype=torch.float32, device=dev)
    (cache, tmax, rows, stride_cn, stride_tn), tile_max = _cache_args(probs, n, v, dev)
    args = (hidden, weight, labels, logp, lse, part, seq, seqsum, cache, tmax, n, v, h,
            hidden.stride(0), weight.stride(0), 1.0 / temperature, ignore_index, rows,
            stride_cn, stride_tn)
    flags = {"SPLIT_V": splits > 1, "SEQ_SUM": seq_sum, "STORE_LOGP": store_logp,
             "CACHE_P": tile_max is not None, **dot_flags(hidden.dtype, interpreting())}
    _launch("fwd", lambda m: (splits, triton.cdiv(n, m["BLOCK_N"])), args, flags, hidden.dtype, h)
    if splits > 1:
        # merge the splits' (max, sum, label logit) and run the same epilogue (one pass over N)
        cfg = {"BLOCK_N": 64} if interpreting() else COMBINE_CONFIGS[0].all_kwargs()
        linear_logps_combine_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            part, labels, logp, lse, seq, seqsum, n, splits, splits * n, ignore_index,
            SEQ_SUM=seq_sum, STORE_LOGP=store_logp, **cfg)
    if tile_max is not None:  # exp(z - m_tile) -> exp(z - lse), now that lse is known
        rescale_cache(probs, tile_max, lse)
    return outputs


def linear_logps_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    num_splits: int | None = None,
    probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(logp, lse)`` in fp32 for contiguous ``hidden [N,H]``, ``weight [V,H]``.

    ``logp = z[y] - lse`` (0 where ``labels == ignore_index``), ``lse = logsumexp(z)``,
    ``z = weight @ h / temperature``; no [N, V] tensor is allocated. ``probs [R, V]``
    (optional softmax cache, bf16 or fp32, R <= N) receives ``softmax(z)`` of the first R rows
    (rows of fully ignored token blocks hold zeros).
    """
    logp, lse, _ = _forward(hidden, weight, labels, None, 0, ignore_index, temperature,
                            num_splits, True, probs)
    return logp, lse


def sequence_logps_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    ignore_index: int = -100,
    temperature: float = 1.0,
    num_splits: int | None = None,
    store_logp: bool = False,
    probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(seq_logps [num_seqs], lse [N], logp [N] or [0])`` in fp32.

    ``seq_logps[s] = Σ_{t: seq_ids[t] = s, y_t != ignore} logp_t`` is accumulated in the
    kernel's epilogue with fp32 atomics (``seq_ids`` int32 [N] in ``[-1, num_seqs)``, -1 = no
    sequence); ``logp`` is written only with ``store_logp``. On a GPU the atomics make the
    fp32 sums depend on the order in which blocks finish (run-to-run differences of a few ulp
    of the sum); the interpreter and the chunked CPU path are deterministic. ``probs``: the
    softmax cache, as for :func:`linear_logps_forward`.
    """
    logp, lse, seqsum = _forward(hidden, weight, labels, seq_ids, num_seqs, ignore_index,
                                 temperature, num_splits, store_logp, probs)
    return seqsum, lse, logp


def _masked_grad(grad, labels, ignore_index) -> torch.Tensor:
    return torch.where(labels != ignore_index, grad.float(), 0.0).contiguous()


def _backward(g, seq, hidden, weight, labels, lse, ignore_index, temperature, need_dh, need_dw,
              scheme, chunk_bytes, probs=None):
    check_launchable(hidden, interpreting())
    if scheme == "auto":
        scheme = os.environ.get("DROREBEL_BWD_SCHEME", "gemm")
    ctx = (hidden, weight, labels, lse, g, seq, ignore_index, temperature)
    if scheme not in ("atomic", "gemm"):
        raise ValueError(f"scheme must be 'auto', 'gemm' or 'atomic', got {scheme!r}")
    cached = probs is not None and probs.shape[0] > 0
    if scheme == "atomic" and not cached:
        dh, dw = _backward_atomic(*ctx)
    else:  # "gemm"; a softmax cache always takes this scheme
        dh, dw = _backward_gemm(*ctx, need_dh, need_dw, chunk_bytes, probs if cached else None)
    return (dh if need_dh else None), (dw if need_dw else None)


def linear_logps_backward(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    need_dh: bool = True,
    need_dw: bool = True,
    scheme: str = "auto",
    chunk_bytes: int | None = None,
    probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dH, dW)`` in the input dtype for upstream ``grad [N]`` (None where not needed).

    ``scheme``: "gemm" (Triton logit-gradient chunks + cuBLAS GEMMs, the default), or
    "atomic" (one Cut-Cross-Entropy-style kernel with fp32 atomics); see the module docstring.
    ``probs [R, V]``: the forward's softmax cache; its rows skip the logit recompute (always
    with the "gemm" scheme).
    """
    g = _masked_grad(grad, labels, ignore_index)
    return _backward(g, None, hidden, weight, labels, lse, ignore_index, temperature, need_dh,
                     need_dw, scheme, chunk_bytes, probs)


def sequence_logps_backward(
    grad_seq: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    need_dh: bool = True,
    need_dw: bool = True,
    scheme: str = "auto",
    chunk_bytes: int | None = None,
    probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dH, dW)`` for an upstream gradient per SEQUENCE ``grad_seq [num_seqs]``.

    Each token's gradient ``grad_seq[seq_ids[t]]`` is read inside the logit-gradient kernels
    (no [N] gradient tensor); otherwise identical to ``linear_logps_backward``.
    """
    g = grad_seq.float().contiguous()
    if g.numel() == 0:  # no sequences: every token has seq id -1 and reads nothing
        g = g.new_zeros(1)
    return _backward(g, seq_ids, hidden, weight, labels, lse, ignore_index, temperature,
                     need_dh, need_dw, scheme, chunk_bytes, probs)


def _seq_args(seq, device):
    if seq is None:  # a 1-element placeholder: the kernels never read it
        return torch.zeros(1, dtype=torch.int32, device=device), False
    return seq, True


def _backward_atomic(hidden, weight, labels, lse, g, seq, ignore_index, temperature):
    n, h = hidden.shape
    v = weight.shape[0]
    seq, seq_grad = _seq_args(seq, hidden.device)
    dh = torch.zeros((n, h), dtype=torch.float32, device=hidden.device)
    dw = torch.zeros((v, h), dtype=torch.float32, device=hidden.device)
    args = (hidden, weight, labels, lse, g, seq, dh, dw, n, v, h, hidden.stride(0),
            weight.stride(0), 1.0 / temperature, ignore_index)
    grid = lambda m: (triton.cdiv(n, m["BLOCK_N"]) * triton.cdiv(v, m["BLOCK_V"]),)
    flags = {"SEQ_GRAD": seq_grad, **dot_flags(hidden.dtype, interpreting())}
    _launch("bwd", grid, args, flags, hidden.dtype, h)
    return dh.to(hidden.dtype), dw.to(weight.dtype)


def vocab_chunk(n: int, v: int, elt: int, chunk_bytes: int | None = None) -> int:
    """Rows of the vocabulary per backward chunk: N·V_c·elt <= chunk_bytes, multiple of 256."""
    budget = chunk_bytes if chunk_bytes is not None else 256 * 2**20
    rows = max(256, (budget // max(1, n * elt)) // 256 * 256)
    return min(v, rows)


def _cached_scale(g, seq, labels, r, ignore_index, temperature):
    """``g_t / T`` of the first ``r`` tokens (0 where ignored), as the kernels compute it;
    ``seq`` given: ``g`` is per sequence and token t reads ``g[seq_t]``."""
    if seq is None:
        g_tok = g[:r]
    else:
        ids = seq[:r]
        take = (ids >= 0) & (labels[:r] != ignore_index)
        g_tok = torch.where(take, g[ids.clamp_min(0).long()], 0.0)
    return g_tok * (1.0 / temperature)


def _backward_gemm(hidden, weight, labels, lse, g, seq, ignore_index, temperature, need_dh,
                   need_dw, chunk_bytes, probs=None):
    n, h = hidden.shape
    v = weight.shape[0]
    r = 0 if probs is None else probs.shape[0]  # softmax-cached rows: no logit recompute
    scale_r = _cached_scale(g, seq, labels, r, ignore_index, temperature) if r else None
    seq_rows = seq
    seq, seq_grad = _seq_args(seq, hidden.device)
    fp32 = hidden.dtype == torch.float32
    dh = torch.zeros((n, h), dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    vc = vocab_chunk(n, v, hidden.element_size(), chunk_bytes)
    buf = torch.empty((n, vc), dtype=hidden.dtype, device=hidden.device)
    flags = {"SEQ_GRAD": seq_grad, **dot_flags(hidden.dtype, interpreting())}
    # the recomputed rows [r, N): row views of the inputs (per-token gradient sliced too)
    rest = (hidden[r:], weight, labels[r:], lse[r:], g if seq_grad else g[r:],
            seq_rows[r:] if seq_grad else seq)
    for v0 in range(0, v, vc):
        v1 = min(v, v0 + vc)
        g_logits = buf[:, : v1 - v0]
        if r:
            cached_grad_logits(g_logits[:r], probs, labels[:r], scale_r, v0=v0)
        if r < n:
            args = (*rest, g_logits[r:], n - r, h, v0, v1, hidden.stride(0), weight.stride(0),
                    buf.stride(0), 1.0 / temperature, ignore_index)
            grid = lambda m, w=v1 - v0: (triton.cdiv(n - r, m["BLOCK_N"])
                                         * triton.cdiv(w, m["BLOCK_V"]),)
            _launch("grad_logits", grid, args, flags, hidden.dtype, h)
        # one logit-gradient chunk (cached or recomputed) feeds both GEMMs
        if need_dw:
            torch.mm(g_logits.t(), hidden, out=dw[v0:v1])
        if need_dh:
            addmm_acc(dh, g_logits, weight[v0:v1])
    if need_dh and not fp32:
        dh = dh.to(hidden.dtype)
    return dh, dw
