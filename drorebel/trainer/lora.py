"""LoRA adapters (peft) for the trainer: wrap the policy, keep the fused head exact, save.

With ``lora_r > 0`` the loaded causal LM is wrapped with peft's LoRA
(:func:`apply_lora`); only the adapter matrices train, every base weight stays frozen and
bit-identical. The loss still runs through
:class:`~drorebel.losses.zero3.CausalLMWithFusedLoss`: :class:`LoraCausalLMWithFusedLoss`
gives it the HF model that peft modified in place (decoder → final hidden states) and the LM
head weight the fused loss must use:

* frozen head (the default: ``all-linear`` never adapts the output layer): the head's own
  weight ``W``, as without LoRA;
* adapted head (``lm_head`` listed in ``lora_target_modules``): the effective weight
  ``W + Σ_adapters scale·B·A`` built in the forward, so the fused loss (which reads a weight
  matrix, not a module) sees the adapted head and its gradient reaches ``A`` and ``B``. The
  head's ``lora_dropout`` does not apply on this path (the merged weight has no dropout);
  under ZeRO-3 ``A`` and ``B`` are registered as external parameters of the wrapper like ``W``.

Reference log-probs of the initial policy come from the same model with the adapter disabled
(:func:`adapter_disabled`, peft's ``disable_adapter``): with ``B = 0`` at the start that is
exactly the initial policy, without a second copy of the model.

Saving: a checkpoint holds the adapter (``adapter_config.json``, ``adapter_model.safetensors``,
peft's format) instead of ``model.safetensors``; the base weights are re-created from
``model`` / ``model_config`` (the config fingerprint pins them). ``final/`` holds the adapter
and, with ``lora_save_merged``, ``final/merged/``: whole weights ``W + scale·B·A`` that load
with ``AutoModelForCausalLM.from_pretrained``. They go to a subfolder because transformers,
finding ``adapter_config.json`` beside a full model, would apply the adapter a second time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any

import torch
from torch import Tensor, nn

from drorebel.losses.zero3 import CausalLMWithFusedLoss, PairLoss, register_lm_head
from drorebel.trainer.errors import CheckpointError, ConfigError

__all__ = ["lora_enabled", "peft_available", "apply_lora", "LoraCausalLMWithFusedLoss",
           "is_peft_model", "adapter_disabled", "save_adapter", "load_adapter",
           "merged_state_dict", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "MERGED_DIR",
           "ALL_LINEAR"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_DIR = "merged"  # final/merged: whole merged weights (lora_save_merged)
ALL_LINEAR = "all-linear"  # peft: every linear layer except the output layer


def lora_enabled(cfg: Any) -> bool:
    """Whether the config asks for LoRA (``lora_r`` > 0)."""
    return bool(getattr(cfg, "lora_r", None))


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def apply_lora(model: nn.Module, cfg: Any) -> nn.Module:
    """``peft.get_peft_model(model, LoraConfig(...))`` from the config's ``lora_*`` fields.

    The base weights are frozen; ``lora_A`` is initialised from torch's global RNG (seeded by
    the trainer), ``lora_B`` with zeros, so the wrapped model starts as the base model. A
    target name that matches no module is a :class:`ConfigError`."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules if cfg.lora_target_modules is not None else ALL_LINEAR
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r
    config = LoraConfig(r=cfg.lora_r, lora_alpha=alpha, lora_dropout=cfg.lora_dropout or 0.0,
                        target_modules=targets, task_type="CAUSAL_LM", bias="none")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"`lora_target_modules`={targets!r}: {first}") from None


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def adapter_disabled(model: Any) -> contextlib.AbstractContextManager:
    """peft's ``disable_adapter()`` for a peft model (the base model's outputs), else a no-op."""
    return model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _head_adapters(head: nn.Module) -> list[str]:
    """The adapters that currently change ``head``'s output (none when disabled or merged)."""
    if not _is_lora_layer(head) or head.disable_adapters or head.merged:
        return []
    return [a for a in head.active_adapters if a in head.lora_A]


