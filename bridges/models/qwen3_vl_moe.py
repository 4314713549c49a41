"""Qwen3-VL-MoE (`qwen3_vl_moe`): HF config <-> Megatron architecture, and the weight rule table.

Language model (`model.language_model.`): Qwen3-MoE-shaped decoder (QK norm, no biases, softmax top-k router
with renormalised top-k, routed experts only, dense layers per `mlp_only_layers` / `decoder_sparse_step`) with
interleaved multimodal rotary (`mrope_section`). Experts are fused: released checkpoints store them
`[E, in, out]` (`gate_up_proj` [E, H, 2I], gate then up; `down_proj` [E, I, H]), transformers 5
`save_pretrained` writes `[E, out, in]`; both import, and export keeps the import source's orientation.
Vision tower (`model.visual.`): transformers' `Qwen3VLMoeVisionModel`, weights passed through, deepstack
features added after the first `len(deepstack_visual_indexes)` decoder layers.
"""

from __future__ import annotations

from typing import Any

from bridges.checkpoint import hf_config as hfc
from bridges.checkpoint import vlm_config
from bridges.architecture import GPTArchitecture, MRoPE
from bridges.models import qwen3_moe
from bridges.models.qwen3_moe import moe_layer_pattern, num_experts
from bridges.models.family import Family
from bridges.rules.expert_layouts import ExpertLayout
from bridges.rules.rule import RuleSet
from bridges.rules.vision_tower import VisionTower

MODEL_TYPE = "qwen3_vl_moe"
TEXT = "model.language_model."
VISUAL = "model.visual."
# Released checkpoints store experts [E, in, out] (the default), transformers 5 save_pretrained [E, out, in].
EXPERT_LAYOUTS = (ExpertLayout.FUSED_IN_OUT, ExpertLayout.FUSED)
DEFAULT_MROPE_SECTION = (24, 20, 20)  # transformers' default when the config has none
DEFAULT_DEEPSTACK = (8, 16, 24)


def architecture(config: dict[str, Any]) -> GPTArchitecture:
    """Megatron architecture (language model + vision tower spec) of an HF `qwen3_vl_moe` config."""
    hfc.check_model_type(config, MODEL_TYPE)
    refuse = lambda why: hfc.HFConfigError(f"qwen3_vl_moe: {why}")  # noqa: E731
    text = dict(hfc.require(config, "text_config"), model_type=MODEL_TYPE)
    vision = {k: v for k, v in hfc.require(config, "vision_config").items() if k != "model_type"}
    transformer = hfc.decoder_transformer(text, rms_norm_eps=1e-6)
    if text.get("attention_bias"):
        raise refuse("attention_bias=true is not supported (Megatron cannot bias o_proj alone)")
    rope = hfc.rope_parameters(text)
    if rope["rope_type"] not in ("default", None) or float(rope["partial_rotary_factor"]) != 1.0:
        raise refuse(f"rope {rope} is not supported (default rope over the whole head only)")
    experts = num_experts(text)
    pattern = moe_layer_pattern(text, transformer["num_layers"])
    aux = float(_aux_loss_coef(text))
    transformer.update(
        add_qkv_bias=False,
        qk_layernorm=True,
        num_moe_experts=experts,
        moe_ffn_hidden_size=int(hfc.require(text, "moe_intermediate_size")),
        moe_layer_freq=pattern,
        **hfc.softmax_router(int(hfc.require(text, "num_experts_per_tok")), renormalised=True, aux_loss_coeff=aux),
    )
    tower = VisionTower(
        "Qwen3VLMoeVisionModel", "Qwen3VLMoeVisionConfig", vision,
        image_token_id=int(hfc.require(config, "image_token_id")),
        spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
        deepstack_layers=len(vision.get("deepstack_visual_indexes", DEFAULT_DEEPSTACK)),
    )
    return GPTArchitecture(
        transformer=transformer,
        vocab_size=int(hfc.require(text, "vocab_size")),
        max_position_embeddings=int(text.get("max_position_embeddings", 128000)),
        rotary_base=float(rope["rope_theta"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        mrope=MRoPE(tuple(rope.get("mrope_section") or DEFAULT_MROPE_SECTION), interleaved=True),
        extra=vlm_config.extra(tower, config),
    )


def hf_config(arch: GPTArchitecture, source: dict[str, Any] | None = None, dtype=None) -> dict[str, Any]:
    """HF `qwen3_vl_moe` config (transformers 5 style) for a Megatron architecture. Token ids and other fields
    Megatron does not model come from `source` (the import source's config) or else the config `arch` was
    made from; `transformers_version` only from `source`, whose expert orientation the export keeps."""
    t = arch.transformer
    source = source or {}
    pattern = t["moe_layer_freq"]
    text = {k: v for k, v in (source.get("text_config") or {}).items() if k not in _TEXT_LEGACY_KEYS}
    text.update(hfc.decoder_fields(arch))
    text.update(
        model_type="qwen3_vl_moe_text",
        rope_parameters={"rope_type": "default", "rope_theta": arch.rotary_base,
                         "mrope_section": list(arch.mrope.section), "mrope_interleaved": True},
        attention_bias=False,
        moe_intermediate_size=t["moe_ffn_hidden_size"],
        num_experts=t["num_moe_experts"],
        num_experts_per_tok=t["moe_router_topk"],
        router_aux_loss_coef=t["moe_aux_loss_coeff"],
        decoder_sparse_step=1,
        mlp_only_layers=[i for i, moe in enumerate(pattern) if not moe],
    )
    return vlm_config.compose(arch, source, text, "Qwen3VLMoeForConditionalGeneration", MODEL_TYPE,
                              "qwen3_vl_moe_vision", dtype)


# transformers 4 spellings replaced on export; `num_local_experts` by `num_experts` (read by every release).
_TEXT_LEGACY_KEYS = hfc.LEGACY_KEYS | {"num_local_experts"}


# ---- weights: HF tensors <-> Megatron parameters -------------------------------------------------


def rules(arch: GPTArchitecture, expert_layout: ExpertLayout = ExpertLayout.FUSED_IN_OUT) -> RuleSet:
    """The complete rule table (language model, vision tower) of a Qwen3-VL-MoE model built as `arch`.
    `expert_layout`: [E, in, out] (released checkpoints, the default) or [E, out, in] (transformers 5
    save_pretrained)."""
    table, ignored = qwen3_moe.language_model_rules(arch, TEXT, expert_layout)
    table += arch.extra["vision"].rules(VISUAL)
    return RuleSet(table, ignored_hf=ignored)


# transformers' default when a config omits `router_aux_loss_coef`.
DEFAULT_AUX_LOSS_COEF = 0.001


def _aux_loss_coef(config: dict) -> float:
    value = config.get("router_aux_loss_coef")
    return DEFAULT_AUX_LOSS_COEF if value is None else float(value)


# Each fused tensor's shape tells its orientation; a square one is decided by transformers_version (said in a note).
FAMILY = Family(MODEL_TYPE, architecture, hf_config, rules, expert_layouts=EXPERT_LAYOUTS)
