"""What the fused losses share: input checks, the log-prob dispatch, the ``[a; b]`` layout.

Argument order, everywhere in drorebel: ``hidden, weight, labels`` first (as
``linear_logps(hidden, weight, labels)`` and ``F.linear(input, weight)``), then the
per-sequence tensors; a pair function lists each role for ``a`` then ``b``
(``hidden_a, hidden_b, weight, labels_a, labels_b, ref_logps_a, ref_logps_b, rewards_a,
rewards_b``). Modules take the two responses stacked along the batch as ``[a; b]``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from drorebel.losses.options import IMPLS, check_choice
from drorebel.ops.sequence import linear_sequence_logps

__all__ = ["check_eta", "check_fused_inputs", "pair_logps",
           "reference_logps", "split_stacked", "legacy_pair_order", "legacy_module_order",
           "SeqSpec", "token_counts", "average_logps"]

# (hidden name, hidden [B, T, H], labels name, labels [B, T])
SeqSpec = tuple[str, Tensor, str, Tensor]


def check_eta(eta: float) -> float:
    """``eta`` as a float; a ``ValueError`` unless it is a finite number > 0."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 < eta < float("inf"):
        raise ValueError(f"eta must be a finite number > 0, got {eta!r}")
    return float(eta)


def legacy_pair_order(args: tuple, name: str) -> tuple:
    """Accept the 0.1 positional order ``(weight, hidden_a, labels_a, hidden_b, labels_b, …)``
    for one release: reorder it to ``(hidden_a, hidden_b, weight, labels_a, labels_b, …)`` with a
    ``DeprecationWarning``. Detected by the ranks: a hidden state is 3-D, ``weight`` is not."""
    if len(args) >= 5 and all(isinstance(t, Tensor) for t in args[:5]) \
            and args[0].dim() != 3 and args[1].dim() == 3:
        warnings.warn(f"{name}(weight, hidden_a, labels_a, hidden_b, labels_b, ...) is the 0.1 "
                      "argument order; use (hidden_a, hidden_b, weight, labels_a, labels_b, "
                      "...). The old order stops working in 0.3.", DeprecationWarning,
                      stacklevel=3)
        w, ha, la, hb, lb = args[:5]
        return (ha, hb, w, la, lb, *args[5:])
    return args


def legacy_module_order(hidden: Tensor, weight: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """``(hidden, weight)``; the 0.1 order ``forward(weight, hidden, …)`` is swapped back with a
    ``DeprecationWarning`` (detected by the ranks: ``hidden`` is 3-D, ``weight`` is not)."""
    if isinstance(hidden, Tensor) and isinstance(weight, Tensor) and hidden.dim() != 3 \
            and weight.dim() == 3:
        warnings.warn(f"{name}.forward(weight, hidden, labels, ...) is the 0.1 argument order; "
                      "use forward(hidden, weight, labels, ...). The old order stops working "
                      "in 0.3.", DeprecationWarning, stacklevel=3)
        return weight, hidden
    return hidden, weight


def _check_shapes(weight: Tensor, seqs: list[SeqSpec], per_seq: dict[str, Tensor | None]) -> int:
    """Shapes, dtypes, devices; returns the common batch size B."""
    if isinstance(weight, Tensor) and weight.numel() == 0 and hasattr(weight, "ds_id"):
        raise ValueError("weight is an empty DeepSpeed ZeRO-3 shard: compute the loss inside a "
                         "module forward that registered the LM head, e.g. "
                         "drorebel.losses.zero3.CausalLMWithFusedLoss")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a [V, H] tensor, got {getattr(weight, 'shape', weight)}")
    n = seqs[0][1].shape[0] if seqs[0][1].dim() > 0 else -1
    for h_name, h, y_name, y in seqs:
        if h.dim() != 3:
            raise ValueError(f"{h_name} must be [B, T, H], got shape {tuple(h.shape)}")
        if h.shape[0] != n:
            raise ValueError(f"{h_name} has B={h.shape[0]} rows but {seqs[0][0]} has B={n}")
        if h.shape[-1] != weight.shape[1]:
            raise ValueError(f"{h_name} has H={h.shape[-1]} but weight [V, H] has "
                             f"H={weight.shape[1]}")
        if tuple(y.shape) != tuple(h.shape[:2]):
            raise ValueError(f"{y_name} must have shape {tuple(h.shape[:2])} ({h_name}'s [B, T]), "
                             f"got {tuple(y.shape)}")
        if y.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{y_name} must hold int64/int32 token ids, got {y.dtype}")
        if h.device != weight.device or y.device != weight.device:
            raise ValueError(f"{h_name}/{y_name} must be on weight's device {weight.device}")
    for name, t in per_seq.items():
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape [{n}] (one value per sequence), "
                             f"got {tuple(t.shape)}")
    return n


def _first_bad_row(bad: Tensor) -> int:
    return int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0])


