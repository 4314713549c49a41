"""GPT-OSS (`gpt_oss`): HF config <-> Megatron architecture, and the weight rule table.

Every layer is MoE (softmax top-k router with bias, no shared experts); attention has biases on q/k/v/o,
a learnable sink per head (Megatron's learnable softmax offset) and a sliding window on the layers
`layer_types` marks `sliding_attention`; YaRN rotary scaling. Experts apply a clamped SwiGLU:
gate.clamp(max=limit) * sigmoid(alpha * gate) * (up.clamp(-limit, limit) + 1). HF stores experts fused
`[E, in, out]` with gate/up interleaved; released checkpoints hold them as MXFP4 (read by bridges/checkpoint/mxfp4.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from bridges.architecture import GPTArchitecture, YarnScaling
from bridges.checkpoint import hf_config as hfc
from bridges.models.family import Family
from bridges.rules.expert_layouts import ExpertLayout, always
from bridges.rules.groups import (
    embeddings_and_head, fused_expert, fused_expert_bias, fused_gated_expert, qkv, router,
)
from bridges.rules.rule import Rule, RuleSet, same
from bridges.rules.sharding import COLUMN, ROW

MODEL_TYPE = "gpt_oss"
SLIDING, FULL = "sliding_attention", "full_attention"
DEFAULT_ROPE_THETA = 150000.0  # GptOssConfig.default_theta
# GptOssConfig's rope parameters when a config has none, and its defaults of the optional fields.
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
DEFAULTS = dict(num_key_value_heads=8, head_dim=64, sliding_window=128, max_position_embeddings=131072,
                rms_norm_eps=1e-5, initializer_range=0.02, swiglu_alpha=1.702, swiglu_limit=7.0,
                router_aux_loss_coef=0.001, tie_word_embeddings=False, attention_bias=True)


@dataclass(frozen=True)
class SigmoidGate:
    """The gate half of GPT-OSS's SwiGLU, gate * sigmoid(alpha * gate), as Megatron's `activation_func`
    (Megatron clamps both halves and adds the offset to the linear half around it)."""

    alpha: float

    def __call__(self, gate: torch.Tensor) -> torch.Tensor:
        return gate * torch.sigmoid(gate * self.alpha)  # the same expression as transformers


def architecture(config: dict[str, Any]) -> GPTArchitecture:
    """Megatron architecture of an HF `gpt_oss` config (transformers 4 or 5 style, MXFP4 or not)."""
    hfc.check_model_type(config, MODEL_TYPE)
    req = lambda key: hfc.require(config, key)  # noqa: E731
    get = lambda key: config[key] if key in config else DEFAULTS[key]  # noqa: E731 - as GptOssConfig reads it
    if not get("attention_bias"):
        # Megatron's add_bias_linear puts biases on attention and experts alike.
        raise hfc.HFConfigError("gpt_oss: attention_bias=false is not supported (the experts have biases)")
    quantization = config.get("quantization_config") or {}
    if quantization and quantization.get("quant_method") != "mxfp4":
        method = quantization.get("quant_method")
        raise hfc.HFConfigError(f"gpt_oss: quantization {method!r} is not supported (mxfp4 only)")

    num_layers, hidden = int(req("num_hidden_layers")), int(req("hidden_size"))
    heads = int(req("num_attention_heads"))
    ffn = int(req("intermediate_size"))
    window_size, window_layers = _sliding_window(config, num_layers, get("sliding_window"))
    transformer = dict(
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=int(get("num_key_value_heads") or heads),
        kv_channels=int(get("head_dim") or hidden // heads),
        normalization="RMSNorm",
        layernorm_epsilon=float(get("rms_norm_eps")),
        gated_linear_unit=True,
        activation_func=SigmoidGate(float(get("swiglu_alpha"))),
        activation_func_clamp_value=float(get("swiglu_limit")),
        glu_linear_offset=1.0,
        add_bias_linear=True,
        add_qkv_bias=True,
        softmax_type="learnable",  # attention sinks
        window_size=window_size,
        window_attn_skip_freq=window_layers,
        init_method_std=float(get("initializer_range")),
        num_moe_experts=int(req("num_local_experts")),
        moe_ffn_hidden_size=ffn,
        **hfc.softmax_router(int(req("num_experts_per_tok")), renormalised=True,
                             aux_loss_coeff=float(get("router_aux_loss_coef"))),
    )
    rope = _rope(config)
    return GPTArchitecture(
        transformer=transformer,
        vocab_size=int(req("vocab_size")),
        max_position_embeddings=int(get("max_position_embeddings")),
        rotary_percent=1.0,
        rotary_base=float(rope["rope_theta"]),
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        yarn=_yarn(rope, int(get("max_position_embeddings"))) if rope["rope_type"] == "yarn" else None,
    )


def _sliding_window(config: dict[str, Any], num_layers: int, window):
    """Megatron (window_size, window_attn_skip_freq) of HF `sliding_window` and `layer_types`."""
    types = config.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {SLIDING, FULL}:
        raise hfc.HFConfigError(f"gpt_oss: layer_types must be {num_layers} of {SLIDING!r} / {FULL!r}, got {types}")
    if SLIDING not in types:
        return None, None
    if not window or int(window) < 1:
        raise hfc.HFConfigError(f"gpt_oss: sliding layers need sliding_window >= 1, got {window!r}")
    # HF: query i sees keys i - window < j <= i; Megatron: i - left <= j <= i + right.
    return (int(window) - 1, 0), [int(t == SLIDING) for t in types]


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    given = config.get("rope_parameters") or config.get("rope_scaling")
    rope = hfc.rope_parameters(config if given else {**config, "rope_parameters": DEFAULT_ROPE})
    if "rope_theta" not in (config.get("rope_parameters") or {}) and config.get("rope_theta") is None:
        rope["rope_theta"] = DEFAULT_ROPE_THETA
    if rope["rope_type"] not in ("yarn", "default"):
        raise hfc.HFConfigError(f"gpt_oss: rope_type {rope['rope_type']!r} is not supported (yarn or default)")
    if float(rope["partial_rotary_factor"]) != 1.0:
        raise hfc.HFConfigError(f"gpt_oss: partial_rotary_factor {rope['partial_rotary_factor']} is not supported")
    return rope


def _yarn(rope: dict[str, Any], max_position_embeddings: int) -> YarnScaling:
    """transformers' YaRN parameters, defaults included (modeling_rope_utils._compute_yarn_parameters)."""
    original = int(rope["original_max_position_embeddings"])
    factor = float(rope.get("factor") or max_position_embeddings / original)
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    both = bool(mscale and mscale_all_dim)  # transformers uses the pair only when both are non-zero
    yarn = YarnScaling(
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(rope.get("beta_fast") or 32.0),
        beta_slow=float(rope.get("beta_slow") or 1.0),
        mscale=float(mscale) if both else None,
        mscale_all_dim=float(mscale_all_dim) if both else None,
        truncate=bool(rope.get("truncate", True)),
    )
    given = rope.get("attention_factor")
    if given is not None and not math.isclose(float(given), _attention_factor(yarn), rel_tol=1e-12):
        # Megatron derives the factor from factor / mscale / mscale_all_dim and takes no other value.
        raise hfc.HFConfigError(
            f"gpt_oss: YaRN attention_factor {given} differs from the derived {_attention_factor(yarn)}; not supported"
        )
    return yarn


