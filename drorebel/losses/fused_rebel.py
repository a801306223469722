"""Fused (DRO-)REBEL loss: hidden states + LM head → per-sequence log-probs → residuals →
χ²/KL dual weights → one backward pass through the fused linear log-prob op.

    Δ_i = (1/η)·[(log π_θ(a_i) − log π_ref(a_i)) − (log π_θ(b_i) − log π_ref(b_i))]
          − (r_a,i − r_b,i),        L = Σ_i p_i.detach() · Δ_i²

with ``p`` uniform (REBEL, Gao et al., arXiv 2404.16767) or the worst-case weights of a χ² or
KL ball (DRO-REBEL, Sahu & Wells, arXiv 2509.19104). The per-token log-probs come from
``linear_logprobs`` (no [tokens × vocab] logits); the a- and b-tokens go through ONE call, so
the LM head is streamed once per pass and autograd runs the fused backward once, with the
per-token upstream gradient ``±2·p_i·Δ_i/η`` (+ for a, − for b).

``divergence="wasserstein"`` (radius ``rho``) adds the first-order Wasserstein penalty
``ρ·sqrt((1/n) Σ_i ‖∇_z ℓ_i‖²)`` (docs/design.md §1): with ``w_target="hidden"`` (default) z = the
final hidden states, fused into the same vocabulary pass
(:func:`drorebel.losses.wasserstein.fused_linear_wasserstein_rebel_loss`); with
``w_target="embeddings"`` z = the input token embeddings, which needs the model and the input
ids (a double backward through the model): :meth:`FusedLinearRebelLoss.forward_model` or
:func:`drorebel.losses.wasserstein.embedding_wasserstein_rebel_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from drorebel.losses.dro import validate_dro_args
from drorebel.losses.output import LossOutput
from drorebel.losses.rebel import rebel_loss
from drorebel.losses.wasserstein import (
    embedding_wasserstein_rebel_loss,
    fused_linear_wasserstein_rebel_loss,
    sequence_logps_and_grad_sums,
    wasserstein_rebel_from_sums,
)
from drorebel.ops._autocast import call_head_under_autocast
from drorebel.ops.sequence import sequence_logps_fused

__all__ = [
    "fused_linear_rebel_loss",
    "FusedLinearRebelLoss",
    "sequence_logps_from_hidden",
    "check_fused_inputs",
    "W_TARGETS",
    "FUSED_DIVERGENCES",
]

W_TARGETS = ("hidden", "embeddings")
FUSED_DIVERGENCES = ("none", "chi2", "kl", "wasserstein")
_EMBEDDINGS_NEED_MODEL = (
    "w_target='embeddings' perturbs the input token embeddings: the penalty is a double backward "
    "through the model, which this hidden-state API does not receive. Use "
    "FusedLinearRebelLoss(..., w_target='embeddings').forward_model(model, ...) or "
    "drorebel.losses.wasserstein.embedding_wasserstein_rebel_loss(model, ...)")

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


def _check_divergence(divergence: str, rho: float | None, tau: float | None,
                      w_target: str) -> None:
    """``validate_dro_args`` extended with ``"wasserstein"`` (needs ``rho >= 0``, no ``tau``)."""
    if divergence not in FUSED_DIVERGENCES:
        raise ValueError(f"divergence must be one of {FUSED_DIVERGENCES}, got {divergence!r}")
    if divergence != "wasserstein":
        if w_target != "hidden":
            raise ValueError("w_target is only used by divergence='wasserstein'")
        validate_dro_args(divergence, rho, tau)
        return
    if tau is not None:
        raise ValueError("tau is not used by divergence='wasserstein' (pass rho only)")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:
        raise ValueError(f"divergence='wasserstein' needs a radius rho >= 0, got {rho!r}")
    if w_target not in W_TARGETS:
        raise ValueError(f"w_target must be one of {W_TARGETS}, got {w_target!r}")


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


def sequence_logps_from_hidden(
    weight: Tensor, hidden: Tensor, labels: Tensor, *, temperature: float = 1.0,
    ignore_index: int = -100, impl: str = "auto",
) -> Tensor:
    """Per-sequence ``log π(y|x) = Σ_t log softmax(W h_t / T)[y_t]`` (REBEL, arXiv 2404.16767).

    ``hidden`` ``[B, T, H]``, ``labels`` ``[B, T]`` aligned (``hidden[:, t]`` predicts
    ``labels[:, t]``; ``ignore_index`` positions add nothing); returns fp32 ``[B]`` (float64 for
    float64 inputs), differentiable in ``hidden`` and ``weight``; no ``[B·T, V]`` logits, and
    the sums come out of the kernel epilogue (``sequence_logps_fused``).
    """
    return call_head_under_autocast(sequence_logps_fused, hidden=hidden, weight=weight,
                                    labels=labels, ignore_index=ignore_index,
                                    temperature=temperature, impl=impl)


def _pair_logps(
    weight: Tensor, hidden_a: Tensor, labels_a: Tensor, hidden_b: Tensor, labels_b: Tensor,
    temperature: float, ignore_index: int, impl: str,
) -> tuple[Tensor, Tensor]:
    """``(log π(a), log π(b))`` from ONE fused call over the tokens of both responses; the
    per-sequence sums come out of the kernel epilogue (a-row i -> sequence i, b-row i -> B+i)."""
    h, b = hidden_a.shape[-1], labels_a.shape[0]
    flat_h = torch.cat([hidden_a.reshape(-1, h), hidden_b.reshape(-1, h)])
    flat_y = torch.cat([labels_a.reshape(-1), labels_b.reshape(-1)])
    rows = torch.arange(2 * b, dtype=torch.int32, device=flat_y.device)
    seq_ids = torch.cat([rows[:b].repeat_interleave(labels_a.shape[1]),
                         rows[b:].repeat_interleave(labels_b.shape[1])])
    sums = call_head_under_autocast(sequence_logps_fused, hidden=flat_h, weight=weight,
                                    labels=flat_y, seq_ids=seq_ids, num_seqs=2 * b,
                                    ignore_index=ignore_index, temperature=temperature, impl=impl)
    return sums[:b], sums[b:]


def fused_linear_rebel_loss(
    weight: Tensor, hidden_a: Tensor, labels_a: Tensor, hidden_b: Tensor, labels_b: Tensor,
    ref_logps_a: Tensor, ref_logps_b: Tensor, rewards_a: Tensor, rewards_b: Tensor, *,
    eta: float, divergence: str = "none", rho: float | None = None, tau: float | None = None,
    temperature: float = 1.0, ignore_index: int = -100, impl: str = "auto",
    group: object | None = None, global_batch: bool = True, validate: bool = True,
    w_target: str = "hidden",
) -> LossOutput:
    """REBEL / χ²-REBEL / KL-REBEL loss straight from final hidden states and the LM head.

    ``L = Σ_i p_i.detach()·Δ_i²`` with ``Δ_i = (1/η)[(log π_θ(a_i) − log π_ref(a_i)) −
    (log π_θ(b_i) − log π_ref(b_i))] − (r_a,i − r_b,i)`` and ``p`` uniform
    (``divergence="none"``, REBEL, arXiv 2404.16767) or the worst-case weights of the χ² / KL
    ball of radius ``rho`` (or KL at fixed temperature ``tau``) of DRO-REBEL (arXiv 2509.19104).
    The value equals the robust objective; the gradient is Danskin's ``Σ p_i ∇ℓ_i``.
    ``divergence="wasserstein"``: ``L_W = (1/n) Σ ℓ_i + ρ sqrt((1/n) Σ_i ‖∇_h ℓ_i‖²)`` with z =
    the final hidden states (docs/design.md §1), exact second-order gradients.

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
        divergence, rho, tau: ``"none"``, ``"chi2"`` (``rho``), ``"kl"`` (``rho`` or ``tau``)
            or ``"wasserstein"`` (``rho``; ρ = 0 is REBEL).
        temperature, ignore_index, impl: as for ``drorebel.linear_logprobs``.
        group, global_batch: data-parallel scope of the weights (see ``rebel_loss``): by default
            the weights cover the global batch and the loss is scaled so that averaged gradients
            are exact.
        validate: check shapes, label values, empty responses and finiteness (one host sync).
        w_target: ``"hidden"`` only here (``"embeddings"`` needs the model: see
            :meth:`FusedLinearRebelLoss.forward_model`).

    Returns:
        ``LossOutput``: ``.loss``, differentiable ``.policy_logps_a/_b`` ``[B]``, detached
        ``.weights`` ``[B]`` (this rank's slice) and ``.metrics`` (see ``rebel_loss``).
    """
    eta = _check_eta(eta)
    _check_divergence(divergence, rho, tau, w_target)
    if w_target == "embeddings":
        raise ValueError(_EMBEDDINGS_NEED_MODEL)
    if validate:
        check_fused_inputs(
            weight,
            [("hidden_a", hidden_a, "labels_a", labels_a),
             ("hidden_b", hidden_b, "labels_b", labels_b)],
            {"ref_logps_a": ref_logps_a, "ref_logps_b": ref_logps_b,
             "rewards_a": rewards_a, "rewards_b": rewards_b},
            ignore_index,
        )
    if divergence == "wasserstein":
        return fused_linear_wasserstein_rebel_loss(
            weight, hidden_a, labels_a, hidden_b, labels_b, ref_logps_a, ref_logps_b, rewards_a,
            rewards_b, eta=eta, rho=float(rho), temperature=temperature,
            ignore_index=ignore_index, impl=impl, group=group, global_batch=global_batch)
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

    ``divergence="wasserstein"``: ``w_target="hidden"`` works with :meth:`forward` and
    :meth:`forward_pairs`; ``w_target="embeddings"`` needs the model and the token ids, so it
    has its own entry point :meth:`forward_model` (the other two then raise).
    """

    def __init__(
        self, eta: float, divergence: str = "none", rho: float | None = None,
        tau: float | None = None, temperature: float = 1.0, ignore_index: int = -100,
        impl: str = "auto", validate: bool = True, group: object | None = None,
        global_batch: bool = True, w_target: str = "hidden",
    ) -> None:
        super().__init__()
        self.eta = _check_eta(eta)
        _check_divergence(divergence, rho, tau, w_target)
        self.w_target = w_target
        self.divergence, self.rho, self.tau = divergence, rho, tau
        self.temperature, self.ignore_index, self.impl = temperature, ignore_index, impl
        self.validate, self.group, self.global_batch = validate, group, global_batch

    def extra_repr(self) -> str:
        extra = f", w_target={self.w_target!r}" if self.divergence == "wasserstein" else ""
        return (f"eta={self.eta}, divergence={self.divergence!r}, rho={self.rho}, "
                f"tau={self.tau}, temperature={self.temperature}, impl={self.impl!r}{extra}")

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
        if self.w_target == "embeddings":
            raise ValueError(_EMBEDDINGS_NEED_MODEL)
        split_stacked("hidden", hidden)
        if self.validate:
            check_fused_inputs(weight, [("hidden", hidden, "labels", labels)],
                               {"rewards": rewards, "ref_logps": ref_logps}, self.ignore_index)
        ref = reference_logps(weight, hidden, labels, ref_logps, ref_hidden, ref_weight,
                              **self._lp_kw())
        if self.divergence == "wasserstein":
            logps, sums = sequence_logps_and_grad_sums(weight, hidden, labels, **self._lp_kw())
        else:
            logps = sequence_logps_from_hidden(weight, hidden, labels, **self._lp_kw())
        (la, lb), (ra, rb), (wa, wb) = (split_stacked(k, t) for k, t in
                                        (("hidden", logps), ("ref_logps", ref),
                                         ("rewards", rewards)))
        if self.divergence == "wasserstein":
            sa, sb = split_stacked("hidden", sums)
            return wasserstein_rebel_from_sums(
                la, lb, sa + sb, ra, rb, wa, wb, eta=self.eta, rho=float(self.rho),
                temperature=self.temperature, group=self.group, global_batch=self.global_batch)
        return _rebel_from_logps(la, lb, ra, rb, wa, wb, **self._dro_kw())

    def forward_pairs(
        self, weight: Tensor, hidden_a: Tensor, labels_a: Tensor, hidden_b: Tensor,
        labels_b: Tensor, ref_logps_a: Tensor, ref_logps_b: Tensor, rewards_a: Tensor,
        rewards_b: Tensor,
    ) -> LossOutput:
        """Same as :func:`fused_linear_rebel_loss` with this module's settings."""
        return fused_linear_rebel_loss(
            weight, hidden_a, labels_a, hidden_b, labels_b, ref_logps_a, ref_logps_b,
            rewards_a, rewards_b, validate=self.validate, w_target=self.w_target,
            **self._dro_kw(), **self._lp_kw(),
        )

    def forward_model(
        self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
        labels: Tensor, rewards: Tensor, ref_logps: Tensor,
    ) -> LossOutput:
        """Wasserstein DRO-REBEL with z = input token embeddings (``w_target="embeddings"``).

        ``L_W = (1/n) Σ ℓ_i + ρ sqrt((1/n) Σ_i ‖∇_{e(a_i), e(b_i)} ℓ_i‖²)`` by a batched double
        backward through ``model`` (an HF causal LM taking ``inputs_embeds``; DRO-REBEL arXiv
        2509.19104). Stacked ``[a; b]`` inputs: ``input_ids``/``attention_mask``/``labels``
        ``[2B, T]`` (``labels[:, t]`` = the token ``logits[:, t]`` predicts), ``rewards``,
        ``ref_logps`` ``[2B]``. See
        :func:`drorebel.losses.wasserstein.embedding_wasserstein_rebel_loss`.
        """
        if self.divergence != "wasserstein" or self.w_target != "embeddings":
            raise ValueError("forward_model is the entry point of divergence='wasserstein', "
                             "w_target='embeddings'; use forward() otherwise")
        ids, lab, rew, ref = (split_stacked(k, t) for k, t in (
            ("input_ids", input_ids), ("labels", labels), ("rewards", rewards),
            ("ref_logps", ref_logps)))
        mask = (None, None) if attention_mask is None else split_stacked("attention_mask",
                                                                         attention_mask)
        return embedding_wasserstein_rebel_loss(
            model, ids[0], mask[0], lab[0], ids[1], mask[1], lab[1], ref[0], ref[1], rew[0],
            rew[1], eta=self.eta, rho=float(self.rho), temperature=self.temperature,
            ignore_index=self.ignore_index, group=self.group, global_batch=self.global_batch)
