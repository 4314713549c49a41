"""Qwen3-MoE (`qwen3_moe`): HF config <-> Megatron architecture, and the weight rule table.

MoE layers (every `decoder_sparse_step`-th layer except `mlp_only_layers`; the others dense) with routed
experts only, a softmax top-k router (`norm_topk_prob`: renormalised top-k), QK norm on every layer,
no linear biases, full rotary, optional tied embeddings; no MTP.
"""

from __future__ import annotations

from typing import Any

from bridges.checkpoint import hf_config as hfc
from bridges.rules.local_params import EMBEDDING, OUTPUT
from bridges.architecture import GPTArchitecture
from bridges.rules.groups import (  # noqa: F401 - EXPERT_LAYOUTS, detect_expert_layout: the family interface
    EXPERT_LAYOUTS, PER_EXPERT, attention, detect_expert_layout, gated_mlp, routed_experts,
)
from bridges.rules.rule import Ignore, RuleSet, same
from bridges.rules.sharding import vocab_parallel

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
    if config.get("model_type") != MODEL_TYPE:
        raise hfc.HFConfigError(f"expected model_type {MODEL_TYPE!r}, got {config.get('model_type')!r}")
    req = lambda key: hfc.require(config, key)  # noqa: E731
    refuse = lambda why: hfc.HFConfigError(f"qwen3_moe: {why}")  # noqa: E731
    transformer = hfc.decoder_transformer(config, rms_norm_eps=1e-6)
    if config.get("attention_bias"):
        # HF puts biases on q/k/v AND o_proj; Megatron's o_proj bias comes only with biases on every MLP too.
        raise refuse("attention_bias=true is not supported (Megatron cannot bias o_proj alone)")
    if config.get("use_sliding_window"):
        raise refuse("use_sliding_window=true is not supported")
    rope = hfc.rope_parameters(config)
    if rope["rope_type"] not in ("default", None):
        raise refuse(f"rope_type {rope['rope_type']!r} is not supported")
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
        moe_router_topk=topk,
        moe_router_score_function="softmax",
        # softmax over the top-k logits == HF's renormalised top-k of the full softmax;
        # pre-softmax top-k == HF's plain top-k probabilities.
        moe_router_pre_softmax=not normalise,
        moe_router_load_balancing_type="aux_loss" if aux else "none",
        moe_aux_loss_coeff=aux,
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
    out: dict[str, Any] = {k: v for k, v in (source or {}).items() if k not in _LEGACY_KEYS}
    out.update(hfc.decoder_fields(arch))
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
    if dtype is not None:
        out["dtype"] = hfc.dtype_name(dtype)
    return out


# transformers 4 spellings replaced by `rope_parameters` / `dtype` on export; `num_local_experts` by `num_experts`.
_LEGACY_KEYS = {"rope_theta", "partial_rotary_factor", "rope_scaling", "torch_dtype", "num_local_experts"}


def _sparse_step(pattern: list[int], preferred: int) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) giving `pattern`: the source's step where it can, else 1."""
    for step in (preferred, 1):
        sparse = [int((i + 1) % step == 0) for i in range(len(pattern))]
        if all(s or not p for s, p in zip(sparse, pattern)):  # every MoE layer is on the step
            return step, [i for i, (s, p) in enumerate(zip(sparse, pattern)) if s and not p]
    raise AssertionError("step 1 covers every pattern")


# ---- weights: HF tensors <-> Megatron parameters -------------------------------------------------


def rules(arch: GPTArchitecture, expert_layout: str = PER_EXPERT) -> RuleSet:
    """The complete rule table of a Qwen3-MoE model built as `arch` (global names, every layer).
    `expert_layout`: per-expert (hub checkpoints, `save_pretrained`) or fused (transformers 5 in memory)."""
    table, ignored = language_model_rules(
        arch, "model.", lambda m, h, experts, ffn, hidden: routed_experts(m, h, experts, ffn, hidden, expert_layout)
    )
    return RuleSet(table, ignored_hf=ignored)


def language_model_rules(arch: GPTArchitecture, prefix: str, experts_rules) -> tuple[list, list]:
    """(rules, ignored HF names) of a Qwen3-MoE language model stored under `prefix` (e.g. "model.").

    `experts_rules(megatron_prefix, hf_prefix, experts, ffn, hidden)` gives a MoE layer's routed
    experts, so families that store them differently (Qwen3-VL-MoE) share the rest of the table."""
    t = arch.transformer
    hidden, vocab = t["hidden_size"], (arch.vocab_size, t["hidden_size"])
    table = [
        same(EMBEDDING, prefix + "embed_tokens.weight", vocab, vocab_parallel(arch.vocab_size)),
        same("decoder.final_layernorm.weight", prefix + "norm.weight", (hidden,)),
    ]
    ignored = []
    if arch.tie_word_embeddings:
        ignored.append(Ignore(r"lm_head\.weight", f"tied to {prefix}embed_tokens.weight"))
    else:
        table.append(same(OUTPUT, "lm_head.weight", vocab, vocab_parallel(arch.vocab_size)))
    for layer, moe in enumerate(t["moe_layer_freq"]):
        m, h = f"decoder.layers.{layer}.", f"{prefix}layers.{layer}."
        table += [
            same(m + "input_layernorm.weight",   h + "input_layernorm.weight",          (hidden,)),
            same(m + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight", (hidden,)),
            *attention(m + "self_attention.", h + "self_attn.", hidden, t["num_attention_heads"],
                       t["num_query_groups"], t["kv_channels"], qk_norm=True),
        ]
        if moe:
            table.append(same(m + "mlp.router.weight", h + "mlp.gate.weight", (t["num_moe_experts"], hidden)))
            table += experts_rules(m + "mlp.experts.", h + "mlp.experts.", t["num_moe_experts"],
                                   t["moe_ffn_hidden_size"], hidden)
        else:
            table += gated_mlp(m + "mlp.", h + "mlp.", t["ffn_hidden_size"], hidden)
    return table, ignored


# transformers' default when a config omits `router_aux_loss_coef`.
DEFAULT_AUX_LOSS_COEF = 0.001


def _aux_loss_coef(config: dict) -> float:
    value = config.get("router_aux_loss_coef")
    return DEFAULT_AUX_LOSS_COEF if value is None else float(value)
