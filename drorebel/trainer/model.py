"""Model and tokenizer loading, and the per-sequence log-probs the loss needs."""

from __future__ import annotations

from typing import Any

import torch

from drorebel.trainer.config import TrainConfig

__all__ = ["choose_attn_implementation", "load_model", "load_tokenizer", "sequence_logps_of"]

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
    """``AutoModelForCausalLM`` from ``cfg.model`` (safetensors only) or from ``model_config``."""
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
    return model.to(device)


def load_tokenizer(cfg: TrainConfig) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def hidden_and_head(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states ``[B, T−1, H]`` (position t predicts token t+1) and the LM head."""
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
