"""DeepSeek-V3 (`deepseek_v3`): HF config <-> Megatron architecture, and the weight rule table.

Multi-latent attention (low-rank query and key/value projections with their own RMSNorms, a decoupled rotary
part shared by all heads) on Megatron-Core's MLATransformerConfig; dense first `first_k_dense_replace`
layers, then MoE layers with routed + shared experts, a sigmoid router with expert bias
(`e_score_correction_bias`), grouped, normalised and scaled top-k; MTP layers (`num_nextn_predict_layers`)
stored at layer `num_hidden_layers + i` as GLM-4.5 stores them.

Megatron parameter names and tensor-parallel splits are those of Megatron-Core's local layer spec (the down
projections split over TP, separate q/kv norms); Transformer Engine's MLA spec (norms fused into the up projections,
down projections replicated) is not mapped.
"""

from __future__ import annotations

from typing import Any

import torch

from bridges.architecture import GPTArchitecture, YarnScaling
from bridges.checkpoint import hf_config as hfc
from bridges.models.family import Family, MTPNaming
from bridges.rules.expert_layouts import ExpertLayout
from bridges.rules.groups import decoder_with_trailing_mtp, gated_mlp, layer_norms, routed_experts, router
from bridges.rules.rule import Rule, RuleSet, same
from bridges.rules.sharding import COLUMN, ROW

MODEL_TYPE = "deepseek_v3"


