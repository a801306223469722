"""Fused (DRO-)REBEL loss: hidden states + LM head → per-sequence log-probs → residuals →
χ²/KL dual weights → one backward pass through the fused linear log-prob op.

    Δ_i = (1/η)·[(log π_θ(a_i) − log π_ref(a_i)) − (log π_θ(b_i) − log π_ref(b_i))]
          − (r_a,i − r_b,i),        L = Σ_i p_i.detach() · Δ_i²

with ``p`` uniform (REBEL, Gao et al., arXiv 2404.16767) or the worst-case weights of a χ² or
KL ball (DRO-REBEL, Sahu & Wells, arXiv 2509.19104). The per-token log-probs come from
``linear_logprobs`` (no [tokens × vocab] logits); the a- and b-tokens go through ONE call, so
the LM head is streamed once per pass and autograd runs the fused backward once, with the
per-token upstream gradient ``±2·p_i·Δ_i/η`` (+ for a, − for b).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from drorebel.losses.dro import validate_dro_args
from drorebel.losses.output import LossOutput
from drorebel.losses.rebel import rebel_loss
from drorebel.ops.linear_logprobs import linear_logprobs
from drorebel.ops.sequence import sequence_logps

__all__ = [
    "fused_linear_rebel_loss",
    "FusedLinearRebelLoss",
    "sequence_logps_from_hidden",
    "check_fused_inputs",
]

# (hidden name, hidden [B, T, H], labels name, labels [B, T])
SeqSpec = tuple[str, Tensor, str, Tensor]


def _check_eta(eta: float) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0:
        raise ValueError(f"eta must be a number > 0, got {eta!r}")
    return float(eta)


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


def _token_logps(hidden: Tensor, weight: Tensor, labels: Tensor, **kw) -> Tensor:
    """``linear_logprobs``; under ``torch.autocast`` the head runs in the autocast dtype (as
    ``F.linear`` would) and autocast is off inside, so the op's own fp32 maths stays fp32."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(kind, enabled=False):
            return linear_logprobs(hidden, weight, labels, **kw)
    return linear_logprobs(hidden, weight, labels, **kw)


def sequence_logps_from_hidden(
    weight: Tensor, hidden: Tensor, labels: Tensor, *, temperature: float = 1.0,
    ignore_index: int = -100, impl: str = "auto",
) -> Tensor:
    """Per-sequence ``log π(y|x) = Σ_t log softmax(W h_t / T)[y_t]`` (REBEL, arXiv 2404.16767).

    ``hidden`` ``[B, T, H]``, ``labels`` ``[B, T]`` aligned (``hidden[:, t]`` predicts
    ``labels[:, t]``; ``ignore_index`` positions add nothing); returns fp32 ``[B]`` (float64 for
    float64 inputs), differentiable in ``hidden`` and ``weight``; no ``[B·T, V]`` logits.
    """
    tok = _token_logps(hidden, weight, labels, ignore_index=ignore_index,
                       temperature=temperature, impl=impl)
    return sequence_logps(tok, labels, ignore_index=ignore_index)


def _pair_logps(
    weight: Tensor, hidden_a: Tensor, labels_a: Tensor, hidden_b: Tensor, labels_b: Tensor,
    temperature: float, ignore_index: int, impl: str,
) -> tuple[Tensor, Tensor]:
    """``(log π(a), log π(b))`` from ONE fused call over the tokens of both responses."""
    h = hidden_a.shape[-1]
    flat_h = torch.cat([hidden_a.reshape(-1, h), hidden_b.reshape(-1, h)])
    flat_y = torch.cat([labels_a.reshape(-1), labels_b.reshape(-1)])
    tok = _token_logps(flat_h, weight, flat_y, ignore_index=ignore_index,
                       temperature=temperature, impl=impl)
    na = labels_a.numel()
    tok_a, tok_b = tok[:na].view(labels_a.shape), tok[na:].view(labels_b.shape)
    return (sequence_logps(tok_a, labels_a, ignore_index=ignore_index),
            sequence_logps(tok_b, labels_b, ignore_index=ignore_index))


