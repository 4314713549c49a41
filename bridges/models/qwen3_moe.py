"""Qwen3-MoE (`qwen3_moe`): HF config <-> Megatron architecture, and the weight rule table.

MoE layers (every `decoder_sparse_step`-th layer except `mlp_only_layers`; the others dense) with routed
experts only, a softmax top-k router (`norm_topk_prob`: renormalised top-k), QK norm on every layer,
no linear biases, full rotary, optional tied embeddings; no MTP.
"""

from __future__ import annotations

from typing import Any

from bridges.architecture import GPTArchitecture
from bridges.checkpoint import hf_config as hfc
from bridges.models.family import Family
from bridges.rules.expert_layouts import ExpertLayout
from bridges.rules.groups import attention, embeddings_and_head, gated_mlp, layer_norms, routed_experts, router
from bridges.rules.rule import RuleSet

MODEL_TYPE = "qwen3_moe"


def moe_layer_pattern(config: dict[str, Any], num_layers: int) -> list[int]:
    """Per layer: 1 where transformers builds a sparse MoE block, 0 where it builds a dense MLP."""
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or [])
    return [int(i not in dense and (i + 1) % step == 0) for i in range(num_layers)]


def num_experts(config: dict[str, Any]) -> int:
    """Hub configs say `num_experts`; transformers 5 writes `num_local_experts`."""
    counts = {k: config[k] for k in ("num_experts", "num_local_experts") if config.get(k) is not None}
    if len(set(counts.values())) > 1:
        raise hfc.HFConfigError(f"qwen3_moe: expert counts disagree: {counts}")
    if not counts:
        raise hfc.HFConfigError("HF config (qwen3_moe) lacks required field 'num_experts'")
    return int(next(iter(counts.values())))


