"""Qwen3.5-MoE (`qwen3_5_moe`): HF config <-> Megatron architecture, and the weight rule table.

Language model (`model.language_model.`): a hybrid of Gated DeltaNet layers (`linear_attn.*`, Megatron-Core's
GatedDeltaNet) and gated full-attention layers (`self_attn.*`: q_proj carries each head's query and sigmoid output
gate; QK norm), per `layer_types`; every layer MoE with a softmax top-k router (renormalised), routed experts and one
shared expert scaled by a sigmoid gate (`shared_expert_gate`); zero-centred RMSNorms (x * (1 + w)) except the Gated
DeltaNet's gated output norm (plain weight); partial rotary (0.25) with interleaved multimodal sections.
MTP (`mtp.*`, not modelled by transformers): `pre_fc_norm_embedding`, `pre_fc_norm_hidden`, `fc` [H, 2H]
(embedding half first), one full-attention MoE layer `mtp.layers.0.*` and `norm`; embedding and head shared.
Vision tower (`model.visual.`): transformers' `Qwen3_5MoeVisionModel`, weights passed through, no deepstack.
Experts per expert on disk (`save_pretrained`), or fused `[E, out, in]` / `[E, in, out]` (decided from shapes).
"""

from __future__ import annotations

from typing import Any

from bridges.architecture import GPTArchitecture, MRoPE
from bridges.checkpoint import hf_config as hfc
from bridges.checkpoint import vlm_config
from bridges.models.family import Family, MTPNaming
from bridges.models.qwen3_moe import num_experts
from bridges.rules.expert_layouts import ExpertLayout
from bridges.rules.groups import (
    embeddings_and_head, gated_attention, gated_delta_net, gated_mlp, layer_norms, routed_experts, router,
)
from bridges.rules.local_params import MTP_INNER
from bridges.rules.rule import Ignore, Rule, RuleSet, same
from bridges.rules.sharding import COLUMN
from bridges.rules.vision_tower import VisionTower

MODEL_TYPE = "qwen3_5_moe"
TEXT = "model.language_model."
VISUAL = "model.visual."
# save_pretrained writes per expert; fused experts are [E, out, in] or [E, in, out] (decided from shapes)
EXPERT_LAYOUTS = (ExpertLayout.PER_EXPERT, ExpertLayout.FUSED, ExpertLayout.FUSED_IN_OUT)
DEFAULT_MROPE_SECTION = (11, 11, 10)  # transformers' default when the config has none
DEFAULT_PARTIAL_ROTARY = 0.25  # Qwen3_5MoeTextConfig's default
LINEAR, FULL = "linear_attention", "full_attention"


def architecture(config: dict[str, Any]) -> GPTArchitecture:
    """Megatron architecture (hybrid language model, mrope, vision tower spec) of an HF `qwen3_5_moe` config."""
    hfc.check_model_type(config, MODEL_TYPE)
    text = dict(hfc.require(config, "text_config"), model_type=MODEL_TYPE)
    vision = {k: v for k, v in hfc.require(config, "vision_config").items() if k != "model_type"}
    deepstack = vision.get("deepstack_visual_indexes") or []
    if deepstack:
        raise hfc.HFConfigError(f"qwen3_5_moe: deepstack_visual_indexes={deepstack} is not supported "
                                "(transformers' Qwen3.5 has none)")
    tower = VisionTower(
        "Qwen3_5MoeVisionModel", "Qwen3_5MoeVisionConfig", vision,
        image_token_id=int(hfc.require(config, "image_token_id")),
        spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
    )
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return text_architecture(text, tied, mrope=True, extra=vlm_config.extra(tower, config))


