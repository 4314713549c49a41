"""GLM-4.5V (`glm4v_moe`): HF config <-> Megatron architecture, and the weight rule table.

Language model (`model.language_model.`): the GLM-4.5 decoder (bridges/models/glm45.py: dense first layers,
sigmoid router with expert bias, shared experts, QKV bias, partial rotary 0.5), with multimodal rotary in
contiguous sections (`mrope_section`, Megatron-Core's own `mrope`). Experts per expert on disk (hub and
`save_pretrained`), or fused `[E, out, in]`. Vision tower (`model.visual.`): transformers' `Glm4vMoeVisionModel`,
weights passed through. MTP layers of the source are not built (ignored with a reason): Megatron's MTP block
would embed image placeholder tokens as text, which no GLM-4.5V server does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from bridges.architecture import GPTArchitecture, MRoPE
from bridges.checkpoint import hf_config as hfc
from bridges.checkpoint import vlm_config
from bridges.models import glm45
from bridges.models.family import Family, MTPNaming
from bridges.rules.expert_layouts import ExpertLayout
from bridges.rules.rule import RuleSet
from bridges.rules.vision_tower import VisionTower

MODEL_TYPE = "glm4v_moe"
TEXT = "model.language_model."
VISUAL = "model.visual."
DEFAULT_MROPE_SECTION = (8, 12, 12)  # transformers' default when the config has none
DEFAULT_PARTIAL_ROTARY = 0.5  # Glm4vMoeTextConfig's default


def architecture(config: dict[str, Any]) -> GPTArchitecture:
    """Megatron architecture (GLM-4.5 language model, mrope, vision tower spec) of an HF `glm4v_moe` config."""
    hfc.check_model_type(config, MODEL_TYPE)
    text = hfc.require(config, "text_config")
    vision = {k: v for k, v in hfc.require(config, "vision_config").items() if k != "model_type"}
    text = {"partial_rotary_factor": DEFAULT_PARTIAL_ROTARY, **text,
            "model_type": glm45.MODEL_TYPE, "num_nextn_predict_layers": 0}
    # pre-v5 configs keep tie_word_embeddings in text_config; transformers 5 reads the top level.
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    text["tie_word_embeddings"] = tied
    rope = hfc.rope_parameters(text)
    tower = VisionTower(
        "Glm4vMoeVisionModel", "Glm4vMoeVisionConfig", vision,
        image_token_id=int(hfc.require(config, "image_token_id")),
        spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
    )
    return replace(
        glm45.architecture(text),
        mrope=MRoPE(tuple(rope.get("mrope_section") or DEFAULT_MROPE_SECTION)),
        extra=vlm_config.extra(tower, config),
    )


def hf_config(arch: GPTArchitecture, source: dict[str, Any] | None = None, dtype=None) -> dict[str, Any]:
    """HF `glm4v_moe` config (transformers 5 style). Token ids and other fields Megatron does not model come
    from `source` (the import source's config) or else the config `arch` was made from."""
    source = source or {}
    source_text = source.get("text_config") or {}
    text = glm45.hf_config(arch, source_text)
    for key in ("architectures", "dtype", "num_nextn_predict_layers", "use_qk_norm"):
        if key not in source_text:
            text.pop(key, None)  # GLM-4.5 fields a glm4v_moe text config does not have
    text.update(model_type="glm4v_moe_text")
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": list(arch.mrope.section)}
    return vlm_config.compose(arch, source, text, "Glm4vMoeForConditionalGeneration", MODEL_TYPE, "glm4v_moe_vision",
                              dtype)


def rules(arch: GPTArchitecture, expert_layout: ExpertLayout = ExpertLayout.PER_EXPERT) -> RuleSet:
    """The complete rule table (GLM-4.5 language model under `model.language_model.`, vision tower)."""
    text = glm45.rules(arch, expert_layout, prefix=TEXT)
    return RuleSet(text.rules + arch.extra["vision"].rules(VISUAL), text.ignored_hf, text.ignored_megatron)


# The source's MTP layers are never built (see above) but an MTP passthrough carries them: they follow the
# language model's layers, counted in text_config.
FAMILY = Family(MODEL_TYPE, architecture, hf_config, rules, expert_layouts=glm45.FAMILY.expert_layouts,
                mtp=MTPNaming("num_nextn_predict_layers", in_text_config=True, after_decoder=TEXT))
