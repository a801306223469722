"""Model and tokenizer loading, and the loss module the engines train.

The trainer trains with the public losses: :func:`build_loss` turns the config into a
:class:`~drorebel.losses.fused_rebel.FusedLinearRebelLoss`,
:class:`~drorebel.losses.fused_dpo.FusedLinearDPOLoss` or
:class:`~drorebel.losses.wasserstein_embeddings.EmbeddingWassersteinRebelLoss`, and
:func:`wrap_model` puts it inside the forward of
:class:`~drorebel.losses.zero3.CausalLMWithFusedLoss` (where DeepSpeed ZeRO-3 gathers the
partitioned LM head).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from drorebel.losses.fused_dpo import FusedLinearDPOLoss
from drorebel.losses.fused_rebel import FusedLinearRebelLoss
from drorebel.losses.wasserstein_embeddings import EmbeddingWassersteinRebelLoss
from drorebel.losses.zero3 import CausalLMWithFusedLoss, PairLoss
from drorebel.trainer.config import TrainConfig
from drorebel.trainer.lora import lora_enabled

__all__ = ["choose_attn_implementation", "load_model", "load_tokenizer", "apply_liger",
           "build_loss", "wrap_model", "policy_module", "sequence_logps", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # label of prompt and padding positions (the data module writes it)

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


def build_loss(cfg: TrainConfig) -> PairLoss:
    """The public loss module the config asks for (the trainer has no loss of its own).

    ``loss: dpo`` → :class:`FusedLinearDPOLoss` (reward-ordered pairs, ties masked);
    ``divergence: wasserstein`` with ``w_target: embeddings`` →
    :class:`EmbeddingWassersteinRebelLoss`; otherwise :class:`FusedLinearRebelLoss`.
    ``loss_impl: materialized`` selects the full-logits path of the same losses. Inputs are
    validated when the data is loaded, so the per-step check is off (an empty sampled response
    is allowed online: its log-prob is 0).
    """
    impl = "materialized" if cfg.loss_impl == "materialized" else "auto"
    common = dict(temperature=cfg.temperature, ignore_index=IGNORE_INDEX)
    cache = dict(softmax_cache=cfg.softmax_cache)  # 0 unless fused (config validation)
    if cfg.loss == "dpo":
        return FusedLinearDPOLoss(beta=cfg.beta, impl=impl, validate=False, order_by_reward=True,
                                  **cache, **common)
    if cfg.divergence == "wasserstein" and cfg.w_target == "embeddings":
        return EmbeddingWassersteinRebelLoss(eta=cfg.eta, rho=cfg.rho, validate=False, **common)
    return FusedLinearRebelLoss(eta=cfg.eta, divergence=cfg.divergence, rho=cfg.rho,
                                tau=cfg.tau, impl=impl, validate=False, **cache, **common)


def wrap_model(model: nn.Module, cfg: TrainConfig) -> CausalLMWithFusedLoss:
    """``model`` with the configured loss inside its forward (ZeRO-3 safe: the LM head is
    registered as an external parameter when DeepSpeed is installed).

    With ``lora_r > 0`` the model is first wrapped with peft's LoRA (only the adapters train)
    and the wrapper is a :class:`~drorebel.trainer.lora.LoraCausalLMWithFusedLoss` (frozen or
    adapted LM head, see :mod:`drorebel.trainer.lora`); :func:`policy_module` gives the peft
    model."""
    if lora_enabled(cfg):
        from drorebel.trainer.lora import LoraCausalLMWithFusedLoss, apply_lora, is_peft_model

        peft_model = model if is_peft_model(model) else apply_lora(model, cfg)
        return LoraCausalLMWithFusedLoss(peft_model, build_loss(cfg))
    return CausalLMWithFusedLoss(model, build_loss(cfg))


def policy_module(wrapper: CausalLMWithFusedLoss) -> nn.Module:
    """The policy as users see it (``generate``, ``save_pretrained``): the peft model under
    LoRA, else the Hugging Face model inside ``wrapper``."""
    return wrapper.__dict__.get("peft_model", wrapper.model)


def sequence_logps(wrapper: CausalLMWithFusedLoss, ids: Tensor, mask: Tensor, labels: Tensor
                   ) -> Tensor:
    """``log π(y|x) = Σ_t log softmax(W h_t / T)[y_t]`` over the response tokens of each row
    (HF labels), fp32 ``[B]``, with the wrapper's loss settings; no grad."""
    with torch.no_grad():
        return wrapper(ids, mask, labels, logps_only=True)["logps"]