def fused_linear_rebel_loss(
    weight: Tensor, hidden_a: Tensor, labels_a: Tensor, hidden_b: Tensor, labels_b: Tensor,
    ref_logps_a: Tensor, ref_logps_b: Tensor, rewards_a: Tensor, rewards_b: Tensor, *,
    eta: float, divergence: str = "none", rho: float | None = None, tau: float | None = None,
    temperature: float = 1.0, ignore_index: int = -100, impl: str = "auto",
    group: object | None = None, global_batch: bool = True, validate: bool = True,
) -> LossOutput:
    """REBEL / χ²-REBEL / KL-REBEL loss straight from final hidden states and the LM head.

    ``L = Σ_i p_i.detach()·Δ_i²`` with ``Δ_i = (1/η)[(log π_θ(a_i) − log π_ref(a_i)) −
    (log π_θ(b_i) − log π_ref(b_i))] − (r_a,i − r_b,i)`` and ``p`` uniform
    (``divergence="none"``, REBEL, arXiv 2404.16767) or the worst-case weights of the χ² / KL
    ball of radius ``rho`` (or KL at fixed temperature ``tau``) of DRO-REBEL (arXiv 2509.19104).
    The value equals the robust objective; the gradient is Danskin's ``Σ p_i ∇ℓ_i``.

    Args:
        weight: LM head ``[V, H]``, same dtype as the hidden states (under ``torch.autocast``
            both are cast to the autocast dtype). Under DeepSpeed ZeRO-3 call this inside a
            module forward that registered the head: see :mod:`drorebel.losses.zero3`.
        hidden_a, hidden_b: final hidden states ``[B, T, H]`` (``T`` may differ between a and b).
        labels_a, labels_b: ``[B, T]``; ``labels[:, t]`` is the token ``hidden[:, t]`` predicts
            (already shifted), prompt and padding = ``ignore_index``.
        ref_logps_a, ref_logps_b: per-sequence reference log-probs ``[B]`` (precomputed).
        rewards_a, rewards_b: ``[B]``.
        eta: REBEL step size η > 0.
        divergence, rho, tau: ``"none"``, ``"chi2"`` (``rho``) or ``"kl"`` (``rho`` or ``tau``).
        temperature, ignore_index, impl: as for ``drorebel.linear_logprobs``.
        group, global_batch: data-parallel scope of the weights (see ``rebel_loss``): by default
            the weights cover the global batch and the loss is scaled so that averaged gradients
            are exact.
        validate: check shapes, label values, empty responses and finiteness (one host sync).

    Returns:
        ``LossOutput``: ``.loss``, differentiable ``.policy_logps_a/_b`` ``[B]``, detached
        ``.weights`` ``[B]`` (this rank's slice) and ``.metrics`` (see ``rebel_loss``).
    """
    eta = _check_eta(eta)
    validate_dro_args(divergence, rho, tau)
    if validate:
        check_fused_inputs(
            weight,
            [("hidden_a", hidden_a, "labels_a", labels_a),
             ("hidden_b", hidden_b, "labels_b", labels_b)],
            {"ref_logps_a": ref_logps_a, "ref_logps_b": ref_logps_b,
             "rewards_a": rewards_a, "rewards_b": rewards_b},
            ignore_index,
        )
    logps_a, logps_b = _pair_logps(weight, hidden_a, labels_a, hidden_b, labels_b,
                                   temperature, ignore_index, impl)
    return _rebel_from_logps(logps_a, logps_b, ref_logps_a, ref_logps_b, rewards_a, rewards_b,
                             eta=eta, divergence=divergence, rho=rho, tau=tau, group=group,
                             global_batch=global_batch)


def _rebel_from_logps(logps_a: Tensor, logps_b: Tensor, *args: Tensor, **kw) -> LossOutput:
    out = rebel_loss(logps_a, logps_b, *args, **kw)
    out.policy_logps_a, out.policy_logps_b = logps_a, logps_b
    return out


def reference_logps(
    policy_weight: Tensor, hidden: Tensor, labels: Tensor, ref_logps: Tensor | None,
    ref_hidden: Tensor | None, ref_weight: Tensor | None, **kw,
) -> Tensor:
    """Precomputed ``ref_logps``, or ``Σ_t log π_ref`` from ``ref_hidden`` without gradient
    (``ref_weight`` defaults to the policy's head, detached: a frozen head / LoRA setting)."""
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
        return sequence_logps_from_hidden(w.detach(), ref_hidden.detach(), labels, **kw)