def check_fused_inputs(
    weight: Tensor, seqs: list[SeqSpec], per_seq: dict[str, Tensor | None],
    ignore_index: int = -100,
) -> int:
    """Validate the inputs of the fused losses; errors name the argument and the row.

    Checks shapes (``hidden`` ``[B, T, H]`` with H = ``weight.shape[1]``, ``labels`` ``[B, T]``,
    per-sequence tensors ``[B]``), label values (in ``[0, V)`` or ``ignore_index``), that every
    sequence has at least one response token, and that per-sequence values are finite. All value
    checks cost ONE host synchronisation together. Returns B.
    """
    n = _check_shapes(weight, seqs, per_seq)
    vocab = weight.shape[0]
    checks: list[tuple[str, Tensor, str]] = []
    for _, _, y_name, y in seqs:
        valid = y != ignore_index
        checks.append((y_name, valid & ((y < 0) | (y >= vocab)),
                       f"has a label outside [0, {vocab}) that is not ignore_index={ignore_index}"))
        checks.append((y_name, ~valid.any(dim=1),
                       f"has no response tokens (all labels == ignore_index={ignore_index}); "
                       "every sequence of a pair needs at least one"))
    for name, t in per_seq.items():
        if t is not None:
            checks.append((name, ~torch.isfinite(t), "is not finite (NaN or inf)"))
    flags = torch.stack([bad.any() for _, bad, _ in checks]).tolist()  # the one host sync
    for flag, (name, bad, what) in zip(flags, checks):
        if flag:
            raise ValueError(f"{name} row {_first_bad_row(bad)} {what}")
    return n


def token_counts(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Number of response tokens (labels ``!= ignore_index``) per row of ``labels [B, T]``."""
    return (labels != ignore_index).sum(dim=-1)


def average_logps(logps: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-sequence sums ``[B]`` → per-token means: each divided by its row's number of
    response tokens (at least 1). The counts are constants, so the gradient of sequence i is
    the summed one divided by its count (``average_log_prob=True`` of the fused losses)."""
    return logps / token_counts(labels, ignore_index).clamp(min=1).to(logps.dtype)


def pair_logps(
    hidden_a: Tensor, hidden_b: Tensor, weight: Tensor, labels_a: Tensor, labels_b: Tensor, *,
    temperature: float = 1.0, ignore_index: int = -100, impl: str = "auto",
    average_log_prob: bool = False, softmax_cache: int | str = 0,
) -> tuple[Tensor, Tensor]:
    """``(log π(a), log π(b))`` from ONE call over the tokens of both responses (the LM head is
    streamed once); the per-sequence sums come out of the kernel epilogue (a-row i → sequence
    i, b-row i → B+i). ``T`` may differ between a and b. ``average_log_prob=True`` divides each
    sum by its number of response tokens (:func:`average_logps`). ``softmax_cache``: byte
    budget (or ``"auto"``) of the op's softmax cache, see ``drorebel.linear_logps``."""
    h, b = hidden_a.shape[-1], labels_a.shape[0]
    flat_h = torch.cat([hidden_a.reshape(-1, h), hidden_b.reshape(-1, h)])
    flat_y = torch.cat([labels_a.reshape(-1), labels_b.reshape(-1)])
    rows = torch.arange(2 * b, dtype=torch.int32, device=flat_y.device)
    seq_ids = torch.cat([rows[:b].repeat_interleave(labels_a.shape[1]),
                         rows[b:].repeat_interleave(labels_b.shape[1])])
    check_choice("impl", impl, IMPLS)
    sums = linear_sequence_logps(flat_h, weight, flat_y, seq_ids=seq_ids, num_seqs=2 * b,
                                 temperature=temperature, ignore_index=ignore_index, impl=impl,
                                 softmax_cache=softmax_cache)
    if average_log_prob:
        return (average_logps(sums[:b], labels_a, ignore_index),
                average_logps(sums[b:], labels_b, ignore_index))
    return sums[:b], sums[b:]


def reference_logps(
    hidden: Tensor, policy_weight: Tensor, labels: Tensor, ref_logps: Tensor | None,
    ref_hidden: Tensor | None, ref_weight: Tensor | None, *, average_log_prob: bool = False,
    **kw,
) -> Tensor:
    """Precomputed ``ref_logps``, or ``Σ_t log π_ref`` from ``ref_hidden`` without gradient
    (``ref_weight`` defaults to the policy's head, detached: a frozen head / LoRA setting).
    ``average_log_prob=True`` divides the computed sums by the token counts; precomputed
    ``ref_logps`` are returned as given (they must then already be per-token averages)."""
    if ref_logps is not None:
        if ref_hidden is not None or ref_weight is not None:
            raise ValueError("pass either ref_logps or ref_hidden (+ ref_weight), not both")
        return ref_logps
    if ref_hidden is None:
        raise ValueError("pass ref_logps (per sequence) or ref_hidden (+ optional ref_weight)")
    if tuple(ref_hidden.shape) != tuple(hidden.shape):
        raise ValueError(f"ref_hidden must have hidden's shape {tuple(hidden.shape)}, "
                         f"got {tuple(ref_hidden.shape)}")
    w = policy_weight if ref_weight is None else ref_weight
    if tuple(w.shape) != tuple(policy_weight.shape):
        raise ValueError(f"ref_weight must have weight's shape {tuple(policy_weight.shape)}, "
                         f"got {tuple(w.shape)}")
    with torch.no_grad():
        ref = linear_sequence_logps(ref_hidden.detach(), w.detach(), labels, **kw)
        if average_log_prob:
            ref = average_logps(ref, labels, kw.get("ignore_index", -100))
        return ref


def split_stacked(name: str, t: Tensor) -> tuple[Tensor, Tensor]:
    """``[2B, ...]`` stacked as ``[a; b]`` → ``(a, b)``."""
    if t.dim() == 0 or t.shape[0] % 2:
        raise ValueError(f"{name} must be stacked [2B, ...] with the a-responses first, got "
                         f"shape {tuple(t.shape)}")
    b = t.shape[0] // 2
    return t[:b], t[b:]