class LoraCausalLMWithFusedLoss(CausalLMWithFusedLoss):
    """:class:`CausalLMWithFusedLoss` around a peft LoRA model.

    ``self.model`` is the Hugging Face model inside ``peft_model`` (LoRA layers injected in
    place), so the decoder, the parameters and the state-dict keys are those of the HF model;
    ``peft_model`` (for ``generate``, ``disable_adapter`` and ``save_pretrained``) is kept
    without registering it as a submodule (its parameters would be listed twice). When the LM
    head carries a LoRA adapter, :attr:`lm_head_weight` is the effective weight
    ``W + scale·B·A`` (``W`` alone while the adapter is disabled)."""

    def __init__(self, peft_model: nn.Module, loss: PairLoss) -> None:
        super().__init__(peft_model.get_base_model(), loss)  # registers W with ZeRO-3
        self.__dict__["peft_model"] = peft_model
        head = self.model.get_output_embeddings()
        self.adapted_head = _is_lora_layer(head)
        if self.adapted_head:
            for name in head.active_adapters:
                if name in head.lora_A:
                    register_lm_head(self, head.lora_A[name].weight)
                    register_lm_head(self, head.lora_B[name].weight)

    @property
    def lm_head_weight(self) -> Tensor:
        head = self.model.get_output_embeddings()
        weight = head.weight  # a LoRA layer's is its base layer's
        if not self.__dict__.get("adapted_head", False):
            return weight
        for name in _head_adapters(head):
            weight = weight + head.get_delta_weight(name).to(weight.dtype)
        return weight


def save_adapter(peft_model: nn.Module, path: str, state_dict: dict[str, Tensor] | None = None
                 ) -> None:
    """The adapter in peft's format: ``path/adapter_config.json`` and
    ``path/adapter_model.safetensors`` (``state_dict``: the full state dict of the peft model,
    e.g. gathered from ZeRO-3 partitions; default: the live parameters)."""
    # the frozen base weights stay out (peft would add a targeted lm_head's whole weight)
    peft_model.save_pretrained(path, state_dict=state_dict, safe_serialization=True,
                               save_embedding_layers=False)


def load_adapter(peft_model: nn.Module, path: str) -> None:
    """Load the adapter saved by :func:`save_adapter` into ``peft_model`` (exact values); a
    file that lacks an adapter tensor of the model, or holds one it does not have, is a
    :class:`CheckpointError`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    res = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in res.missing_keys if "lora_" in k]
    if missing or res.unexpected_keys:
        what = (f"lacks {missing[0]}" if missing else f"has the unknown tensor "
                f"{res.unexpected_keys[0]}")
        raise CheckpointError(f"{path!r}: the adapter {what} (another lora_r / "
                              "lora_target_modules?)")


def merged_state_dict(peft_model: nn.Module, state: dict[str, Tensor] | None = None
                      ) -> dict[str, Tensor]:
    """The HF model's state dict with every LoRA layer merged: ``W + scale·B·A`` under the
    plain key (``…q_proj.weight``), adapter tensors dropped. ``state``: the HF model's full
    state dict (keys as ``peft_model.get_base_model().state_dict()``); default: the live one.
    The model is not modified (peft's ``merge_and_unload`` would replace its layers)."""
    inner = peft_model.get_base_model()
    if state is None:
        state = {k: v.detach() for k, v in inner.state_dict().items()}
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, value in state.items():
            if ".lora_" in key:
                continue
            prefix, sep, rest = key.partition(".base_layer.")
            if not sep:
                out[key] = value
                continue
            if rest == "weight":
                value = value + _delta(inner.get_submodule(prefix), prefix, state, value)
            out[f"{prefix}.{rest}"] = value
    return out


def _delta(layer: nn.Module, prefix: str, state: dict[str, Tensor], weight: Tensor) -> Tensor:
    """``Σ_adapters scale·B·A`` of LoRA ``layer`` in ``weight``'s layout, from ``state``."""
    total = torch.zeros_like(weight, dtype=torch.float32)
    for name in layer.active_adapters:
        if name in getattr(layer, "lora_A", {}):
            a = state[f"{prefix}.lora_A.{name}.weight"].float()
            b = state[f"{prefix}.lora_B.{name}.weight"].float()
            d = b @ a
            d = d.T if getattr(layer, "fan_in_fan_out", False) else d
        elif name in getattr(layer, "lora_embedding_A", {}):
            a = state[f"{prefix}.lora_embedding_A.{name}"].float()
            b = state[f"{prefix}.lora_embedding_B.{name}"].float()
            d = (b @ a).T
        else:
            continue
        if d.shape != weight.shape:
            raise ValueError(f"cannot merge the LoRA adapter of {prefix} ({type(layer).__name__})"
                             f": delta {tuple(d.shape)} vs weight {tuple(weight.shape)}")
        total += d * layer.scaling[name]
    return total.to(weight.dtype)

