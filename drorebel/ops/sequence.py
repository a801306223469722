"""Per-token values -> per-sequence sums: ``log π(y|x) = Σ_t log π(y_t | x, y_<t)``.

The sequence log-prob of REBEL (arXiv 2404.16767) and DRO-REBEL (arXiv 2509.19104) sums
the per-token log-probs over the response tokens only (docs/design.md §1). Layouts:

* padded: ``[B, T]`` -> ``[B]``, summing where ``labels != ignore_index``;
* packed: ``[total]`` with ``cu_seqlens [S+1]`` (sequence i is
  ``cu_seqlens[i]:cu_seqlens[i+1]``) -> ``[S]``, one ``index_add`` (no Python loop);
* explicit (fused entry point only): ``seq_ids`` per token in ``[-1, S)`` (-1: no sequence).

``sequence_logps`` sums per-token values that already exist; ``linear_sequence_logps`` goes
straight from hidden states and the LM head to the ``[S]`` sums: on CUDA the Triton forward
adds each token's log-prob into its sequence in the kernel epilogue (the per-token log-probs
are never written unless ``return_token_logps``) and the backward kernels read each token's
upstream gradient ``g[seq_t]`` from the ``[S]`` gradient (custom ops
``drorebel::sequence_logps_fwd``/``_bwd`` in ``drorebel.ops.linear_logps``; on the CPU the
chunked twin sums each chunk with ``index_add_`` in token order: deterministic).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from drorebel.ops._autocast import call_head_under_autocast
from drorebel.ops.common import check_softmax_cache, validate_inputs
from drorebel.ops.linear_logps import sequence_logps_op
from drorebel.ops.materialized import materialized_token_logps

__all__ = ["sequence_logps", "linear_sequence_logps", "sequence_logps_fused"]


def _masked(token_logps: Tensor, labels: Tensor | None, ignore_index: int) -> Tensor:
    if labels is None:
        return token_logps
    if labels.shape != token_logps.shape:
        raise ValueError(f"labels: expected shape {tuple(token_logps.shape)}, "
                         f"got {tuple(labels.shape)}")
    # where (not a product) so that a non-finite value at a masked position cannot leak
    return torch.where(labels != ignore_index, token_logps, torch.zeros_like(token_logps))


def _check_cu_seqlens(cu_seqlens: Tensor, device: torch.device) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected a 1-D [S+1] tensor, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens: dtype must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens: device {cu_seqlens.device} != the values' {device}")


def _segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """Sequence index of each packed position; positions outside [cu[0], cu[S]) get S."""
    num_seqs = cu_seqlens.numel() - 1
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    seg = torch.searchsorted(cu_seqlens, positions, right=True) - 1
    outside = (seg < 0) | (seg >= num_seqs)
    return torch.where(outside, torch.full_like(seg, num_seqs), seg).long()


def sequence_logps(
    token_logps: Tensor,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Sum per-token log-probs per sequence: ``out_i = Σ_{t in seq i, y_t != ignore} logp_t``.

    Args:
        token_logps: [B, T] (padded) or [total] (packed, with ``cu_seqlens``) values.
        labels: optional ids of the same shape; positions equal to ``ignore_index`` add 0.
        ignore_index: masked label value.
        cu_seqlens: int32/int64 [S+1] non-decreasing offsets of packed sequences; positions
            outside ``[cu_seqlens[0], cu_seqlens[-1])`` belong to no sequence.

    Returns:
        [B] (padded) or [S] (packed) sums, differentiable w.r.t. ``token_logps``.
    """
    values = _masked(token_logps, labels, ignore_index)
    if cu_seqlens is None:
        if values.dim() < 1:
            raise ValueError("token_logps: expected [B, T] (or [T]), got a scalar")
        return values.sum(dim=-1)
    _check_cu_seqlens(cu_seqlens, values.device)
    flat = values.reshape(-1)
    num_seqs = cu_seqlens.numel() - 1
    seg = _segment_ids(cu_seqlens, flat.numel())
    out = flat.new_zeros(num_seqs + 1).index_add(0, seg, flat)
    return out[:num_seqs]


