"""Fused losses under DeepSpeed ZeRO-3: where to read the partitioned LM head.

Under ZeRO-3 every parameter is partitioned across the data-parallel ranks; a module's
parameters are all-gathered by hooks just before its ``forward`` and released just after, and
gathered again just before its backward. A loss that reads ``lm_head.weight`` *outside* a
module forward (e.g. in ``Trainer.compute_loss``, after ``model(...)`` returned) sees the empty
local shard (shape ``[0]``). The documented remedy (DeepSpeed "ZeRO-3 → Registering external
parameters", ``deepspeed.zero.register_external_parameter``) is to compute the loss inside the
forward of a module that declares the head as an *external parameter*: DeepSpeed then gathers
it for that module's forward AND again before that module's backward, so the fused op — which
saves the (gathered) weight for its backward — finds the full ``[V, H]`` tensor there, and the
weight gradient goes through ZeRO-3's usual reduce-scatter. :class:`CausalLMWithFusedLoss` is
that module; pass it (not the bare model) to ``deepspeed.initialize``. Its forward must return
a ``dict`` (DeepSpeed attaches its backward hooks to tensors found in tuples/lists/dicts only).

Without DeepSpeed (single GPU, DDP, ZeRO-1/2) the same module works unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from drorebel.losses.fused_dpo import FusedLinearDPOLoss
from drorebel.losses.fused_rebel import FusedLinearRebelLoss
from drorebel.losses.output import LossOutput
from drorebel.losses.wasserstein_embeddings import EmbeddingWassersteinRebelLoss

__all__ = ["is_zero3_partitioned", "register_lm_head", "CausalLMWithFusedLoss", "PairLoss"]

PairLoss = FusedLinearRebelLoss | FusedLinearDPOLoss | EmbeddingWassersteinRebelLoss
_PAIR_LOSSES = (FusedLinearRebelLoss, FusedLinearDPOLoss, EmbeddingWassersteinRebelLoss)


def is_zero3_partitioned(param: Tensor) -> bool:
    """True for a parameter managed by ZeRO-3 (it carries DeepSpeed's ``ds_id``)."""
    return hasattr(param, "ds_id")


def register_lm_head(module: nn.Module, weight: nn.Parameter) -> bool:
    """Declare ``weight`` (the LM head) an external ZeRO-3 parameter of ``module``.

    ``deepspeed.zero.register_external_parameter(module, weight)``: ZeRO-3 then gathers the
    full weight before ``module``'s forward and before its backward. Call it once, before or
    after ``deepspeed.initialize``. A no-op (returns False) when DeepSpeed is not installed;
    harmless without ZeRO-3.
    """
    try:
        import deepspeed  # noqa: F401  (only to learn whether DeepSpeed is installed)
    except ImportError:
        return False
    # ``deepspeed.zero`` is an attribute, not an importable module path: import the function
    # from where it is defined (``from deepspeed.zero import …`` fails with ImportError)
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    register_external_parameter(module, weight)
    return True


class CausalLMWithFusedLoss(nn.Module):
    """A Hugging Face causal LM with a pair loss computed inside its forward (ZeRO-3 safe).

    ``forward(input_ids, attention_mask, labels, rewards=None, ref_logps=None)`` takes the a-
    and b-sequences stacked as ``[a; b]`` (``[2B, T]``, labels HF-style: ``labels[:, t]`` is
    ``input_ids[:, t]`` or ``ignore_index`` on prompt and padding; the shift happens here),
    runs the decoder (``model.base_model``) and applies ``loss`` to the final hidden states
    and the LM head ``model.get_output_embeddings().weight``, registered as an external ZeRO-3
    parameter of this module:

    - :class:`FusedLinearRebelLoss` (REBEL, χ², KL, Wasserstein on hidden states) needs
      ``rewards`` ``[2B]``;
    - :class:`FusedLinearDPOLoss`: ``[chosen; rejected]`` (``rewards`` unused), or, with
      ``order_by_reward=True``, reward-scored ``[a; b]`` pairs (higher reward = chosen, ties
      masked);
    - :class:`EmbeddingWassersteinRebelLoss` runs the model itself on the input embeddings
      (a double backward; not under ZeRO-3).

    ``groups`` ``[B]`` (one integer id per pair, optional): group-level DRO of the REBEL loss
    (:func:`~drorebel.losses.fused_rebel.fused_linear_rebel_loss`); refused by the DPO and the
    embedding-Wasserstein losses and by ``divergence="wasserstein"``.

    ``ref_logps`` ``[2B]`` are precomputed sequence log-probs. With ``logps_only=True`` the
    forward returns ``{"logps": [N]}``, the per-sequence log-probs of any ``[N, T]`` batch under
    the loss's settings (wrap it in ``torch.no_grad`` for reference log-probs; under ZeRO-3 the
    head is gathered as for the loss).

    Returns a dict: ``loss``, ``policy_logps`` ``[2B]`` (differentiable, ``[a; b]`` order),
    ``weights`` ``[B]``, ``num_tokens`` (response tokens in the batch) and the metrics
    (``rebel/…``, ``dro/…``, ``rewards/…``, ``logps/…``, ``wasserstein/…``, ``dpo/…``).
    """

    def __init__(self, model: nn.Module, loss: PairLoss) -> None:
        super().__init__()
        if not isinstance(loss, _PAIR_LOSSES):
            raise TypeError("loss must be a FusedLinearRebelLoss, FusedLinearDPOLoss or "
                            f"EmbeddingWassersteinRebelLoss, got {type(loss).__name__}")
        self.model, self.loss = model, loss
        register_lm_head(self, self.lm_head_weight)

    @property
    def lm_head_weight(self) -> nn.Parameter:
        """The LM head ``[V, H]`` (the input embedding when the model ties them)."""
        return self.model.get_output_embeddings().weight

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        rewards: Tensor | None = None,
        ref_logps: Tensor | None = None,
        *,
        logps_only: bool = False,
        groups: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Decoder → final hidden states → the pair loss, all inside this module's forward."""
        if groups is not None and not isinstance(self.loss, FusedLinearRebelLoss):
            raise ValueError(f"groups (group-level DRO) is a REBEL loss option (chi2 or kl); "
                             f"{type(self.loss).__name__} does not take it")
        if isinstance(self.loss, EmbeddingWassersteinRebelLoss):
            return self._embedding_forward(input_ids, attention_mask, labels, rewards, ref_logps,
                                           logps_only)
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)
        hidden, shifted = out.last_hidden_state[:, :-1], labels[:, 1:]
        if logps_only:
            return {"logps": self.loss.sequence_logps(hidden, self.lm_head_weight, shifted)}
        if isinstance(self.loss, FusedLinearRebelLoss):
            if rewards is None:
                raise ValueError("rewards ([2B], stacked [a; b]) are required by the REBEL loss")
            res = self.loss(hidden, self.lm_head_weight, shifted, rewards, ref_logps,
                            groups=groups)
        else:
            use = rewards if self.loss.order_by_reward else None
            res = self.loss(hidden, self.lm_head_weight, shifted, ref_logps, rewards=use)
        return self._result(res, shifted)

    def _embedding_forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                           rewards: Tensor | None, ref_logps: Tensor | None, logps_only: bool
                           ) -> dict[str, Tensor]:
        ignore = torch.full_like(labels[:, :1], self.loss.ignore_index)
        aligned = torch.cat([labels[:, 1:], ignore], dim=1)  # logits[:, t] predicts token t+1
        if logps_only:
            return {"logps": self.loss.sequence_logps(self.model, input_ids, attention_mask,
                                                      aligned)}
        if rewards is None or ref_logps is None:
            raise ValueError("rewards and ref_logps ([2B], stacked [a; b]) are required by the "
                             "embedding Wasserstein loss")
        res = self.loss(self.model, input_ids, attention_mask, aligned, rewards, ref_logps)
        return self._result(res, aligned)

    def _result(self, res: LossOutput, labels: Tensor) -> dict[str, Tensor]:
        logps = torch.cat([res.policy_logps_a, res.policy_logps_b])
        ntok = (labels != self.loss.ignore_index).sum()
        return {"loss": res.loss, "policy_logps": logps, "weights": res.weights,
                "num_tokens": ntok, **res.metrics}
