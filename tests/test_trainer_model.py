"""Model options: Liger-Kernel's patches are applied on CUDA and skipped (with a warning) on CPU."""

from __future__ import annotations

import pytest
import torch
from trainer_fixtures.tiny import TINY_MODEL

from drorebel.trainer.model import apply_liger, choose_attn_implementation


def _tiny_llama() -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    mc = dict(TINY_MODEL)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(mc.pop("model_type"), **mc))


def _owner(bound) -> str:
    """The class whose ``forward`` a module now runs (Liger rebinds instance methods)."""
    return getattr(bound, "__func__", bound).__qualname__.split(".")[0]


def test_liger_patches_rmsnorm_swiglu_and_rope_when_on_cuda() -> None:
    """Patching happens at the module level (no kernel runs), so it can be checked on CPU by
    declaring the device CUDA: RMSNorm and the MLP forwards become Liger's, RoPE is swapped."""
    import transformers.models.llama.modeling_llama as llama

    saved = dict(vars(llama))  # Liger patches module globals too: restore them afterwards
    model = _tiny_llama()
    try:
        assert apply_liger(model, torch.device("cuda")) is True
        layer = model.model.layers[0]
        assert _owner(layer.input_layernorm.forward) == "LigerRMSNorm"
        assert _owner(layer.post_attention_layernorm.forward) == "LigerRMSNorm"
        assert "Liger" in _owner(layer.mlp.forward)
        assert llama.apply_rotary_pos_emb is not saved["apply_rotary_pos_emb"]
    finally:
        for name, value in saved.items():
            setattr(llama, name, value)


def test_liger_is_skipped_with_a_warning_on_cpu() -> None:
    model = _tiny_llama()
    before = [_owner(m.forward) for m in model.modules()]
    with pytest.warns(UserWarning, match="needs CUDA"):
        assert apply_liger(model, torch.device("cpu")) is False
    assert [_owner(m.forward) for m in model.modules()] == before
    assert "LigerRMSNorm" not in before


def test_attention_choice() -> None:
    assert choose_attn_implementation("auto", torch.device("cpu")) == "sdpa"
    assert choose_attn_implementation("eager", torch.device("cuda")) == "eager"