def text_architecture(text: dict[str, Any], tied: bool, mrope: bool, extra: dict | None = None) -> GPTArchitecture:
    """Megatron architecture of a Qwen3.5-MoE text config (`text_config`, or a `qwen3_5_moe_text` config alone);
    `mrope`: multimodal rotary positions (with a vision tower); text-only positions make it plain rotary."""
    refuse = lambda why: hfc.HFConfigError(f"qwen3_5_moe: {why}")  # noqa: E731
    req = lambda key: hfc.require(text, key)  # noqa: E731
    moe_ffn = int(req("moe_intermediate_size"))
    # every layer is MoE: Megatron's dense ffn size is unused
    transformer = hfc.decoder_transformer({"intermediate_size": moe_ffn, **text}, rms_norm_eps=1e-6)
    layers = transformer["num_layers"]
    if text.get("attention_bias"):
        raise refuse("attention_bias=true is not supported (Megatron cannot bias o_proj alone)")
    if text.get("attn_output_gate") is False:
        raise refuse("attn_output_gate=false is not supported (transformers' Qwen3.5 attention always gates)")
    types = list(text.get("layer_types") or [])
    if not types:
        interval = int(text.get("full_attention_interval") or 4)
        types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(layers)]
    if len(types) != layers or set(types) - {LINEAR, FULL}:
        raise refuse(f"layer_types must give {LINEAR!r} or {FULL!r} for each of the {layers} layers, got {types}")
    rope = hfc.rope_parameters({"partial_rotary_factor": DEFAULT_PARTIAL_ROTARY, **text})
    if rope["rope_type"] not in ("default", None):
        raise refuse(f"rope_type {rope['rope_type']!r} is not supported")
    if rope.get("mrope_interleaved") is False:
        raise refuse("mrope_interleaved=false is not supported (transformers' Qwen3.5 interleaves the sections)")
    mtp = int(text.get("mtp_num_hidden_layers") or 0)
    if mtp > 1:
        raise refuse(f"mtp_num_hidden_layers={mtp}: Qwen3.5 keeps one fc / norm set for all MTP layers, Megatron "
                     "one per MTP layer; only 0 or 1 is supported")
    if mtp and text.get("mtp_use_dedicated_embeddings"):
        raise refuse("mtp_use_dedicated_embeddings=true is not supported (Megatron's MTP shares the embedding)")
    if mtp and types[-1] != FULL:
        raise refuse("MTP needs the last layer to be full attention (Megatron builds the MTP layer like it)")
    aux = float(text.get("router_aux_loss_coef") or 0.0)
    transformer.update(
        add_qkv_bias=False,
        qk_layernorm=True,
        layernorm_zero_centered_gamma=True,
        attention_output_gate=True,
        experimental_attention_variant="gated_delta_net",
        linear_attention_freq=[int(t == LINEAR) for t in types],
        linear_conv_kernel_dim=int(req("linear_conv_kernel_dim")),
        linear_key_head_dim=int(req("linear_key_head_dim")),
        linear_value_head_dim=int(req("linear_value_head_dim")),
        linear_num_key_heads=int(req("linear_num_key_heads")),
        linear_num_value_heads=int(req("linear_num_value_heads")),
        num_moe_experts=num_experts(text),
        moe_ffn_hidden_size=moe_ffn,
        moe_shared_expert_intermediate_size=int(req("shared_expert_intermediate_size")),
        moe_shared_expert_gate=True,
        moe_layer_freq=[1] * layers,
        **hfc.softmax_router(int(req("num_experts_per_tok")), renormalised=True, aux_loss_coeff=aux),
    )
    return GPTArchitecture(
        transformer=transformer,
        vocab_size=int(req("vocab_size")),
        max_position_embeddings=int(text.get("max_position_embeddings", 262144)),
        rotary_percent=float(rope["partial_rotary_factor"]),
        rotary_base=float(rope["rope_theta"]),
        tie_word_embeddings=tied,
        mtp_num_layers=mtp,
        mrope=MRoPE(tuple(rope.get("mrope_section") or DEFAULT_MROPE_SECTION), interleaved=True) if mrope else None,
        extra=dict(extra or {}, mrope_section=list(rope.get("mrope_section") or DEFAULT_MROPE_SECTION)),
    )


def hf_config(arch: GPTArchitecture, source: dict[str, Any] | None = None, dtype=None) -> dict[str, Any]:
    """HF `qwen3_5_moe` config (transformers 5 style) for a Megatron architecture; `mtp_num_hidden_layers` is the
    MTP layer count of `arch`. Token ids and other fields Megatron does not model come from `source` (the import
    source's config) or else the config `arch` was made from."""
    source = source or {}
    text = text_hf_config(arch, source.get("text_config") or {})
    return vlm_config.compose(arch, source, text, "Qwen3_5MoeForConditionalGeneration", MODEL_TYPE,
                              "qwen3_5_moe_vision", dtype)