def split_stacked(name: str, t: Tensor) -> tuple[Tensor, Tensor]:
    """``[2B, ...]`` stacked as ``[a; b]`` → ``(a, b)``."""
    if t.dim() == 0 or t.shape[0] % 2:
        raise ValueError(f"{name} must be stacked [2B, ...] with the a-responses first, got "
                         f"shape {tuple(t.shape)}")
    b = t.shape[0] // 2
    return t[:b], t[b:]


class FusedLinearRebelLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_linear_rebel_loss` (REBEL / χ² / KL DRO-REBEL).

    ``forward(weight, hidden, labels, rewards, ref_logps=None, *, ref_hidden=None,
    ref_weight=None)`` takes the a- and b-responses stacked along the batch as ``[a; b]``
    (``hidden`` ``[2B, T, H]``, ``labels`` ``[2B, T]``, ``rewards`` and ``ref_logps`` ``[2B]``),
    Liger's layout, in ONE fused call. The reference log-probs are precomputed per sequence
    (``ref_logps``) or computed here without gradient from ``ref_hidden`` ``[2B, T, H]`` and
    ``ref_weight`` (default: the policy head, detached). :meth:`forward_pairs` takes the a- and
    b-tensors separately with the functional signature. ``group``/``global_batch``: the
    data-parallel scope of the weights, as in :func:`fused_linear_rebel_loss`.
    """

    def __init__(
        self, eta: float, divergence: str = "none", rho: float | None = None,
        tau: float | None = None, temperature: float = 1.0, ignore_index: int = -100,
        impl: str = "auto", validate: bool = True, group: object | None = None,
        global_batch: bool = True,
    ) -> None:
        super().__init__()
        self.eta = _check_eta(eta)
        validate_dro_args(divergence, rho, tau)
        self.divergence, self.rho, self.tau = divergence, rho, tau
        self.temperature, self.ignore_index, self.impl = temperature, ignore_index, impl
        self.validate, self.group, self.global_batch = validate, group, global_batch

    def extra_repr(self) -> str:
        return (f"eta={self.eta}, divergence={self.divergence!r}, rho={self.rho}, "
                f"tau={self.tau}, temperature={self.temperature}, impl={self.impl!r}")

    def _lp_kw(self) -> dict:
        return dict(temperature=self.temperature, ignore_index=self.ignore_index, impl=self.impl)

    def _dro_kw(self) -> dict:
        return dict(eta=self.eta, divergence=self.divergence, rho=self.rho, tau=self.tau,
                    group=self.group, global_batch=self.global_batch)

    def forward(
        self, weight: Tensor, hidden: Tensor, labels: Tensor, rewards: Tensor,
        ref_logps: Tensor | None = None, *, ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
    ) -> LossOutput:
        """Loss on stacked ``[a; b]`` inputs; returns :class:`LossOutput`."""
        split_stacked("hidden", hidden)
        if self.validate:
            check_fused_inputs(weight, [("hidden", hidden, "labels", labels)],
                               {"rewards": rewards, "ref_logps": ref_logps}, self.ignore_index)
        ref = reference_logps(weight, hidden, labels, ref_logps, ref_hidden, ref_weight,
                              **self._lp_kw())
        logps = sequence_logps_from_hidden(weight, hidden, labels, **self._lp_kw())
        (la, lb), (ra, rb), (wa, wb) = (split_stacked(k, t) for k, t in
                                        (("hidden", logps), ("ref_logps", ref),
                                         ("rewards", rewards)))
        return _rebel_from_logps(la, lb, ra, rb, wa, wb, **self._dro_kw())

    def forward_pairs(
        self, weight: Tensor, hidden_a: Tensor, labels_a: Tensor, hidden_b: Tensor,
        labels_b: Tensor, ref_logps_a: Tensor, ref_logps_b: Tensor, rewards_a: Tensor,
        rewards_b: Tensor,
    ) -> LossOutput:
        """Same as :func:`fused_linear_rebel_loss` with this module's settings."""
        return fused_linear_rebel_loss(
            weight, hidden_a, labels_a, hidden_b, labels_b, ref_logps_a, ref_logps_b,
            rewards_a, rewards_b, validate=self.validate, **self._dro_kw(), **self._lp_kw(),
        )
