"""Model and tokenizer loading, and the pair-loss module the engines train.

The loss reads the LM head, so it must run inside a module ``forward`` for DeepSpeed ZeRO-3 to
gather the partitioned head (see :mod:`drorebel.losses.zero3`). :class:`PairLossModule` is that
module: decoder → final hidden states → per-sequence log-probs (fused or materialised) →
DRO-REBEL loss, all in its ``forward``, with the head registered as an external parameter.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from drorebel.losses.output import LossOutput
from drorebel.trainer.config import TrainConfig

__all__ = ["choose_attn_implementation", "load_model", "load_tokenizer", "sequence_logps_of",
           "PairLossModule", "apply_liger", "reward_ordered_dpo_loss"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_attn_implementation(requested: str, device: torch.device) -> str:
    """``auto`` → ``flash_attention_2`` when flash-attn is installed and on CUDA, else ``sdpa``."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def load_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """``AutoModelForCausalLM`` from ``cfg.model`` (safetensors only) or from ``model_config``.

    Applies gradient checkpointing and Liger-Kernel's model patches when the config asks.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = choose_attn_implementation(cfg.attn_implementation, device)
    dtype = _DTYPES[cfg.dtype]
    if cfg.model_config is not None:
        mc = dict(cfg.model_config)
        hf_cfg = AutoConfig.for_model(mc.pop("model_type"), **mc)
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model, attn_implementation=attn, dtype=dtype, use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code,
        )
    if getattr(cfg, "liger_kernel", False):
        apply_liger(model, device)
    if getattr(cfg, "gradient_checkpointing", False):
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return model  # loaded into ZeRO-3 partitions (zero.Init): DeepSpeed places them
    return model.to(device)


def apply_liger(model: nn.Module, device: torch.device) -> bool:
    """Liger-Kernel's RMSNorm, RoPE and SwiGLU patches on ``model`` (CUDA only; else warn)."""
    if device.type != "cuda":
        warnings.warn("liger_kernel=true needs CUDA (Triton kernels); skipped on "
                      f"{device.type}", stacklevel=2)
        return False
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    return True


