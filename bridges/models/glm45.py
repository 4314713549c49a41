"""GLM-4.5 (`glm4_moe`): HF config <-> Megatron architecture, and the weight rule table.

Dense first `first_k_dense_replace` layers, then MoE layers with routed + shared experts, a sigmoid
router with expert bias (`e_score_correction_bias`) and normalised, scaled top-k, QKV bias, optional
QK norm, partial rotary (0.5) and MTP layers (`num_nextn_predict_layers`).
"""

from __future__ import annotations

from typing import Any

import torch

from bridges.architecture import GPTArchitecture
from bridges.checkpoint import hf_config as hfc
from bridges.models.family import Family, MTPNaming
from bridges.rules.expert_layouts import ExpertLayout
from bridges.rules.groups import attention, decoder_with_trailing_mtp, gated_mlp, layer_norms, routed_experts, router
from bridges.rules.rule import Rule, RuleSet

MODEL_TYPE = "glm4_moe"


def architecture(config: dict[str, Any]) -> GPTArchitecture:
    """Megatron architecture of an HF `glm4_moe` config (either config style)."""
    req = lambda key: hfc.require(config, key)  # noqa: E731
    transformer, rope = hfc.decoder_preamble(config, MODEL_TYPE, rms_norm_eps=1e-5)
    transformer.update(
        add_qkv_bias=bool(config.get("attention_bias", False)),
        qk_layernorm=bool(config.get("use_qk_norm", False)),
        **hfc.sigmoid_moe(config, transformer["num_layers"]),
        # GLM-4.5 balances experts with the bias update alone (no auxiliary loss).
        moe_router_load_balancing_type="none",
    )
    return GPTArchitecture(
        transformer=transformer,
        vocab_size=int(req("vocab_size")),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        rotary_percent=float(rope["partial_rotary_factor"]),
        rotary_base=float(rope["rope_theta"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        mtp_num_layers=int(config.get("num_nextn_predict_layers") or 0),
    )


def hf_config(arch: GPTArchitecture, source: dict[str, Any] | None = None, dtype=None) -> dict[str, Any]:
    """HF `glm4_moe` config (transformers 5 style) for a Megatron architecture.

    Fields Megatron does not model (token ids, tokenizer facts) come from `source`, the import
    source's config, when there is one. `num_nextn_predict_layers` is the MTP layer count of `arch`.
    """
    t = arch.transformer
    out = hfc.decoder_config(arch, source, dtype)
    out.update(
        architectures=["Glm4MoeForCausalLM"],
        model_type=MODEL_TYPE,
        rope_parameters={
            "rope_theta": arch.rotary_base,
            "partial_rotary_factor": arch.rotary_percent,
            "rope_type": "default",
        },
        attention_bias=t["add_qkv_bias"],
        use_qk_norm=t["qk_layernorm"],
        **hfc.sigmoid_moe_fields(arch),
        num_nextn_predict_layers=arch.mtp_num_layers,
    )
    return out


# ---- weights: HF tensors <-> Megatron parameters -------------------------------------------------


def rules(arch: GPTArchitecture, expert_layout: ExpertLayout = ExpertLayout.PER_EXPERT, prefix: str = "model."
          ) -> RuleSet:
    """The complete rule table of a GLM-4.5 model built as `arch` (global names, every layer).
    `prefix`: where the HF decoder lives (GLM-4.5V: `model.language_model.`); `lm_head` stays top level."""
    s = _Shapes(arch)
    moe_layer = arch.transformer["moe_layer_freq"]
    table, ignored = decoder_with_trailing_mtp(
        arch, prefix, lambda m, h, i: _layer(s, m, h, moe_layer[i], expert_layout))
    return RuleSet(table, ignored_hf=ignored)


def _layer(s: "_Shapes", m: str, h: str, moe: bool, expert_layout: ExpertLayout) -> list[Rule]:
    """One decoder layer: Megatron names under prefix `m`, HF names under prefix `h`."""
    t = s.transformer
    table = [
        *layer_norms(m, h, t["hidden_size"]),
        *attention(m + "self_attention.", h + "self_attn.", t["hidden_size"], t["num_attention_heads"],
                   t["num_query_groups"], t["kv_channels"], bias=t["add_qkv_bias"], qk_norm=t["qk_layernorm"]),
    ]
    if not moe:
        return table + gated_mlp(m + "mlp.", h + "mlp.", t["ffn_hidden_size"], t["hidden_size"])
    # transformers keeps the router in fp32 (_keep_in_fp32_modules_strict) and saves it so; the expert bias is a
    # buffer in Megatron, fp32 on both sides (hub checkpoints store it as F32).
    table += router(m + "mlp.", h + "mlp.gate.", s.experts, t["hidden_size"], expert_bias="e_score_correction_bias",
                    also_accepts=(torch.float32,))
    if s.shared:
        table += gated_mlp(m + "mlp.shared_experts.", h + "mlp.shared_experts.", s.shared, t["hidden_size"])
    return table + routed_experts(m + "mlp.experts.", h + "mlp.experts.", s.experts, t["moe_ffn_hidden_size"],
                                  t["hidden_size"], expert_layout)


class _Shapes:
    """HF tensor shapes of a GLM-4.5 architecture."""

    def __init__(self, arch: GPTArchitecture):
        self.transformer = t = arch.transformer
        self.experts = t["num_moe_experts"]
        self.shared = t.get("moe_shared_expert_intermediate_size")


FAMILY = Family(MODEL_TYPE, architecture, hf_config, rules,
                expert_layouts=(ExpertLayout.PER_EXPERT, ExpertLayout.FUSED),
                mtp=MTPNaming("num_nextn_predict_layers", after_decoder="model."))
