"""GPT-OSS config translation: HF <-> Megatron architecture, transformers' defaults, hub (transformers 4 / MXFP4)
configs, refusals, and YaRN giving Megatron-Core the frequencies and attention factor transformers uses."""

import math

import pytest
import torch

from bridges.checkpoint.hf_config import HFConfigError
from bridges.architecture import YarnScaling
from bridges.models import family_for, gpt_oss
from tests.bridges.gpt_oss_tiny import tiny_config

MINIMAL = dict(model_type="gpt_oss", vocab_size=50, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2)

# As the released checkpoints' config.json spells it (transformers 4 era).
HUB = dict(MINIMAL, rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "rope_type": "yarn",
                                  "original_max_position_embeddings": 4096, "truncate": False},
           rope_theta=150000, torch_dtype="bfloat16", sliding_window=128, max_position_embeddings=131072,
           layer_types=["sliding_attention", "full_attention", "sliding_attention"], eos_token_id=7,
           quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]})


def test_tiny_config_maps_every_feature():
    arch = gpt_oss.architecture(tiny_config().to_dict())
    t = arch.transformer
    assert family_for({"model_type": "gpt_oss"}) is gpt_oss.FAMILY
    assert t["window_size"] == (4, 0) and t["window_attn_skip_freq"] == [1, 0, 1, 0]  # sliding_window 5
    assert t["softmax_type"] == "learnable" and t["add_bias_linear"] and t["add_qkv_bias"]
    assert t["activation_func"] == gpt_oss.SigmoidGate(1.5)
    assert t["activation_func_clamp_value"] == 0.6 and t["glu_linear_offset"] == 1.0
    assert t["moe_router_score_function"] == "softmax" and not t["moe_router_pre_softmax"]
    assert t["moe_ffn_hidden_size"] == 32 and t["hidden_size"] == 64 and t["num_moe_experts"] == 6
    assert t.get("moe_shared_expert_intermediate_size") is None
    assert arch.rotary_base == 150000.0 and arch.rotary_percent == 1.0
    assert arch.yarn == YarnScaling(factor=4.0, original_max_position_embeddings=16, truncate=False)


def test_sigmoid_gate_is_transformers_expression():
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gpt_oss.SigmoidGate(1.702)(x), x * torch.sigmoid(x * 1.702))


def test_hf_config_round_trip_and_transformers_reads_it():
    from transformers import GptOssConfig

    source = tiny_config(eos_token_id=3).to_dict()
    arch = gpt_oss.architecture(source)
    out = gpt_oss.hf_config(arch, source, torch.bfloat16)
    assert gpt_oss.architecture(out) == arch
    assert out["dtype"] == "bfloat16" and out["eos_token_id"] == 3
    reread = GptOssConfig(**out).to_dict()
    for key in ("layer_types", "sliding_window", "rope_parameters", "swiglu_alpha", "swiglu_limit", "num_local_experts",
                "intermediate_size", "hidden_size", "head_dim", "router_aux_loss_coef", "attention_bias"):
        assert reread[key] == source[key], key


def test_defaults_are_transformers_defaults():
    from transformers import GptOssConfig

    assert gpt_oss.architecture(MINIMAL) == gpt_oss.architecture(GptOssConfig(**MINIMAL).to_dict())


def test_hub_config_with_mxfp4_and_legacy_rope_exports_unquantized():
    arch = gpt_oss.architecture(HUB)
    assert arch.yarn == YarnScaling(factor=32.0, original_max_position_embeddings=4096, truncate=False)
    assert arch.rotary_base == 150000 and arch.transformer["window_size"] == (127, 0)
    out = gpt_oss.hf_config(arch, HUB, torch.bfloat16)
    assert not {"quantization_config", "rope_scaling", "rope_theta", "torch_dtype"} & set(out)
    assert out["rope_parameters"]["rope_type"] == "yarn" and out["eos_token_id"] == 7
    assert gpt_oss.architecture(out) == arch


def test_only_full_attention_layers_need_no_window():
    arch = gpt_oss.architecture(dict(MINIMAL, layer_types=["full_attention"] * 3, sliding_window=None))
    assert arch.transformer["window_size"] is None and arch.transformer["window_attn_skip_freq"] is None
    assert gpt_oss.hf_config(arch)["layer_types"] == ["full_attention"] * 3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention_bias": False}, "attention_bias=false"),
        ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]}, "layer_types"),
        ({"layer_types": ["full_attention"]}, "layer_types"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                              "attention_factor": 2.0}}, "attention_factor"),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
        ({"quantization_config": {"quant_method": "fp8"}}, "mxfp4 only"),
        ({"model_type": "glm4_moe"}, "expected model_type"),
    ],
    ids=lambda v: str(v)[:30] if isinstance(v, dict) else None,
)
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(HFConfigError, match=message):
        gpt_oss.architecture({**MINIMAL, **change})


YARN_CASES = [
    {"factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
    {"factor": 4.0, "original_max_position_embeddings": 16},  # truncate defaults to True
    {"factor": 8.0, "original_max_position_embeddings": 64, "mscale": 0.707, "mscale_all_dim": 0.707,
     "beta_fast": 16, "beta_slow": 2},
    {"factor": 40.0, "original_max_position_embeddings": 256, "mscale": 1.0, "mscale_all_dim": 0.5},
]


@pytest.mark.parametrize("params", YARN_CASES)
def test_yarn_gives_megatron_transformers_frequencies_and_attention_factor(params):
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding,
        _yarn_get_concentration_factor_from_config,
    )
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from bridges.megatron import cpu_runtime
    from bridges.megatron.yarn_config import YarnTransformerConfig

    cpu_runtime.enable()
    hf = GptOssConfig(**{**MINIMAL, "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, **params}})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    arch = gpt_oss.architecture(hf.to_dict())
    yarn = arch.yarn
    config = YarnTransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=16,
                                   **yarn.megatron_fields())
    assert math.isclose(_yarn_get_concentration_factor_from_config(config), attention_factor, rel_tol=1e-12)
    rope = YarnRotaryEmbedding(
        16, rotary_base=arch.rotary_base, use_cpu_initialization=True, scaling_factor=yarn.factor,
        original_max_position_embeddings=yarn.original_max_position_embeddings, beta_fast=yarn.beta_fast,
        beta_slow=yarn.beta_slow, correction_range_round_to_int=yarn.truncate,
    )
    emb, _ = rope.get_emb(5)  # [positions, 1, 1, dim]: the frequencies twice
    assert torch.allclose(emb[:, 0, 0, :8], torch.arange(5.0)[:, None] * inv_freq, rtol=1e-6, atol=0)