def text_hf_config(arch: GPTArchitecture, source_text: dict[str, Any]) -> dict[str, Any]:
    """The `qwen3_5_moe_text` config of the language model; fields Megatron does not model from `source_text`."""
    t = arch.transformer
    text = {k: v for k, v in source_text.items() if k not in _TEXT_LEGACY_KEYS}
    text.update(hfc.decoder_fields(arch))
    if "intermediate_size" not in source_text:
        text.pop("intermediate_size")  # Megatron's dense ffn size: no Qwen3.5 layer has one
    text.update(
        model_type="qwen3_5_moe_text",
        attention_bias=False,
        attn_output_gate=True,
        layer_types=[LINEAR if la else FULL for la in t["linear_attention_freq"]],
        linear_conv_kernel_dim=t["linear_conv_kernel_dim"],
        linear_key_head_dim=t["linear_key_head_dim"],
        linear_value_head_dim=t["linear_value_head_dim"],
        linear_num_key_heads=t["linear_num_key_heads"],
        linear_num_value_heads=t["linear_num_value_heads"],
        moe_intermediate_size=t["moe_ffn_hidden_size"],
        shared_expert_intermediate_size=t["moe_shared_expert_intermediate_size"],
        num_experts=t["num_moe_experts"],
        num_experts_per_tok=t["moe_router_topk"],
        router_aux_loss_coef=t["moe_aux_loss_coeff"],
        rope_parameters={"rope_type": "default", "rope_theta": arch.rotary_base,
                         "partial_rotary_factor": arch.rotary_percent, "mrope_section": arch.extra["mrope_section"],
                         "mrope_interleaved": True},
        mtp_num_hidden_layers=arch.mtp_num_layers,
        mtp_use_dedicated_embeddings=False,
    )
    text.pop("full_attention_interval", None)  # layer_types says it
    return text


# transformers 4 spellings replaced on export; `num_local_experts` by `num_experts`.
_TEXT_LEGACY_KEYS = hfc.LEGACY_KEYS | {"num_local_experts"}


# ---- weights: HF tensors <-> Megatron parameters -------------------------------------------------


def rules(arch: GPTArchitecture, expert_layout: ExpertLayout = ExpertLayout.PER_EXPERT, prefix: str = TEXT) -> RuleSet:
    """The complete rule table (language model under `prefix`, MTP under `mtp.`, the vision tower if any)."""
    t = arch.transformer
    hidden = t["hidden_size"]
    table, ignored = embeddings_and_head(arch, prefix)
    for layer, linear in enumerate(t["linear_attention_freq"]):
        table += _layer(t, f"decoder.layers.{layer}.", f"{prefix}layers.{layer}.", bool(linear), expert_layout)
    for i in range(arch.mtp_num_layers):
        m = f"mtp.layers.{i}."
        table += [
            same(m + "enorm.weight",           "mtp.pre_fc_norm_embedding.weight", (hidden,)),
            same(m + "hnorm.weight",           "mtp.pre_fc_norm_hidden.weight",    (hidden,)),
            same(m + "eh_proj.weight",         "mtp.fc.weight",                    (hidden, 2 * hidden), COLUMN),
            same(m + "final_layernorm.weight", "mtp.norm.weight",                  (hidden,)),
            *_layer(t, m + MTP_INNER + ".", f"mtp.layers.{i}.", False, expert_layout),
        ]
    if not arch.mtp_num_layers:
        ignored.append(Ignore(r"mtp\..*", "MTP disabled"))
    if "vision" in arch.extra:
        table += arch.extra["vision"].rules(VISUAL)
    return RuleSet(table, ignored_hf=ignored)


def _layer(t: dict, m: str, h: str, linear: bool, expert_layout: ExpertLayout) -> list[Rule]:
    """One decoder layer (Gated DeltaNet or gated attention, then MoE): Megatron names under `m`, HF under `h`."""
    hidden, experts = t["hidden_size"], t["num_moe_experts"]
    table = layer_norms(m, h, hidden)
    if linear:
        table += gated_delta_net(m + "self_attention.", h + "linear_attn.", hidden, t["linear_num_key_heads"],
                                 t["linear_num_value_heads"], t["linear_key_head_dim"], t["linear_value_head_dim"],
                                 t["linear_conv_kernel_dim"])
    else:
        table += gated_attention(m + "self_attention.", h + "self_attn.", hidden, t["num_attention_heads"],
                                 t["num_query_groups"], t["kv_channels"])
    return table + [
        *router(m + "mlp.", h + "mlp.gate.", experts, hidden),
        *gated_mlp(m + "mlp.shared_experts.", h + "mlp.shared_expert.", t["moe_shared_expert_intermediate_size"],
                   hidden),
        same(m + "mlp.shared_experts.gate_weight", h + "mlp.shared_expert_gate.weight", (1, hidden)),
        *routed_experts(m + "mlp.experts.", h + "mlp.experts.", experts, t["moe_ffn_hidden_size"], hidden,
                        expert_layout),
    ]


# MTP: one layer under `mtp.`, counted by text_config.mtp_num_hidden_layers.
FAMILY = Family(MODEL_TYPE, architecture, hf_config, rules, expert_layouts=EXPERT_LAYOUTS,
                mtp=MTPNaming("mtp_num_hidden_layers", in_text_config=True, under="mtp."))