def architecture(config: dict[str, Any]) -> GPTArchitecture:
    """Megatron architecture of an HF `qwen3_moe` config (either config style)."""
    req = lambda key: hfc.require(config, key)  # noqa: E731
    refuse = lambda why: hfc.HFConfigError(f"qwen3_moe: {why}")  # noqa: E731
    transformer, rope = hfc.decoder_preamble(config, MODEL_TYPE, rms_norm_eps=1e-6)
    if config.get("attention_bias"):
        # HF puts biases on q/k/v AND o_proj; Megatron's o_proj bias comes only with biases on every MLP too.
        raise refuse("attention_bias=true is not supported (Megatron cannot bias o_proj alone)")
    if config.get("use_sliding_window"):
        raise refuse("use_sliding_window=true is not supported")
    partial = float(rope["partial_rotary_factor"])
    if partial != 1.0:
        # transformers' qwen3_moe rotates the whole head and ignores this field: refuse rather than guess.
        raise refuse(f"partial_rotary_factor={partial} is not supported (transformers ignores it)")
    experts = num_experts(config)
    pattern = moe_layer_pattern(config, transformer["num_layers"])
    if experts <= 0 or not any(pattern):
        raise refuse(f"no MoE layer (num_experts={experts}, decoder_sparse_step / mlp_only_layers): a dense model")
    topk, normalise = int(req("num_experts_per_tok")), bool(config.get("norm_topk_prob", False))
    if topk == 1 and normalise:
        # HF weighs the single expert by 1.0; Megatron's softmax router needs pre-softmax at top-1 (weight = p).
        raise refuse("num_experts_per_tok=1 with norm_topk_prob=true is not supported by Megatron's router")
    aux = float(_aux_loss_coef(config))
    transformer.update(
        add_qkv_bias=False,
        qk_layernorm=True,
        num_moe_experts=experts,
        moe_ffn_hidden_size=int(req("moe_intermediate_size")),
        moe_layer_freq=pattern,
        **hfc.softmax_router(topk, renormalised=normalise, aux_loss_coeff=aux),
    )
    return GPTArchitecture(
        transformer=transformer,
        vocab_size=int(req("vocab_size")),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        rotary_percent=1.0,
        rotary_base=float(rope["rope_theta"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def hf_config(arch: GPTArchitecture, source: dict[str, Any] | None = None, dtype=None) -> dict[str, Any]:
    """HF `qwen3_moe` config (transformers 5 style; the expert count as `num_experts`, which every
    transformers release reads) for a Megatron architecture. Fields Megatron does not model (token ids,
    tokenizer facts) come from `source`, the import source's config, when there is one."""
    t = arch.transformer
    step, mlp_only = _sparse_step(t["moe_layer_freq"], int((source or {}).get("decoder_sparse_step") or 1))
    out = hfc.decoder_config(arch, source, dtype, dropped=frozenset({"num_local_experts"}))  # said as num_experts
    out.update(
        architectures=["Qwen3MoeForCausalLM"],
        model_type=MODEL_TYPE,
        rope_parameters={"rope_theta": arch.rotary_base, "rope_type": "default"},
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=None,
        moe_intermediate_size=t["moe_ffn_hidden_size"],
        num_experts=t["num_moe_experts"],
        num_experts_per_tok=t["moe_router_topk"],
        norm_topk_prob=not t["moe_router_pre_softmax"],
        router_aux_loss_coef=t["moe_aux_loss_coeff"],
        decoder_sparse_step=step,
        mlp_only_layers=mlp_only,
    )
    return out


def _sparse_step(pattern: list[int], preferred: int) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) giving `pattern`: the source's step where it can, else 1."""
    for step in (preferred, 1):
        sparse = [int((i + 1) % step == 0) for i in range(len(pattern))]
        if all(s or not p for s, p in zip(sparse, pattern)):  # every MoE layer is on the step
            return step, [i for i, (s, p) in enumerate(zip(sparse, pattern)) if s and not p]
    raise AssertionError("step 1 covers every pattern")


# ---- weights: HF tensors <-> Megatron parameters -------------------------------------------------


def rules(arch: GPTArchitecture, expert_layout: ExpertLayout = ExpertLayout.PER_EXPERT) -> RuleSet:
    """The complete rule table of a Qwen3-MoE model built as `arch` (global names, every layer).
    `expert_layout`: per-expert (hub checkpoints, `save_pretrained`) or fused (transformers 5 in memory)."""
    table, ignored = language_model_rules(arch, "model.", expert_layout)
    return RuleSet(table, ignored_hf=ignored)


def language_model_rules(arch: GPTArchitecture, prefix: str, expert_layout: ExpertLayout) -> tuple[list, list]:
    """(rules, ignored HF names) of a Qwen3-MoE language model stored under `prefix` (e.g. "model."), shared with
    Qwen3-VL-MoE."""
    t = arch.transformer
    hidden, experts = t["hidden_size"], t["num_moe_experts"]
    table, ignored = embeddings_and_head(arch, prefix)
    for layer, moe in enumerate(t["moe_layer_freq"]):
        m, h = f"decoder.layers.{layer}.", f"{prefix}layers.{layer}."
        table += [
            *layer_norms(m, h, hidden),
            *attention(m + "self_attention.", h + "self_attn.", hidden, t["num_attention_heads"],
                       t["num_query_groups"], t["kv_channels"], qk_norm=True),
        ]
        if moe:
            table += router(m + "mlp.", h + "mlp.gate.", experts, hidden)
            table += routed_experts(m + "mlp.experts.", h + "mlp.experts.", experts, t["moe_ffn_hidden_size"], hidden,
                                    expert_layout)
        else:
            table += gated_mlp(m + "mlp.", h + "mlp.", t["ffn_hidden_size"], hidden)
    return table, ignored


# transformers' default when a config omits `router_aux_loss_coef`.
DEFAULT_AUX_LOSS_COEF = 0.001


def _aux_loss_coef(config: dict) -> float:
    value = config.get("router_aux_loss_coef")
    return DEFAULT_AUX_LOSS_COEF if value is None else float(value)


FAMILY = Family(MODEL_TYPE, architecture, hf_config, rules,
                expert_layouts=(ExpertLayout.PER_EXPERT, ExpertLayout.FUSED))
