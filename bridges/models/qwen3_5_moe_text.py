"""Qwen3.5-MoE language model alone (`qwen3_5_moe_text`, transformers' `Qwen3_5MoeForCausalLM`): the decoder of
bridges/models/qwen3_5_moe.py under `model.`, `lm_head`, MTP under `mtp.`, no vision tower. Text-only positions
make its multimodal rotary plain rotary (the same position on every axis)."""

from __future__ import annotations

from typing import Any

from bridges.checkpoint import hf_config as hfc
from bridges.architecture import GPTArchitecture
from bridges.models import qwen3_5_moe
from bridges.models.qwen3_5_moe import EXPERT_LAYOUTS, expert_layout_of  # noqa: F401 - the family interface
from bridges.rules.groups import PER_EXPERT
from bridges.rules.rule import RuleSet

MODEL_TYPE = "qwen3_5_moe_text"


def architecture(config: dict[str, Any]) -> GPTArchitecture:
    if config.get("model_type") != MODEL_TYPE:
        raise hfc.HFConfigError(f"expected model_type {MODEL_TYPE!r}, got {config.get('model_type')!r}")
    return qwen3_5_moe.text_architecture(config, bool(config.get("tie_word_embeddings", False)), mrope=False)


def hf_config(arch: GPTArchitecture, source: dict[str, Any] | None = None, dtype=None) -> dict[str, Any]:
    """HF `qwen3_5_moe_text` config (transformers 5 style); `mtp_num_hidden_layers` is the MTP layer count of `arch`."""
    out = qwen3_5_moe.text_hf_config(arch, {k: v for k, v in (source or {}).items() if k != "torch_dtype"})
    out.update(architectures=["Qwen3_5MoeForCausalLM"], model_type=MODEL_TYPE)
    if dtype is not None:
        out["dtype"] = hfc.dtype_name(dtype)
    return out


def rules(arch: GPTArchitecture, expert_layout: str = PER_EXPERT) -> RuleSet:
    return qwen3_5_moe.rules(arch, expert_layout, prefix="model.")

