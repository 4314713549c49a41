"""Mixtral (`mixtral`): HF config <-> Megatron architecture, and the weight rule table.

Every layer is MoE: routed experts only, stored per expert as `block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up,
down), a softmax top-k router `block_sparse_moe.gate` whose top-k weights are renormalised; no shared expert, no
linear biases, no QK norm, full rotary; no MTP.
"""

from __future__ import annotations

from typing import Any

from bridges.architecture import GPTArchitecture
from bridges.checkpoint import hf_config as hfc
from bridges.models.family import Family
from bridges.rules.expert_layouts import ExpertLayout
from bridges.rules.groups import MLPNames, attention, embeddings_and_head, layer_norms, routed_experts, router
from bridges.rules.rule import RuleSet

MODEL_TYPE = "mixtral"
DEFAULT_ROPE_THETA = 1e6  # MixtralConfig.default_theta
MOE = "block_sparse_moe."  # the MoE block of a layer, HF name
EXPERT = MLPNames(gate="w1", up="w3", down="w2")


def architecture(config: dict[str, Any]) -> GPTArchitecture:
    """Megatron architecture of an HF `mixtral` config (either config style)."""
    refuse = lambda why: hfc.HFConfigError(f"mixtral: {why}")  # noqa: E731
    transformer, rope = hfc.decoder_preamble(config, MODEL_TYPE, rms_norm_eps=1e-5, rope_theta=DEFAULT_ROPE_THETA)
    if float(rope["partial_rotary_factor"]) != 1.0:
        raise refuse(f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported (transformers ignores it)")
    if config.get("sliding_window") is not None:
        raise refuse(f"sliding_window={config['sliding_window']} is not supported (full attention only)")
    if float(config.get("router_jitter_noise") or 0.0):
        # transformers jitters the input of the router and of the experts, Megatron the router's only.
        raise refuse("router_jitter_noise > 0 is not supported (Megatron jitters the router's input only)")
    aux = float(config.get("router_aux_loss_coef", 0.001))
    transformer.update(
        add_qkv_bias=False,
        qk_layernorm=False,
        num_moe_experts=int(hfc.require(config, "num_local_experts")),
        moe_ffn_hidden_size=transformer["ffn_hidden_size"],  # every layer is MoE: intermediate_size is the experts'
        moe_layer_freq=[1] * transformer["num_layers"],
        **hfc.softmax_router(int(hfc.require(config, "num_experts_per_tok")), renormalised=True, aux_loss_coeff=aux),
    )
    return GPTArchitecture(
        transformer=transformer,
        vocab_size=int(hfc.require(config, "vocab_size")),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096 * 32)),
        rotary_base=float(rope["rope_theta"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def hf_config(arch: GPTArchitecture, source: dict[str, Any] | None = None, dtype=None) -> dict[str, Any]:
    """HF `mixtral` config (transformers 5 style); fields Megatron does not model come from `source`."""
    t = arch.transformer
    out = hfc.decoder_config(arch, source, dtype)
    out.update(
        architectures=["MixtralForCausalLM"],
        model_type=MODEL_TYPE,
        rope_parameters={"rope_theta": arch.rotary_base, "rope_type": "default"},
        sliding_window=None,
        num_local_experts=t["num_moe_experts"],
        num_experts_per_tok=t["moe_router_topk"],
        router_aux_loss_coef=t["moe_aux_loss_coeff"],
    )
    return out


def rules(arch: GPTArchitecture, expert_layout: ExpertLayout = ExpertLayout.PER_EXPERT) -> RuleSet:
    """The complete rule table of a Mixtral model built as `arch` (global names, every layer)."""
    t = arch.transformer
    hidden, experts = t["hidden_size"], t["num_moe_experts"]
    table, ignored = embeddings_and_head(arch, "model.")
    for layer in range(arch.num_layers):
        m, h = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        table += [
            *layer_norms(m, h, hidden),
            *attention(m + "self_attention.", h + "self_attn.", hidden, t["num_attention_heads"],
                       t["num_query_groups"], t["kv_channels"]),
            *router(m + "mlp.", h + MOE + "gate.", experts, hidden),
            *routed_experts(m + "mlp.experts.", h + MOE + "experts.", experts, t["moe_ffn_hidden_size"], hidden,
                            expert_layout, EXPERT),
        ]
    return RuleSet(table, ignored_hf=ignored)


FAMILY = Family(MODEL_TYPE, architecture, hf_config, rules, expert_layouts=(ExpertLayout.PER_EXPERT,))