def load_tokenizer(cfg: TrainConfig) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def hidden_and_head(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states ``[B, T−1, H]`` (position t predicts token t+1) and the LM head.

    Not ZeRO-3 safe on its own (the head is an empty shard outside a module forward): the
    trainer calls it inside :class:`PairLossModule`.
    """
    out = model.base_model(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state[:, :-1], model.get_output_embeddings().weight


def sequence_logps_of(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                      labels: torch.Tensor, temperature: float, materialized: bool = False
                      ) -> torch.Tensor:
    """``log π(y|x) = Σ_t log softmax(W h_t / T)[y_t]`` over response tokens (fp32 ``[B]``)."""
    from drorebel.losses.fused_rebel import sequence_logps_from_hidden

    hidden, weight = hidden_and_head(model, ids, mask)
    lab = labels[:, 1:]
    if materialized:
        logits = (hidden @ weight.T).float() / temperature
        tok = torch.log_softmax(logits, -1).gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (tok * (lab != -100)).sum(-1)
    return sequence_logps_from_hidden(weight, hidden, lab, temperature=temperature, impl="auto")


class PairLossModule(nn.Module):
    """A causal LM plus the DRO-REBEL pair loss, computed inside ``forward`` (ZeRO-3 safe).

    ``forward(ids_a, mask_a, labels_a, ids_b, mask_b, labels_b, ref_a, ref_b, rewards_a,
    rewards_b)`` returns ``{"loss", "num_tokens", <metrics>}`` with
    ``L = Σ_i p_i.detach()·Δ_i²`` (DRO-REBEL, arXiv 2509.19104), ``Δ_i`` the REBEL residual
    (arXiv 2404.16767) and ``p`` over the *global* batch when ``torch.distributed`` is
    initialised (``loss = world·Σ_{i local} p_i ℓ_i``, see
    :func:`drorebel.losses.rebel.rebel_loss`).
    ``forward(ids, mask, labels, logps_only=True)`` returns ``{"logps": [B]}`` (the caller wraps
    it in ``torch.no_grad`` for reference log-probs). Labels are HF-style (shifted here).
    With ``cfg.loss="dpo"`` the loss is :func:`reward_ordered_dpo_loss` instead (DPO baseline,
    arXiv 2305.18290; chosen = the higher-reward response, ties masked).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, zero3: bool = False) -> None:
        super().__init__()
        self.model = model
        self.eta, self.divergence, self.rho, self.tau = cfg.eta, cfg.divergence, cfg.rho, cfg.tau
        self.w_target = cfg.w_target
        self.temperature = cfg.temperature
        self.dpo, self.beta = cfg.loss == "dpo", cfg.beta
        self.materialized = cfg.loss_impl == "materialized"
        if zero3:
            from drorebel.losses.zero3 import register_lm_head

            register_lm_head(self, model.get_output_embeddings().weight)

    def _logps(self, ids: Tensor, mask: Tensor, labels: Tensor, materialized: bool) -> Tensor:
        return sequence_logps_of(self.model, ids, mask, labels, self.temperature, materialized)

    def forward(self, ids_a: Tensor, mask_a: Tensor, labels_a: Tensor,
                ids_b: Tensor | None = None, mask_b: Tensor | None = None,
                labels_b: Tensor | None = None, ref_a: Tensor | None = None,
                ref_b: Tensor | None = None, rewards_a: Tensor | None = None,
                rewards_b: Tensor | None = None, logps_only: bool = False) -> dict[str, Tensor]:
        """The pair loss and its metrics (or only ``logps`` of the a-sequences)."""
        from drorebel.losses.rebel import rebel_loss

        if logps_only:  # reference log-probs: always the fused path
            return {"logps": self._logps(ids_a, mask_a, labels_a, False)}
        if self.divergence == "wasserstein":
            out = self._wasserstein(ids_a, mask_a, labels_a, ids_b, mask_b, labels_b,
                                    ref_a.float(), ref_b.float(), rewards_a.float(),
                                    rewards_b.float())
            ntok = (labels_a != -100).sum() + (labels_b != -100).sum()
            return {"loss": out.loss, "num_tokens": ntok, **out.metrics}
        pa = self._logps(ids_a, mask_a, labels_a, self.materialized)
        pb = self._logps(ids_b, mask_b, labels_b, self.materialized)
        if self.dpo:
            out = reward_ordered_dpo_loss(pa, pb, ref_a.float(), ref_b.float(), rewards_a.float(),
                                          rewards_b.float(), beta=self.beta)
        else:
            out = rebel_loss(pa, pb, ref_a.float(), ref_b.float(), rewards_a.float(),
                             rewards_b.float(), eta=self.eta, divergence=self.divergence,
                             rho=self.rho, tau=self.tau)
        ntok = (labels_a != -100).sum() + (labels_b != -100).sum()
        return {"loss": out.loss, "num_tokens": ntok, **out.metrics}

    def _wasserstein(self, ids_a: Tensor, mask_a: Tensor, labels_a: Tensor, ids_b: Tensor,
                     mask_b: Tensor, labels_b: Tensor, *per_pair: Tensor) -> Any:
        """``L_W = mean ℓ + ρ·sqrt(mean_i ‖∇_z ℓ_i‖²)`` (DRO-REBEL §Wasserstein, docs/design.md §1).

        z = final hidden states: one fused pass over the vocabulary gives the log-probs and the
        closed-form per-pair gradient norms; z = input embeddings: a batched double backward
        through the model (the paper's choice, slow).
        """
        from drorebel.losses.fused_rebel import fused_linear_rebel_loss
        from drorebel.losses.wasserstein import embedding_wasserstein_rebel_loss

        kw = {"eta": self.eta, "rho": self.rho, "temperature": self.temperature}
        if self.w_target == "embeddings":  # labels aligned with the logits (position t → t+1)
            return embedding_wasserstein_rebel_loss(
                self.model, ids_a, mask_a, _shift_labels(labels_a), ids_b, mask_b,
                _shift_labels(labels_b), *per_pair, **kw)
        hid_a, weight = hidden_and_head(self.model, ids_a, mask_a)
        hid_b, _ = hidden_and_head(self.model, ids_b, mask_b)
        return fused_linear_rebel_loss(weight, hid_a, labels_a[:, 1:], hid_b, labels_b[:, 1:],
                                       *per_pair, divergence="wasserstein", **kw)


