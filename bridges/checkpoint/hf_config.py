"""Read an HF `config.json` and normalise the fields whose spelling changed between transformers 4 and 5.

Hub checkpoints (transformers 4 era) carry top-level `rope_theta`, `partial_rotary_factor` and
`torch_dtype`; transformers 5 writes `rope_parameters` and `dtype`. Families read both through here, and
exports write both (`with_legacy_spellings`), so either release reads the same RoPE and dtype.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from bridges import dtypes
from bridges.checkpoint.files import CheckpointFileError, check_regular_file


class HFConfigError(ValueError):
    """An HF config that is missing, unreadable or not supported (names the file and the field)."""


def config_path(path: str) -> str:
    """`path` may be a model directory or a `config.json` file."""
    candidate = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise HFConfigError(f"no HF config at {path!r} (expected a directory with config.json, or the file)")
    return candidate


def load_config(path: str) -> dict[str, Any]:
    file = config_path(path)
    try:
        check_regular_file(file)  # a FIFO would block the read forever
    except CheckpointFileError as e:
        raise HFConfigError(f"cannot read HF config: {e}") from None
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise HFConfigError(f"cannot read HF config {file}: {e}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise HFConfigError(f"{file} has no 'model_type'; is it an HF model config?")
    return config


def require(config: dict[str, Any], key: str) -> Any:
    if key not in config or config[key] is None:
        raise HFConfigError(f"HF config ({config.get('model_type')}) lacks required field {key!r}")
    return config[key]


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """rope_theta, partial_rotary_factor, rope_type and scaling fields, from either config style."""
    params = dict(config.get("rope_parameters") or {})
    legacy_scaling = config.get("rope_scaling") or {}
    for key, value in legacy_scaling.items():
        params.setdefault("rope_type" if key == "type" else key, value)
    if "rope_theta" in config and config["rope_theta"] is not None:
        params.setdefault("rope_theta", config["rope_theta"])
    if "partial_rotary_factor" in config and config["partial_rotary_factor"] is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    params.setdefault("rope_theta", 10000.0)
    params.setdefault("partial_rotary_factor", 1.0)
    params.setdefault("rope_type", "default")
    return params


def dtype(config: dict[str, Any], default: torch.dtype = torch.float32) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype")
    if name is None:
        return default
    value = dtypes.from_name(name)
    if value is None:
        supported = sorted(dtypes.hf_name(d) for d in set(dtypes.DTYPE_NAMES.values()))
        raise HFConfigError(f"HF config dtype {name!r} is not supported (one of {supported})")
    return value


def dtype_name(value: torch.dtype) -> str:
    try:
        return dtypes.hf_name(value)
    except KeyError:
        raise HFConfigError(f"dtype {value} has no HF name") from None


def with_legacy_spellings(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (transformers 5 spelling) plus the fields transformers 4.x reads for the same values: top-level
    `rope_theta`, `partial_rotary_factor` and `rope_scaling` (the other RoPE fields; null for plain RoPE) beside
    `rope_parameters`, and `torch_dtype` beside `dtype`; in `text_config` too. transformers 5 reads the same."""
    out = dict(config)
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = with_legacy_spellings(out["text_config"])
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:  # one RoPE for every layer (not one per layer type)
        out["rope_theta"] = rope["rope_theta"]
        if "partial_rotary_factor" in rope:
            out["partial_rotary_factor"] = rope["partial_rotary_factor"]
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        out["rope_scaling"] = None if scaling in ({}, {"rope_type": "default"}) else scaling
    if out.get("dtype") is not None:
        out["torch_dtype"] = out["dtype"]
    return out


# ---- the fields of a SwiGLU / RMSNorm decoder that families spell alike ------------------------------

# transformers 4 spellings an export replaces by `rope_parameters` / `dtype`.
LEGACY_KEYS = frozenset({"rope_theta", "partial_rotary_factor", "rope_scaling", "torch_dtype"})


def check_model_type(config: dict[str, Any], model_type: str) -> None:
    if config.get("model_type") != model_type:
        raise HFConfigError(f"expected model_type {model_type!r}, got {config.get('model_type')!r}")