def _attention_factor(yarn: YarnScaling) -> float:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if yarn.mscale is None or yarn.mscale_all_dim is None:
        return mscale(yarn.factor)
    return mscale(yarn.factor, yarn.mscale) / mscale(yarn.factor, yarn.mscale_all_dim)


def hf_config(arch: GPTArchitecture, source: dict[str, Any] | None = None, dtype=None) -> dict[str, Any]:
    """HF `gpt_oss` config (transformers 5 style) for a Megatron architecture, always unquantized.

    Fields Megatron does not model (token ids, sliding_window of a model without sliding layers) come
    from `source`, the import source's config, when there is one; its `quantization_config` is dropped
    (exports hold the dequantized experts).
    """
    t = arch.transformer
    out = hfc.decoder_config(arch, source, dtype, dropped=frozenset({"quantization_config"}))
    window, window_layers = t.get("window_size"), t.get("window_attn_skip_freq")
    layer_types = [SLIDING if window and window_layers[i] else FULL for i in range(t["num_layers"])]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": arch.rotary_base}
    if arch.yarn is not None:
        y = arch.yarn
        rope.update(rope_type="yarn", factor=y.factor, beta_fast=y.beta_fast, beta_slow=y.beta_slow,
                    original_max_position_embeddings=y.original_max_position_embeddings, truncate=y.truncate)
        if y.mscale is not None:
            rope.update(mscale=y.mscale, mscale_all_dim=y.mscale_all_dim)
    out.update(  # decoder_config's hidden_act "silu": not read by transformers' GPT-OSS experts
        architectures=["GptOssForCausalLM"],
        model_type=MODEL_TYPE,
        intermediate_size=t["moe_ffn_hidden_size"],
        attention_bias=True,
        layer_types=layer_types,
        sliding_window=window[0] + 1 if window else out.get("sliding_window"),
        rope_parameters=rope,
        num_local_experts=t["num_moe_experts"],
        num_experts_per_tok=t["moe_router_topk"],
        router_aux_loss_coef=t["moe_aux_loss_coeff"],
        swiglu_alpha=t["activation_func"].alpha,
        swiglu_limit=t["activation_func_clamp_value"],
    )
    return out


