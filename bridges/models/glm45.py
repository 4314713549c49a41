"""GLM-4.5 (`glm4_moe`): HF config <-> Megatron architecture.

Dense first `first_k_dense_replace` layers, then MoE layers with routed + shared experts, a sigmoid
router with expert bias (`e_score_correction_bias`) and normalised, scaled top-k, QKV bias, optional
QK norm, partial rotary (0.5) and MTP layers (`num_nextn_predict_layers`).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from bridges import hf_config as hfc
from bridges.megatron.build import GPTArchitecture

MODEL_TYPE = "glm4_moe"


def architecture(config: dict[str, Any]) -> GPTArchitecture:
    """Megatron architecture of an HF `glm4_moe` config (either config style)."""
    if config.get("model_type") != MODEL_TYPE:
        raise hfc.HFConfigError(f"expected model_type {MODEL_TYPE!r}, got {config.get('model_type')!r}")
    req = lambda key: hfc.require(config, key)  # noqa: E731
    if config.get("hidden_act", "silu") != "silu":
        raise hfc.HFConfigError(f"glm4_moe: hidden_act {config['hidden_act']!r} is not supported (silu only)")
    if not config.get("norm_topk_prob", True):
        # Megatron's sigmoid router always renormalises the top-k scores.
        raise hfc.HFConfigError("glm4_moe: norm_topk_prob=false is not supported by Megatron's sigmoid router")
    rope = hfc.rope_parameters(config)
    if rope["rope_type"] not in ("default", None):
        raise hfc.HFConfigError(f"glm4_moe: rope_type {rope['rope_type']!r} is not supported")

    num_layers = int(req("num_hidden_layers"))
    heads = int(req("num_attention_heads"))
    hidden = int(req("hidden_size"))
    num_experts = int(req("n_routed_experts"))
    first_dense = int(config.get("first_k_dense_replace", 0))
    shared = int(config.get("n_shared_experts") or 0)
    moe_ffn = int(req("moe_intermediate_size"))
    n_group = int(config.get("n_group") or 1)
    transformer = dict(
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=int(req("intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        kv_channels=int(config.get("head_dim") or hidden // heads),
        normalization="RMSNorm",
        layernorm_epsilon=float(config.get("rms_norm_eps", 1e-5)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(config.get("attention_bias", False)),
        qk_layernorm=bool(config.get("use_qk_norm", False)),
        init_method_std=float(config.get("initializer_range", 0.02)),
        num_moe_experts=num_experts,
        moe_ffn_hidden_size=moe_ffn,
        moe_shared_expert_intermediate_size=shared * moe_ffn if shared else None,
        moe_layer_freq=[0] * first_dense + [1] * (num_layers - first_dense),
        moe_router_topk=int(req("num_experts_per_tok")),
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_pre_softmax=False,
        moe_router_topk_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        moe_router_num_groups=n_group if n_group > 1 else None,
        moe_router_group_topk=int(config.get("topk_group") or 1) if n_group > 1 else None,
        # GLM-4.5 balances experts with the bias update alone (no auxiliary loss).
        moe_router_load_balancing_type="none",
        moe_router_bias_update_rate=1e-3,
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
    first_dense = t["moe_layer_freq"].index(1) if 1 in t["moe_layer_freq"] else t["num_layers"]
    shared = t.get("moe_shared_expert_intermediate_size") or 0
    out: dict[str, Any] = {k: v for k, v in (source or {}).items() if k not in _LEGACY_KEYS}
    out.update(
        architectures=["Glm4MoeForCausalLM"],
        model_type=MODEL_TYPE,
        vocab_size=arch.vocab_size,
        hidden_size=t["hidden_size"],
        intermediate_size=t["ffn_hidden_size"],
        num_hidden_layers=t["num_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_query_groups"],
        head_dim=t["kv_channels"],
        hidden_act="silu",
        max_position_embeddings=arch.max_position_embeddings,
        initializer_range=t["init_method_std"],
        rms_norm_eps=t["layernorm_epsilon"],
        tie_word_embeddings=arch.tie_word_embeddings,
        rope_parameters={
            "rope_theta": arch.rotary_base,
            "partial_rotary_factor": arch.rotary_percent,
            "rope_type": "default",
        },
        attention_bias=t["add_qkv_bias"],
        use_qk_norm=t["qk_layernorm"],
        moe_intermediate_size=t["moe_ffn_hidden_size"],
        num_experts_per_tok=t["moe_router_topk"],
        n_shared_experts=shared // t["moe_ffn_hidden_size"],
        n_routed_experts=t["num_moe_experts"],
        routed_scaling_factor=t["moe_router_topk_scaling_factor"],
        n_group=t.get("moe_router_num_groups") or 1,
        topk_group=t.get("moe_router_group_topk") or 1,
        first_k_dense_replace=first_dense,
        norm_topk_prob=True,
        num_nextn_predict_layers=arch.mtp_num_layers,
    )
    if dtype is not None:
        out["dtype"] = hfc.dtype_name(dtype)
    return out


# transformers 4 spellings replaced by `rope_parameters` / `dtype` on export.
_LEGACY_KEYS = {"rope_theta", "partial_rotary_factor", "rope_scaling", "torch_dtype"}
