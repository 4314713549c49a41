"""Qwen3.5-MoE language model alone (`qwen3_5_moe_text`, transformers' `Qwen3_5MoeForCausalLM`): the decoder of
bridges/models/qwen3_5_moe.py under `model.`, `lm_head`, MTP under `mtp.`, no vision tower. Text-only positions
make its multimodal rotary plain rotary (the same position on every axis)."""

from __future__ import annotations

from typing import Any

from bridges.architecture import GPTArchitecture
from bridges.checkpoint import hf_config as hfc
from bridges.models import qwen3_5_moe
from bridges.models.family import Family, MTPNaming
from bridges.rules.expert_layouts import ExpertLayout
from bridges.rules.rule import RuleSet

MODEL_TYPE = "qwen3_5_moe_text"


def architecture(config: dict[str, Any]) -> GPTArchitecture:
    hfc.check_model_type(config, MODEL_TYPE)
    return qwen3_5_moe.text_architecture(config, bool(config.get("tie_word_embeddings", False)), mrope=False)


def hf_config(arch: GPTArchitecture, source: dict[str, Any] | None = None, dtype=None) -> dict[str, Any]:
    """HF `qwen3_5_moe_text` config (transformers 5 style); `mtp_num_hidden_layers` is the MTP layer count of `arch`."""
    out = qwen3_5_moe.text_hf_config(arch, {k: v for k, v in (source or {}).items() if k != "torch_dtype"})
    out.update(architectures=["Qwen3_5MoeForCausalLM"], model_type=MODEL_TYPE)
    if dtype is not None:
        out["dtype"] = hfc.dtype_name(dtype)
    return out


def rules(arch: GPTArchitecture, expert_layout: ExpertLayout = ExpertLayout.PER_EXPERT) -> RuleSet:
    return qwen3_5_moe.rules(arch, expert_layout, prefix="model.")


FAMILY = Family(MODEL_TYPE, architecture, hf_config, rules, expert_layouts=qwen3_5_moe.EXPERT_LAYOUTS,
                mtp=MTPNaming("mtp_num_hidden_layers", under="mtp."))