def decoder_preamble(config: dict[str, Any], model_type: str, rms_norm_eps: float, **rope_defaults
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """What every decoder family reads first: (Megatron TransformerConfig kwargs of the shared decoder fields,
    rope parameters) of an HF config of `model_type`, refusing another model_type and a rope type other than
    the default. `rope_defaults`: the family's `rope_theta` / `partial_rotary_factor` when the config has none."""
    check_model_type(config, model_type)
    transformer = decoder_transformer(config, rms_norm_eps)
    rope = rope_parameters({**rope_defaults, **config})
    if rope["rope_type"] not in ("default", None):
        raise HFConfigError(f"{model_type}: rope_type {rope['rope_type']!r} is not supported")
    return transformer, rope


def softmax_router(topk: int, renormalised: bool, aux_loss_coeff: float) -> dict[str, Any]:
    """Megatron router fields of an HF softmax top-k router: `renormalised` (the top-k probabilities divided by their
    sum, as Mixtral and Qwen3 with norm_topk_prob do) is Megatron's softmax over the top-k logits; otherwise the
    plain top-k of the full softmax (pre-softmax). An auxiliary load-balancing loss when its coefficient is set."""
    return dict(
        moe_router_topk=topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not renormalised,
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff else "none",
        moe_aux_loss_coeff=aux_loss_coeff,
    )


def sigmoid_moe(config: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Megatron MoE fields of the DeepSeek-V3-style MoE that GLM-4.5 shares: dense first `first_k_dense_replace`
    layers, `n_routed_experts` + `n_shared_experts` of `moe_intermediate_size`, a sigmoid router with expert bias
    (updated by load), grouped (`n_group`, `topk_group`), renormalised top-k scaled by `routed_scaling_factor`.
    Refuses what Megatron's sigmoid router computes otherwise (names the family and the field)."""
    family = config.get("model_type")
    topk, topk_group = int(require(config, "num_experts_per_tok")), int(config.get("topk_group") or 1)
    n_group = int(config.get("n_group") or 1)
    norm = bool(config.get("norm_topk_prob", True))
    if norm != (topk > 1):
        raise HFConfigError(f"{family}: norm_topk_prob={str(norm).lower()} with num_experts_per_tok={topk} is not "
                            "supported (Megatron's sigmoid router renormalises the top-k scores exactly when k > 1)")
    if n_group > 1 and topk // topk_group != 2:
        # HF scores a group by its top-2 experts, Megatron by its top (topk / topk_group).
        raise HFConfigError(f"{family}: n_group={n_group} needs num_experts_per_tok / topk_group == 2 (Megatron's "
                            f"group score), got {topk} / {topk_group}")
    first_dense = int(config.get("first_k_dense_replace", 0))
    shared, moe_ffn = int(config.get("n_shared_experts") or 0), int(require(config, "moe_intermediate_size"))
    return dict(
        num_moe_experts=int(require(config, "n_routed_experts")),
        moe_ffn_hidden_size=moe_ffn,
        moe_shared_expert_intermediate_size=shared * moe_ffn if shared else None,
        moe_layer_freq=[0] * first_dense + [1] * (num_layers - first_dense),
        moe_router_topk=topk,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=1e-3,
        moe_router_pre_softmax=False,
        moe_router_topk_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        moe_router_num_groups=n_group if n_group > 1 else None,
        moe_router_group_topk=topk_group if n_group > 1 else None,
    )


def sigmoid_moe_fields(arch) -> dict[str, Any]:
    """The HF config fields `sigmoid_moe` reads, for a Megatron `GPTArchitecture`."""
    t = arch.transformer
    dense = t["moe_layer_freq"].index(1) if 1 in t["moe_layer_freq"] else t["num_layers"]
    return dict(
        moe_intermediate_size=t["moe_ffn_hidden_size"],
        num_experts_per_tok=t["moe_router_topk"],
        n_shared_experts=(t.get("moe_shared_expert_intermediate_size") or 0) // t["moe_ffn_hidden_size"],
        n_routed_experts=t["num_moe_experts"],
        routed_scaling_factor=t["moe_router_topk_scaling_factor"],
        n_group=t.get("moe_router_num_groups") or 1,
        topk_group=t.get("moe_router_group_topk") or 1,
        first_k_dense_replace=dense,
        norm_topk_prob=t["moe_router_topk"] > 1,
    )


def decoder_config(arch, source: dict[str, Any] | None, dtype: torch.dtype | None = None,
                   dropped: frozenset[str] = frozenset()) -> dict[str, Any]:
    """What every decoder family's exported config starts from: the import source's fields (those Megatron does not
    model travel) less `LEGACY_KEYS` and `dropped`, the shared decoder fields of `arch`, and the tensors' dtype."""
    out = {k: v for k, v in (source or {}).items() if k not in LEGACY_KEYS | dropped}
    out.update(decoder_fields(arch))
    if dtype is not None:
        out["dtype"] = dtype_name(dtype)
    return out


def decoder_transformer(config: dict[str, Any], rms_norm_eps: float) -> dict[str, Any]:
    """Megatron TransformerConfig kwargs of the decoder fields HF decoder configs share
    (`rms_norm_eps`: the family's default when the config leaves it out)."""
    import torch.nn.functional as F

    heads, hidden = int(require(config, "num_attention_heads")), int(require(config, "hidden_size"))
    if config.get("hidden_act", "silu") != "silu":
        family = config.get("model_type")
        raise HFConfigError(f"{family}: hidden_act {config['hidden_act']!r} is not supported (silu only)")
    return dict(
        num_layers=int(require(config, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(require(config, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        kv_channels=int(config.get("head_dim") or hidden // heads),
        normalization="RMSNorm",
        layernorm_epsilon=float(config.get("rms_norm_eps", rms_norm_eps)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        init_method_std=float(config.get("initializer_range", 0.02)),
    )


def decoder_fields(arch) -> dict[str, Any]:
    """The HF config fields `decoder_transformer` reads, for a Megatron `GPTArchitecture`."""
    t = arch.transformer
    return dict(
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
    )