# ---- weights: HF tensors <-> Megatron parameters -------------------------------------------------

def rules(arch: GPTArchitecture, expert_layout: ExpertLayout = ExpertLayout.FUSED_IN_OUT) -> RuleSet:
    """The complete rule table of a GPT-OSS model built as `arch` (global names, every layer); experts are always
    fused [E, in, out] with gate/up interleaved."""
    s = _Shapes(arch)
    table, ignored = embeddings_and_head(arch, "model.")
    for layer in range(arch.num_layers):
        table += _layer(s, f"decoder.layers.{layer}.", f"model.layers.{layer}.")
    return RuleSet(table, ignored_hf=ignored)


def _layer(s: "_Shapes", m: str, h: str) -> list[Rule]:
    """One decoder layer: Megatron names under prefix `m`, HF names under prefix `h`."""
    a, ha = m + "self_attention.", h + "self_attn."
    table = [
        same(m + "input_layernorm.weight",             h + "input_layernorm.weight",          s.norm),
        qkv(a + "linear_qkv.weight", *(ha + f"{p}_proj.weight" for p in "qkv"), s.qkv_weight, s.head_dim),
        qkv(a + "linear_qkv.bias",   *(ha + f"{p}_proj.bias" for p in "qkv"),   s.qkv_bias,   s.head_dim),
        same(a + "linear_proj.weight",                 ha + "o_proj.weight",                  s.o_proj, ROW),
        same(a + "linear_proj.bias",                   ha + "o_proj.bias",                    s.o_bias),
        same(a + "core_attention.softmax_offset",      ha + "sinks",                          s.sinks, COLUMN),
        same(m + "pre_mlp_layernorm.weight",           h + "post_attention_layernorm.weight", s.norm),
        *router(m + "mlp.", h + "mlp.router.", s.experts, s.norm[0]),
        same(m + "mlp.router.bias",                    h + "mlp.router.bias",                 s.experts_1d),
    ]
    hx = h + "mlp.experts."
    for e in range(s.experts):
        x = m + f"mlp.experts.local_experts.{e}."
        table += [
            fused_gated_expert(x + "linear_fc1.weight", hx + "gate_up_proj",      s.gate_up, e, transpose=True,
                               interleaved=True),
            fused_gated_expert(x + "linear_fc1.bias",   hx + "gate_up_proj_bias", s.gate_up_bias, e, interleaved=True),
            fused_expert(x + "linear_fc2.weight",       hx + "down_proj",         s.down, e, transpose=True),
            fused_expert_bias(x + "linear_fc2.bias",    hx + "down_proj_bias",    s.down_bias, e),
        ]
    return table


class _Shapes:
    """HF tensor shapes of a GPT-OSS architecture."""

    def __init__(self, arch: GPTArchitecture):
        t = arch.transformer
        hidden, d, ffn = t["hidden_size"], t["kv_channels"], t["moe_ffn_hidden_size"]
        q, kv = t["num_attention_heads"] * d, t["num_query_groups"] * d
        self.experts = e = t["num_moe_experts"]
        self.head_dim = d
        self.norm = (hidden,)
        self.qkv_weight = ((q, hidden), (kv, hidden), (kv, hidden))
        self.qkv_bias = ((q,), (kv,), (kv,))
        self.o_proj, self.o_bias = (hidden, q), (hidden,)
        self.sinks = (t["num_attention_heads"],)
        self.experts_1d = (e,)
        self.gate_up, self.gate_up_bias = (e, hidden, 2 * ffn), (e, 2 * ffn)
        self.down, self.down_bias = (e, ffn, hidden), (e, hidden)


FAMILY = Family(MODEL_TYPE, architecture, hf_config, rules, expert_layouts=(ExpertLayout.FUSED_IN_OUT,),
                detect_layout=always(ExpertLayout.FUSED_IN_OUT))