def _explicit_ids(seq_ids: Tensor, labels: Tensor, num_seqs: int | None) -> Tensor:
    if not isinstance(seq_ids, Tensor) or seq_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seq_ids: expected an int32/int64 tensor, got "
                        f"{getattr(seq_ids, 'dtype', type(seq_ids).__name__)}")
    if tuple(seq_ids.shape) != tuple(labels.shape) or seq_ids.device != labels.device:
        raise ValueError(f"seq_ids: expected shape {tuple(labels.shape)} on {labels.device} "
                         f"(labels'), got {tuple(seq_ids.shape)} on {seq_ids.device}")
    if isinstance(num_seqs, bool) or not isinstance(num_seqs, int) or num_seqs < 0:
        raise ValueError(f"num_seqs: an int >= 0 is required with seq_ids, got {num_seqs!r}")
    too_big = seq_ids >= num_seqs
    if seq_ids.is_cuda:  # an out-of-range id would be an out-of-bounds atomic: check on device
        torch._assert_async(~too_big.any(), "seq_ids: values must be < num_seqs")
    elif bool(too_big.any()):
        raise ValueError(f"seq_ids: values must be < num_seqs={num_seqs} (negative = no "
                         f"sequence), found {int(seq_ids.max())}")
    return seq_ids.reshape(-1).to(torch.int32)


def _flat_seq_ids(labels: Tensor, cu_seqlens: Tensor | None, seq_ids: Tensor | None,
                  num_seqs: int | None) -> tuple[Tensor, int, tuple[int, ...]]:
    """(int32 sequence id per flat token, -1 = none; number of sequences; output shape)."""
    if seq_ids is not None:
        if cu_seqlens is not None:
            raise ValueError("seq_ids, cu_seqlens: pass at most one of them")
        ids = _explicit_ids(seq_ids, labels, num_seqs)
        return ids, num_seqs, (num_seqs,)
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, labels.device)
        count = cu_seqlens.numel() - 1
        if num_seqs is not None and num_seqs != count:
            raise ValueError(f"num_seqs: {num_seqs} != len(cu_seqlens) - 1 = {count}")
        seg = _segment_ids(cu_seqlens, labels.numel())
        ids = torch.where(seg < count, seg, torch.full_like(seg, -1)).to(torch.int32)
        return ids, count, (count,)
    if labels.dim() < 1:
        raise ValueError("labels: expected [B, T] (padded) or [T]; got a scalar")
    shape = tuple(labels.shape[:-1])
    count = math.prod(shape)
    if num_seqs is not None and num_seqs != count:
        raise ValueError(f"num_seqs: {num_seqs} != the {count} rows of labels")
    rows = torch.arange(count, dtype=torch.int32, device=labels.device)
    return rows.repeat_interleave(labels.shape[-1]), count, shape