def reward_ordered_dpo_loss(policy_logps_a: Tensor, policy_logps_b: Tensor, ref_logps_a: Tensor,
                            ref_logps_b: Tensor, rewards_a: Tensor, rewards_b: Tensor,
                            beta: float) -> LossOutput:
    """DPO on reward-scored pairs (arXiv 2305.18290): chosen = the response of higher reward.

    With ``c_i = a_i`` if ``r_a,i > r_b,i`` else ``b_i`` (``r`` the other one),
    ``ℓ_i = −log σ(β·[(log π_θ(c_i) − log π_ref(c_i)) − (log π_θ(r_i) − log π_ref(r_i))])`` and
    ``L = Σ_i m_i ℓ_i / Σ_i m_i`` with ``m_i = [r_a,i ≠ r_b,i]``: tied pairs carry no preference
    and contribute nothing (all ties → ``L = 0`` with zero gradient). The sums cover the *global*
    batch when ``torch.distributed`` is initialised: this rank returns
    ``world·Σ_{i local} m_i ℓ_i / Σ_{i global} m_i`` so that DDP's gradient averaging gives the
    exact single-process gradient (DPO has no coupling between pairs; one all-reduce of the
    detached counts and metric sums). Metrics (TRL names, global means over untied pairs):
    ``rewards/{chosen,rejected,margins,accuracies}`` (implicit rewards ``β(π − ref)``),
    ``logps/{chosen,rejected}``, plus ``dpo/tie_fraction``. In the trainer the log-probs come
    from the fused hidden-state path of :func:`~drorebel.losses.fused_dpo.fused_linear_dpo_loss`
    (``loss_impl="fused"``) or from materialised logits; that function itself is not called as
    it has neither the tie mask nor the global-batch scaling.
    """
    from drorebel.losses.distributed import all_reduce_sum, data_parallel_info
    from drorebel.losses.dpo import dpo_losses

    a_wins = rewards_a > rewards_b
    pc, pr = torch.where(a_wins, policy_logps_a, policy_logps_b), torch.where(
        a_wins, policy_logps_b, policy_logps_a)
    rc, rr = torch.where(a_wins, ref_logps_a, ref_logps_b), torch.where(
        a_wins, ref_logps_b, ref_logps_a)
    losses, reward_c, reward_r = dpo_losses(pc, pr, rc, rr, beta)
    untied = rewards_a != rewards_b
    m = untied.to(losses.dtype)
    losses = torch.where(untied, losses, torch.zeros_like(losses))
    rows = [torch.ones_like(m), m, losses, m * reward_c, m * reward_r,
            m * (reward_c > reward_r).to(m.dtype), m * pc.to(m.dtype), m * pr.to(m.dtype)]
    sums = all_reduce_sum(torch.stack([r.detach() for r in rows]).sum(1))
    n = sums[1].clamp_min(1.0)
    world, _ = data_parallel_info()
    loss = world * losses.sum() / n
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
             "logps/rejected")
    metrics = {k: sums[i] / n for k, i in zip(names, (3, 4, 5, 6, 7))}
    metrics["rewards/margins"] = (sums[3] - sums[4]) / n
    metrics["dpo/tie_fraction"] = 1.0 - sums[1] / sums[0]
    return LossOutput(loss=loss, metrics=metrics, weights=m.detach() / n)


def _shift_labels(labels: Tensor) -> Tensor:
    """HF labels ``[B, T]`` → labels of the logits at each position (``-100`` at the end)."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
