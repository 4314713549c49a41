"""Model families: one module each, holding config translation and the weight rule table."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from bridges.checkpoint.hf_config import HFConfigError
from bridges.models import glm45, glm45v, gpt_oss, qwen3_5_moe, qwen3_5_moe_text, qwen3_moe, qwen3_vl_moe

FAMILIES: dict[str, ModuleType] = {
    family.MODEL_TYPE: family for family in (glm45, gpt_oss, qwen3_moe, qwen3_vl_moe, glm45v, qwen3_5_moe, qwen3_5_moe_text)
}


def family_for(config: dict[str, Any]) -> ModuleType:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise HFConfigError(f"model_type {model_type!r} is not supported (supported: {sorted(FAMILIES)})")
    return FAMILIES[model_type]


def family_module(family: str | ModuleType) -> ModuleType:
    """A family given by module or by HF model_type."""
    if isinstance(family, ModuleType):
        return family
    return family_for({"model_type": family})