def linear_sequence_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    cu_seqlens: Tensor | None = None,
    seq_ids: Tensor | None = None,
    num_seqs: int | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    impl: str = "auto",
    return_token_logps: bool = False,
    softmax_cache: int | str = 0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-sequence ``log π(y|x) = Σ_t log softmax(W h_t / T)[y_t]`` straight from hidden states.

    Formula: REBEL (arXiv 2404.16767) / DRO-REBEL (arXiv 2509.19104), docs/design.md §1; the sum
    runs over response tokens (``y_t != ignore_index``). Neither the [N, V] logits nor (on
    CUDA, unless ``return_token_logps``) the [N] per-token log-probs are written: the Triton
    forward adds each token's log-prob into its sequence in the kernel epilogue (fp32 atomics;
    one atomic per token block when the block lies in one sequence), and the backward kernels
    read each token's gradient ``g[seq_t]`` from the [S] upstream gradient.

    Under ``torch.autocast`` the head runs in the autocast dtype, as the model's ``lm_head``
    (``F.linear``) would: ``hidden`` and ``weight`` are cast to it and the op runs with autocast
    off (:func:`drorebel.ops._autocast.call_head_under_autocast`).

    Determinism: on CUDA the order of the fp32 atomic adds depends on scheduling, so repeated
    runs can differ in the last bits of each sum (~1 ulp per token added); the CPU path
    (chunked ``index_add`` in token order) and the interpreter are deterministic.

    Layouts (the sequence of each token):
        padded (default): ``labels [B, T]``, ``hidden [B, T, H]`` -> ``[B]`` (row b is one
            sequence; any leading shape works: the output has ``labels.shape[:-1]``);
        packed: ``cu_seqlens [S+1]`` (sequence i = positions ``cu[i]:cu[i+1]`` of the
            flattened tokens; others belong to none) -> ``[S]``;
        explicit: ``seq_ids`` (labels' shape, ints in ``[-1, num_seqs)``, -1 = none) and
            ``num_seqs`` -> ``[num_seqs]``; e.g. the a- and b-responses of B pairs in one call
            with ids ``0..B-1`` and ``B..2B-1``.

    Args:
        hidden: [..., H] with labels' shape before H; weight: LM head [V, H]; same dtype
            (bf16, fp16, fp32; float64 with the chunked or materialised path).
        labels: int64/int32 ids in [0, V) or ``ignore_index``.
        temperature, ignore_index, impl: as for ``linear_logps`` (``impl="materialized"``:
            full logits, the baseline).
        return_token_logps: also return the per-token log-probs (labels' shape; 0 where
            ignored or outside every sequence). If their gradient is used, the backward builds
            one per-token gradient (g_t + g[seq_t]) and runs the per-token kernels.
        softmax_cache: byte budget (int, 0 = none) or ``"auto"`` of the softmax cache, as for
            ``linear_logps``: the backward of the cached tokens skips the logit recompute.

    Returns:
        fp32 sums (float64 for float64 inputs), differentiable in ``hidden`` and ``weight``;
        ``(sums, token_logps)`` with ``return_token_logps``.
    """
    return call_head_under_autocast(
        _sequence_logps, hidden=hidden, weight=weight, labels=labels, cu_seqlens=cu_seqlens,
        seq_ids=seq_ids, num_seqs=num_seqs, ignore_index=ignore_index, temperature=temperature,
        impl=impl, return_token_logps=return_token_logps, softmax_cache=softmax_cache)


def _sequence_logps(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, cu_seqlens: Tensor | None,
    seq_ids: Tensor | None, num_seqs: int | None, ignore_index: int, temperature: float,
    impl: str, return_token_logps: bool, softmax_cache: int | str = 0,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`linear_sequence_logps` without the autocast handling."""
    validate_inputs(hidden, weight, labels, ignore_index, temperature, impl)
    check_softmax_cache(softmax_cache)
    ids, count, shape = _flat_seq_ids(labels, cu_seqlens, seq_ids, num_seqs)
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if impl == "materialized":
        tok = materialized_token_logps(flat_h, weight, flat_y, ignore_index=ignore_index,
                                       temperature=temperature)
        inside = ids >= 0
        tok = torch.where(inside, tok, torch.zeros_like(tok))
        sums = tok.new_zeros(count).index_add(0, ids.clamp_min(0).long(), tok)
        out: Tensor | tuple[Tensor, Tensor] = (sums, tok) if return_token_logps else sums
    else:
        out = sequence_logps_op(flat_h, weight, flat_y, ids, count, ignore_index, temperature,
                                impl, return_token_logps, softmax_cache)
    if return_token_logps:
        return out[0].view(shape), out[1].view(labels.shape)
    return out.view(shape)


def sequence_logps_fused(weight: Tensor, hidden: Tensor, labels: Tensor, **kw
                         ) -> Tensor | tuple[Tensor, Tensor]:
    """Deprecated 0.1 name and order of ``linear_sequence_logps(hidden, weight, labels, ...)``
    (same keywords; no autocast handling, as in 0.1); removed in 0.3."""
    warnings.warn("sequence_logps_fused(weight, hidden, labels) is deprecated; use "
                  "drorebel.linear_sequence_logps(hidden, weight, labels). It is removed in 0.3.",
                  DeprecationWarning, stacklevel=2)
    opts = {"cu_seqlens": None, "seq_ids": None, "num_seqs": None, "ignore_index": -100,
            "temperature": 1.0, "impl": "auto", "return_token_logps": False, **kw}
    return _sequence_logps(hidden, weight, labels, **opts)
