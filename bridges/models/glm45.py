"""GLM-4.5 (`glm4_moe`): HF config <-> Megatron architecture, and the weight rule table.

Dense first `first_k_dense_replace` layers, then MoE layers with routed + shared experts, a sigmoid
router with expert bias (`e_score_correction_bias`) and normalised, scaled top-k, QKV bias, optional
QK norm, partial rotary (0.5) and MTP layers (`num_nextn_predict_layers`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bridges import hf_config as hfc
from bridges.local_params import EMBEDDING, MTP_INNER, OUTPUT
from bridges.megatron.build import GPTArchitecture
from bridges.rules import Ignore, Rule, RuleSet, down, fused_expert, fused_gated_expert, gate_up, qkv, same
from bridges.sharding import COLUMN, ROW, vocab_parallel

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
    topk, topk_group = int(req("num_experts_per_tok")), int(config.get("topk_group") or 1)
    if n_group > 1 and topk // topk_group != 2:
        # HF scores a group by its top-2 experts, Megatron by its top (topk / topk_group).
        raise hfc.HFConfigError(
            f"glm4_moe: n_group={n_group} needs num_experts_per_tok / topk_group == 2 (Megatron's group "
            f"score), got {topk} / {topk_group}"
        )
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
        moe_router_topk=topk,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_pre_softmax=False,
        moe_router_topk_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        moe_router_num_groups=n_group if n_group > 1 else None,
        moe_router_group_topk=topk_group if n_group > 1 else None,
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


# ---- weights: HF tensors <-> Megatron parameters -------------------------------------------------

PER_EXPERT = "per_expert"  # model.layers.L.mlp.experts.e.{gate,up,down}_proj.weight (hub, save_pretrained)
FUSED = "fused"  # model.layers.L.mlp.experts.gate_up_proj [E, 2I, H] and down_proj [E, H, I]
EXPERT_LAYOUTS = (PER_EXPERT, FUSED)


def detect_expert_layout(hf_names) -> str:
    """Which expert layout a checkpoint holds (per-expert when it has no fused expert tensor)."""
    return FUSED if any(n.endswith(".mlp.experts.gate_up_proj") for n in hf_names) else PER_EXPERT


def rules(arch: GPTArchitecture, expert_layout: str = PER_EXPERT) -> RuleSet:
    """The complete rule table of a GLM-4.5 model built as `arch` (global names, every layer)."""
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"glm4_moe: expert layout {expert_layout!r} is not one of {EXPERT_LAYOUTS}")
    s = _Shapes(arch)
    n, mtp = arch.num_layers, arch.mtp_num_layers
    mtp_hf = [f"model.layers.{n + i}." for i in range(mtp)]
    # Servers read the MTP layer's own embedding and head: copies of the main ones.
    embed_mirrors = tuple(h + "embed_tokens.weight" for h in mtp_hf)
    head_mirrors = tuple(h + "shared_head.head.weight" for h in mtp_hf)
    if arch.tie_word_embeddings:
        embed_mirrors += head_mirrors
    table = [
        same(EMBEDDING, "model.embed_tokens.weight", s.vocab, vocab_parallel(arch.vocab_size), mirrors=embed_mirrors),
        same("decoder.final_layernorm.weight", "model.norm.weight", s.norm),
    ]
    if not arch.tie_word_embeddings:
        table.append(same(OUTPUT, "lm_head.weight", s.vocab, vocab_parallel(arch.vocab_size), mirrors=head_mirrors))
    moe_layer = arch.transformer["moe_layer_freq"]
    for layer in range(n):
        table += _layer(s, f"decoder.layers.{layer}.", f"model.layers.{layer}.", moe_layer[layer], expert_layout)
    for i, h in enumerate(mtp_hf):
        m = f"mtp.layers.{i}."
        table += [
            same(m + "enorm.weight",           h + "enorm.weight",            s.norm),
            same(m + "hnorm.weight",           h + "hnorm.weight",            s.norm),
            same(m + "eh_proj.weight",         h + "eh_proj.weight",          s.eh_proj, COLUMN),
            same(m + "final_layernorm.weight", h + "shared_head.norm.weight", s.norm),
        ]
        # Megatron builds the MTP inner layer like the last decoder layer.
        table += _layer(s, m + MTP_INNER + ".", h, moe_layer[-1], expert_layout)
    ignored = [
        Ignore(r"model\.layers\.(\d+)\..*", "MTP disabled" if not mtp else f"MTP layer not built (model has {mtp})",
               when=lambda m: int(m[1]) >= n + mtp),
    ]
    if arch.tie_word_embeddings:
        ignored.append(Ignore(r"lm_head\.weight", "tied to model.embed_tokens.weight"))
    return RuleSet(table, ignored_hf=ignored)


def _layer(s: "_Shapes", m: str, h: str, moe: bool, expert_layout: str) -> list[Rule]:
    """One decoder layer: Megatron names under prefix `m`, HF names under prefix `h`."""
    a = m + "self_attention."
    table = [
        same(m + "input_layernorm.weight",    h + "input_layernorm.weight",          s.norm),
        qkv(a + "linear_qkv.weight", *(h + f"self_attn.{p}_proj.weight" for p in "qkv"), s.qkv_weight, s.head_dim),
        same(a + "linear_proj.weight",        h + "self_attn.o_proj.weight",         s.o_proj, ROW),
        same(m + "pre_mlp_layernorm.weight",  h + "post_attention_layernorm.weight", s.norm),
    ]
    if s.qkv_bias:
        table.append(qkv(a + "linear_qkv.bias", *(h + f"self_attn.{p}_proj.bias" for p in "qkv"), s.qkv_bias,
                         s.head_dim))
    if s.qk_norm:
        table += [
            same(a + "q_layernorm.weight", h + "self_attn.q_norm.weight", s.head_norm),
            same(a + "k_layernorm.weight", h + "self_attn.k_norm.weight", s.head_norm),
        ]
    if not moe:
        return table + [
            gate_up(m + "mlp.linear_fc1.weight", h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight", s.dense_up),
            down(m + "mlp.linear_fc2.weight",    h + "mlp.down_proj.weight",                          s.dense_down),
        ]
    table += [
        same(m + "mlp.router.weight",      h + "mlp.gate.weight",                  s.router),
        # A buffer in Megatron, kept in fp32 by both sides (hub checkpoints store it as F32).
        same(m + "mlp.router.expert_bias", h + "mlp.gate.e_score_correction_bias", s.expert_bias, dtype=torch.float32),
    ]
    if s.shared_up:
        x, hx = m + "mlp.shared_experts.", h + "mlp.shared_experts."
        table += [
            gate_up(x + "linear_fc1.weight", hx + "gate_proj.weight", hx + "up_proj.weight", s.shared_up),
            down(x + "linear_fc2.weight",    hx + "down_proj.weight",                        s.shared_down),
        ]
    for e in range(s.experts):
        x, hx = m + f"mlp.experts.local_experts.{e}.", h + "mlp.experts."
        if expert_layout == PER_EXPERT:
            table += [
                gate_up(x + "linear_fc1.weight", hx + f"{e}.gate_proj.weight", hx + f"{e}.up_proj.weight",
                        s.expert_up, e),
                down(x + "linear_fc2.weight",    hx + f"{e}.down_proj.weight", s.expert_down, e),
            ]
        else:
            table += [
                fused_gated_expert(x + "linear_fc1.weight", hx + "gate_up_proj", s.fused_gate_up, e),
                fused_expert(x + "linear_fc2.weight",       hx + "down_proj",    s.fused_down, e),
            ]
    return table


class _Shapes:
    """HF tensor shapes of a GLM-4.5 architecture."""

    def __init__(self, arch: GPTArchitecture):
        t = arch.transformer
        hidden, d = t["hidden_size"], t["kv_channels"]
        q, kv = t["num_attention_heads"] * d, t["num_query_groups"] * d
        dense, expert = t["ffn_hidden_size"], t["moe_ffn_hidden_size"]
        shared = t.get("moe_shared_expert_intermediate_size")
        self.experts = t["num_moe_experts"]
        self.head_dim = d
        self.vocab = (arch.vocab_size, hidden)
        self.norm = (hidden,)
        self.head_norm = (d,)
        self.qk_norm = t["qk_layernorm"]
        self.qkv_weight = ((q, hidden), (kv, hidden), (kv, hidden))
        self.qkv_bias = ((q,), (kv,), (kv,)) if t["add_qkv_bias"] else None
        self.o_proj = (hidden, q)
        self.eh_proj = (hidden, 2 * hidden)
        self.dense_up, self.dense_down = (dense, hidden), (hidden, dense)
        self.router, self.expert_bias = (self.experts, hidden), (self.experts,)
        self.shared_up = (shared, hidden) if shared else None
        self.shared_down = (hidden, shared) if shared else None
        self.expert_up, self.expert_down = (expert, hidden), (hidden, expert)
        self.fused_gate_up, self.fused_down = (self.experts, 2 * expert, hidden), (self.experts, hidden, expert)
