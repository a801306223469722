"""Wasserstein DRO-REBEL with the perturbation on the input token embeddings (the paper's z).

First-order dual of the type-2 Wasserstein ball of radius ρ (DRO-REBEL, arXiv 2509.19104;
docs/design.md §1), with z = the input token embeddings of both responses:

    L_W = (1/n) Σ_i Δ_i² + ρ · sqrt( (1/n) Σ_i ‖∇_{e(a_i), e(b_i)} Δ_i²‖² )

The per-pair gradient has no closed form here: it is one batched
``autograd.grad(create_graph=True)`` through the whole model, and the loss is then
differentiated again (a double backward). Slow; kept as an option and as a cross-check of the
fused hidden-state penalty (:mod:`drorebel.losses.wasserstein`). Its call shape differs from
the fused losses (it needs the model and the token ids), hence its own module and class.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from drorebel.losses.fused_common import check_eta, split_stacked
from drorebel.losses.output import LossOutput
from drorebel.losses.rebel import rebel_residuals
from drorebel.losses.wasserstein import check_rho, wasserstein_combine
from drorebel.ops.autograd_utils import per_sample_grad_sq_norms

__all__ = ["embedding_wasserstein_rebel_loss", "EmbeddingWassersteinRebelLoss"]


def _model_seq_logps(model: nn.Module, embeds: Tensor, attention_mask: Tensor | None,
                     labels: Tensor, temperature: float, ignore_index: int) -> Tensor:
    """``Σ_t log softmax(logits_t / T)[y_t]`` per row; ``labels`` aligned with the logits."""
    logits = model(inputs_embeds=embeds, attention_mask=attention_mask).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits / temperature, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    tok = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, tok, 0.0).sum(-1)


def _check_mask(name: str, mask: Tensor | None) -> None:
    if mask is not None and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must hold 0/1 (the argument order is input_ids_a, input_ids_b, "
                         "attention_mask_a, attention_mask_b, labels_a, labels_b, ...)")


def embedding_wasserstein_rebel_loss(
    model: nn.Module,
    input_ids_a: Tensor,
    input_ids_b: Tensor,
    attention_mask_a: Tensor | None,
    attention_mask_b: Tensor | None,
    labels_a: Tensor,
    labels_b: Tensor,
    ref_logps_a: Tensor,
    ref_logps_b: Tensor,
    rewards_a: Tensor,
    rewards_b: Tensor,
    *,
    eta: float,
    rho: float,
    temperature: float = 1.0,
    ignore_index: int = -100,
    group: object | None = None,
    global_batch: bool = True,
    validate: bool = True,
) -> LossOutput:
    """Wasserstein DRO-REBEL with the penalty on the input token embeddings (arXiv 2509.19104).

    ``model`` is an HF causal LM taking ``inputs_embeds``; ids, masks and labels are ``[B, T]``
    with ``labels[:, t]`` the token predicted by ``logits[:, t]`` (already shifted; prompt and
    padding = ``ignore_index``). Returns the loss of :func:`wasserstein_combine` (REBEL metrics
    plus ``wasserstein/penalty`` and ``wasserstein/grad_norm_rms``). ``validate``: check the
    per-pair values (one host sync; see :func:`drorebel.losses.rebel.rebel_loss`).
    """
    check_rho(rho)
    eta = check_eta(eta)
    _check_mask("attention_mask_a", attention_mask_a)
    _check_mask("attention_mask_b", attention_mask_b)
    embed = model.get_input_embeddings()
    emb_a, emb_b = embed(input_ids_a), embed(input_ids_b)
    if not emb_a.requires_grad:  # frozen embedding table: perturb the embeddings anyway
        emb_a, emb_b = emb_a.detach().requires_grad_(), emb_b.detach().requires_grad_()
    lp_a = _model_seq_logps(model, emb_a, attention_mask_a, labels_a, temperature, ignore_index)
    lp_b = _model_seq_logps(model, emb_b, attention_mask_b, labels_b, temperature, ignore_index)
    resid = rebel_residuals(lp_a, lp_b, ref_logps_a, ref_logps_b, rewards_a, rewards_b, eta)
    sq = per_sample_grad_sq_norms(resid * resid, [emb_a, emb_b]) if rho > 0 else None
    return wasserstein_combine(lp_a, lp_b, sq, ref_logps_a, ref_logps_b, rewards_a, rewards_b,
                               eta=eta, rho=rho, group=group, global_batch=global_batch,
                               validate=validate)


class EmbeddingWassersteinRebelLoss(nn.Module):
    """``nn.Module`` form of :func:`embedding_wasserstein_rebel_loss` on stacked ``[a; b]``.

    ``forward(model, input_ids, attention_mask, labels, rewards, ref_logps)``: ``input_ids``,
    ``attention_mask`` (or None) and ``labels`` ``[2B, T]`` (labels aligned with the logits),
    ``rewards`` and ``ref_logps`` ``[2B]``. :meth:`sequence_logps` gives ``log π(y|x)`` of
    ``[B, T]`` inputs through the model (no penalty), e.g. for reference log-probs.
    """

    divergence = "wasserstein"

    def __init__(self, eta: float, rho: float, temperature: float = 1.0,
                 ignore_index: int = -100, group: object | None = None,
                 global_batch: bool = True, validate: bool = True) -> None:
        super().__init__()
        check_rho(rho)
        self.eta, self.rho = check_eta(eta), float(rho)
        self.temperature, self.ignore_index = temperature, ignore_index
        self.group, self.global_batch, self.validate = group, global_batch, validate

    def extra_repr(self) -> str:
        return f"eta={self.eta}, rho={self.rho}, temperature={self.temperature}"

    def sequence_logps(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                       labels: Tensor) -> Tensor:
        """``Σ_t log softmax(logits_t / T)[y_t]`` per row (labels aligned with the logits)."""
        embeds = model.get_input_embeddings()(input_ids)
        return _model_seq_logps(model, embeds, attention_mask, labels, self.temperature,
                                self.ignore_index)

    def forward(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                labels: Tensor, rewards: Tensor, ref_logps: Tensor) -> LossOutput:
        """The loss on stacked ``[a; b]`` inputs; returns :class:`LossOutput`."""
        ids, lab, rew, ref = (split_stacked(k, t) for k, t in (
            ("input_ids", input_ids), ("labels", labels), ("rewards", rewards),
            ("ref_logps", ref_logps)))
        mask = (None, None) if attention_mask is None else split_stacked("attention_mask",
                                                                         attention_mask)
        return embedding_wasserstein_rebel_loss(
            model, ids[0], ids[1], mask[0], mask[1], lab[0], lab[1], ref[0], ref[1], rew[0],
            rew[1], eta=self.eta, rho=self.rho, temperature=self.temperature,
            ignore_index=self.ignore_index, group=self.group, global_batch=self.global_batch,
            validate=self.validate)