def architecture(config: dict[str, Any]) -> GPTArchitecture:
    """Megatron architecture of an HF `deepseek_v3` config (either config style)."""
    hfc.check_model_type(config, MODEL_TYPE)
    _refuse_what_megatron_lacks(config)
    req = lambda key: hfc.require(config, key)  # noqa: E731
    transformer = hfc.decoder_transformer(config, rms_norm_eps=1e-6)
    heads = transformer["num_attention_heads"]
    nope, rope_dim = int(req("qk_nope_head_dim")), int(req("qk_rope_head_dim"))
    q_lora = config.get("q_lora_rank")
    transformer.update(
        # Every head reads the whole latent key/value (num_key_value_heads does not apply to MLA).
        num_query_groups=heads,
        kv_channels=nope + rope_dim,
        multi_latent_attention=True,
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(req("kv_lora_rank")),
        qk_head_dim=nope,
        qk_pos_emb_head_dim=rope_dim,
        v_head_dim=int(req("v_head_dim")),
        # The query and key/value latents' RMSNorms (built by the layer spec only with this switch).
        qk_layernorm=True,
        **hfc.sigmoid_moe(config, transformer["num_layers"]),
        # DeepSeek-V3 balances experts by the bias update, plus a small sequence-wise auxiliary loss.
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=1e-4,
    )
    rope = hfc.rope_parameters(config)
    return GPTArchitecture(
        transformer=transformer,
        vocab_size=int(req("vocab_size")),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        rotary_base=float(rope["rope_theta"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        mtp_num_layers=int(config.get("num_nextn_predict_layers") or 0),
        yarn=_yarn(rope) if rope["rope_type"] == "yarn" else None,
    )


def _refuse_what_megatron_lacks(config: dict[str, Any]) -> None:
    """One-line errors naming the config key whose value Megatron's MLA / router cannot reproduce."""

    def refuse(key: str, why: str):
        raise hfc.HFConfigError(f"deepseek_v3: {key}={config[key]!r} is not supported ({why})")

    if config.get("quantization_config"):
        refuse("quantization_config", "quantised weights; convert the checkpoint to bf16 first")
    if config.get("scoring_func", "sigmoid") != "sigmoid":
        refuse("scoring_func", "only the sigmoid router with expert bias is mapped")
    if config.get("topk_method", "noaux_tc") != "noaux_tc":
        refuse("topk_method", "Megatron's grouped top-k is the bias-corrected 'noaux_tc'")
    if config.get("moe_layer_freq", 1) != 1:
        refuse("moe_layer_freq", "transformers makes every layer after first_k_dense_replace an MoE layer")
    if not config.get("rope_interleave", True):
        refuse("rope_interleave", "Megatron's multi-latent attention rotates interleaved pairs")
    if config.get("attention_bias", False):
        refuse("attention_bias", "Megatron's multi-latent attention projections have no bias")
    rope = hfc.rope_parameters(config)
    if rope["rope_type"] not in ("default", "yarn"):
        raise hfc.HFConfigError(f"deepseek_v3: rope_type {rope['rope_type']!r} is not supported (default, yarn)")
    if float(rope["partial_rotary_factor"]) != 1.0:
        raise hfc.HFConfigError("deepseek_v3: partial_rotary_factor is not supported (qk_rope_head_dim is the rotary "
                                "part)")
    if rope["rope_type"] == "yarn":
        if rope.get("truncate", True) is not True:
            raise hfc.HFConfigError("deepseek_v3: rope truncate=false is not supported (Megatron's MLA YaRN "
                                    "rounds the correction range)")
        if rope.get("attention_factor") is not None:
            raise hfc.HFConfigError("deepseek_v3: rope attention_factor is not supported (Megatron derives it "
                                    "from factor and mscale)")
        if rope.get("mscale_all_dim") and not rope.get("mscale"):
            raise hfc.HFConfigError("deepseek_v3: rope mscale_all_dim without mscale is not supported (Megatron "
                                    "scales the rotary embedding by mscale / mscale_all_dim)")


def _yarn(rope: dict[str, Any]) -> YarnScaling:
    return YarnScaling(
        factor=float(hfc.require(rope, "factor")),
        original_max_position_embeddings=int(hfc.require(rope, "original_max_position_embeddings")),
        beta_fast=float(rope.get("beta_fast") or 32.0),
        beta_slow=float(rope.get("beta_slow") or 1.0),
        mscale=rope.get("mscale"),
        mscale_all_dim=rope.get("mscale_all_dim"),
    )


def hf_config(arch: GPTArchitecture, source: dict[str, Any] | None = None, dtype=None) -> dict[str, Any]:
    """HF `deepseek_v3` config (transformers 5 style) for a Megatron architecture.

    Fields Megatron does not model (token ids, tokenizer facts) come from `source`, the import
    source's config, when there is one. `num_nextn_predict_layers` is the MTP layer count of `arch`.
    """
    t = arch.transformer
    out = hfc.decoder_config(arch, source, dtype, dropped=frozenset({"qk_head_dim"}))  # qk_head_dim: derived
    rope: dict[str, Any] = {"rope_theta": arch.rotary_base, "rope_type": "default"}
    if arch.yarn is not None:
        y = arch.yarn
        rope.update(rope_type="yarn", factor=y.factor, beta_fast=y.beta_fast, beta_slow=y.beta_slow,
                    original_max_position_embeddings=y.original_max_position_embeddings)
        rope.update({k: v for k, v in (("mscale", y.mscale), ("mscale_all_dim", y.mscale_all_dim)) if v is not None})
    out.update(
        architectures=["DeepseekV3ForCausalLM"],
        model_type=MODEL_TYPE,
        rope_parameters=rope,
        rope_interleave=True,
        attention_bias=False,
        head_dim=t["qk_pos_emb_head_dim"],  # what transformers derives (the rotary head size)
        q_lora_rank=t["q_lora_rank"],
        kv_lora_rank=t["kv_lora_rank"],
        qk_nope_head_dim=t["qk_head_dim"],
        qk_rope_head_dim=t["qk_pos_emb_head_dim"],
        v_head_dim=t["v_head_dim"],
        **hfc.sigmoid_moe_fields(arch),
        num_nextn_predict_layers=arch.mtp_num_layers,
    )
    return out


# ---- weights: HF tensors <-> Megatron parameters -------------------------------------------------


def rules(arch: GPTArchitecture, expert_layout: ExpertLayout = ExpertLayout.PER_EXPERT) -> RuleSet:
    """The complete rule table of a DeepSeek-V3 model built as `arch` (global names, every layer)."""
    s = _Shapes(arch)
    moe_layer = arch.transformer["moe_layer_freq"]
    table, ignored = decoder_with_trailing_mtp(
        arch, "model.", lambda m, h, i: _layer(s, m, h, moe_layer[i], expert_layout))
    return RuleSet(table, ignored_hf=ignored)


def multi_latent_attention(m: str, h: str, s: "_Shapes") -> list[Rule]:
    """HF `q_a_proj`, `q_a_layernorm`, `q_b_proj` (or `q_proj` without a query rank), `kv_a_proj_with_mqa`,
    `kv_a_layernorm`, `kv_b_proj`, `o_proj` under `h` <-> Megatron `linear_q_down_proj`, `q_layernorm`,
    `linear_q_up_proj` (or `linear_q_proj`), `linear_kv_down_proj`, `kv_layernorm`, `linear_kv_up_proj`,
    `linear_proj` under `m`. The local layer spec splits the down projections' outputs over TP too."""
    if s.q_lora is None:
        table = [same(m + "linear_q_proj.weight", h + "q_proj.weight", (s.q_out, s.hidden), COLUMN)]
    else:
        table = [
            same(m + "linear_q_down_proj.weight", h + "q_a_proj.weight",      (s.q_lora, s.hidden), COLUMN),
            same(m + "q_layernorm.weight",        h + "q_a_layernorm.weight", (s.q_lora,)),
            same(m + "linear_q_up_proj.weight",   h + "q_b_proj.weight",      (s.q_out, s.q_lora), COLUMN),
        ]
    return table + [
        same(m + "linear_kv_down_proj.weight", h + "kv_a_proj_with_mqa.weight", (s.kv_down, s.hidden), COLUMN),
        same(m + "kv_layernorm.weight",        h + "kv_a_layernorm.weight",     (s.kv_lora,)),
        same(m + "linear_kv_up_proj.weight",   h + "kv_b_proj.weight",          (s.kv_up, s.kv_lora), COLUMN),
        same(m + "linear_proj.weight",         h + "o_proj.weight",             (s.hidden, s.o_in), ROW),
    ]


def _layer(s: "_Shapes", m: str, h: str, moe: bool, expert_layout: ExpertLayout) -> list[Rule]:
    """One decoder layer: Megatron names under prefix `m`, HF names under prefix `h`."""
    t = s.transformer
    table = [*layer_norms(m, h, s.hidden), *multi_latent_attention(m + "self_attention.", h + "self_attn.", s)]
    if not moe:
        return table + gated_mlp(m + "mlp.", h + "mlp.", t["ffn_hidden_size"], s.hidden)
    # transformers keeps the router in fp32 (_keep_in_fp32_modules_strict) and saves it so; the expert bias is a
    # buffer in Megatron, fp32 on both sides (hub checkpoints store it as F32).
    table += router(m + "mlp.", h + "mlp.gate.", s.experts, s.hidden, expert_bias="e_score_correction_bias",
                    also_accepts=(torch.float32,))
    if s.shared:
        table += gated_mlp(m + "mlp.shared_experts.", h + "mlp.shared_experts.", s.shared, s.hidden)
    return table + routed_experts(m + "mlp.experts.", h + "mlp.experts.", s.experts, t["moe_ffn_hidden_size"],
                                  s.hidden, expert_layout)


class _Shapes:
    """HF tensor shapes of a DeepSeek-V3 architecture."""

    def __init__(self, arch: GPTArchitecture):
        self.transformer = t = arch.transformer
        self.hidden = t["hidden_size"]
        heads = t["num_attention_heads"]
        self.q_lora, self.kv_lora = t["q_lora_rank"], t["kv_lora_rank"]
        self.q_out = heads * (t["qk_head_dim"] + t["qk_pos_emb_head_dim"])
        self.kv_down = self.kv_lora + t["qk_pos_emb_head_dim"]
        self.kv_up = heads * (t["qk_head_dim"] + t["v_head_dim"])
        self.o_in = heads * t["v_head_dim"]
        self.experts = t["num_moe_experts"]
        self.shared = t.get("moe_shared_expert_intermediate_size")


FAMILY = Family(MODEL_TYPE, architecture, hf_config, rules,
                expert_layouts=(ExpertLayout.PER_EXPERT, ExpertLayout.FUSED),
                mtp=MTPNaming("num_nextn_predict_layers", after_decoder="model."))
