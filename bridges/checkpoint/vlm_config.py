"""The HF config of a vision-language family around its `text_config` and `vision_config`: the top-level
fields a Megatron architecture does not model (token ids, ...), carried from the config it was made from,
and the composed transformers 5 style config an export writes."""

from __future__ import annotations

from typing import Any

from bridges.checkpoint import hf_config as hfc

# Top-level fields the export writes itself (transformers_version: only the import source's, whose expert
# orientation the export keeps; a config made from scratch says nothing about it).
_WRITTEN = {"text_config", "vision_config", "architectures", "model_type", "dtype", "torch_dtype",
            "tie_word_embeddings", "transformers_version"}


def extra(tower, config: dict[str, Any]) -> dict[str, Any]:
    """`GPTArchitecture.extra` of a vision-language model: its vision tower and the carried top-level fields."""
    return {"vision": tower, "hf_fields": {k: v for k, v in config.items() if k not in _WRITTEN}}


def compose(arch, source: dict[str, Any] | None, text: dict[str, Any], architecture: str, model_type: str,
            vision_model_type: str, dtype=None) -> dict[str, Any]:
    """The whole HF config: `source`'s top-level fields (or those `arch` was made from), `text` as text_config,
    the tower's config as vision_config."""
    tower = arch.extra["vision"]
    out = {k: v for k, v in (source or arch.extra["hf_fields"]).items() if k != "torch_dtype"}
    out.update(
        architectures=[architecture],
        model_type=model_type,
        text_config=text,
        vision_config={**tower.config, "model_type": vision_model_type},
        image_token_id=tower.image_token_id,
        tie_word_embeddings=arch.tie_word_embeddings,
    )
    if dtype is not None:
        out["dtype"] = hfc.dtype_name(dtype)
    return out
