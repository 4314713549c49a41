"""GLM-4.5 config translation, field by field against transformers' own `Glm4MoeConfig`, for the hub
spelling (top-level rope_theta / partial_rotary_factor / torch_dtype) and the transformers 5 one."""

import pytest
import torch
import torch.nn.functional as F

from bridges.checkpoint import hf_config as hfc
from bridges.models import glm45

# GLM-4.5 (355B-A32B) as its hub config.json spells it, transformers 4 era.
HUB = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": True,
    "attention_dropout": 0.0, "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338],
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "partial_rotary_factor": 0.5,
    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 131072,
    "moe_intermediate_size": 1536, "norm_topk_prob": True, "num_attention_heads": 96, "n_group": 1,
    "topk_group": 1, "n_routed_experts": 160, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "num_hidden_layers": 92,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0", "use_cache": True, "use_qk_norm": False, "vocab_size": 151552,
}


def transformers5_style(config: dict) -> dict:
    """The same model as transformers 5 writes it (rope_parameters, dtype)."""
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(**config).to_dict()


@pytest.fixture(params=["hub", "transformers5"])
def config(request):
    return dict(HUB) if request.param == "hub" else transformers5_style(HUB)


def test_architecture_field_by_field(config):
    from transformers import Glm4MoeConfig

    ref = Glm4MoeConfig(**config)  # transformers' reading of the same file
    arch = glm45.architecture(config)
    t = arch.transformer
    assert t["num_layers"] == ref.num_hidden_layers == 92
    assert t["hidden_size"] == ref.hidden_size
    assert t["ffn_hidden_size"] == ref.intermediate_size
    assert t["num_attention_heads"] == ref.num_attention_heads
    assert t["num_query_groups"] == ref.num_key_value_heads
    assert t["kv_channels"] == ref.head_dim
    assert t["layernorm_epsilon"] == ref.rms_norm_eps
    assert t["normalization"] == "RMSNorm" and t["gated_linear_unit"] and t["activation_func"] is F.silu
    assert t["add_qkv_bias"] == ref.attention_bias and t["add_bias_linear"] is False
    assert t["qk_layernorm"] == ref.use_qk_norm
    assert t["init_method_std"] == ref.initializer_range
    assert t["num_moe_experts"] == ref.n_routed_experts
    assert t["moe_ffn_hidden_size"] == ref.moe_intermediate_size
    assert t["moe_shared_expert_intermediate_size"] == ref.n_shared_experts * ref.moe_intermediate_size
    assert t["moe_layer_freq"] == [0] * ref.first_k_dense_replace + [1] * (92 - ref.first_k_dense_replace)
    assert t["moe_router_topk"] == ref.num_experts_per_tok
    assert t["moe_router_topk_scaling_factor"] == ref.routed_scaling_factor
    assert t["moe_router_score_function"] == "sigmoid" and t["moe_router_enable_expert_bias"]
    assert t["moe_router_num_groups"] is None and t["moe_router_group_topk"] is None  # n_group 1
    assert arch.vocab_size == ref.vocab_size
    assert arch.max_position_embeddings == ref.max_position_embeddings
    assert arch.rotary_percent == ref.rope_parameters["partial_rotary_factor"] == 0.5
    assert arch.rotary_base == ref.rope_parameters["rope_theta"] == 1e6
    assert arch.tie_word_embeddings == ref.tie_word_embeddings
    assert arch.mtp_num_layers == ref.num_nextn_predict_layers == 1
    assert hfc.dtype(config) == torch.bfloat16 == ref.dtype


def test_hf_config_round_trips(config):
    from transformers import Glm4MoeConfig

    arch = glm45.architecture(config)
    out = glm45.hf_config(arch, source=config, dtype=torch.bfloat16)
    assert glm45.architecture(out) == arch
    assert not {"rope_theta", "partial_rotary_factor", "torch_dtype"} & set(out)  # transformers 5 spelling
    ref, back = Glm4MoeConfig(**config).to_dict(), Glm4MoeConfig(**out).to_dict()
    for key in set(ref) - {"transformers_version"}:
        assert back[key] == ref[key], key
    assert out["pad_token_id"] == 151329  # fields Megatron does not model travel from the source


def test_hf_config_follows_the_mtp_knob():
    arch = glm45.architecture(HUB).without_mtp()
    assert glm45.hf_config(arch, source=HUB)["num_nextn_predict_layers"] == 0


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"norm_topk_prob": False}, "norm_topk_prob"),
        ({"model_type": "llama"}, "model_type"),
        ({"n_group": 8, "topk_group": 2}, "n_group"),  # group score: HF top-2, Megatron top-4 here
    ],
)
def test_unsupported_configs_are_refused(fields, words):
    with pytest.raises(hfc.HFConfigError, match=words):
        glm45.architecture(dict(HUB, **fields))


def test_grouped_routing_translates_when_scores_agree():
    t = glm45.architecture(dict(HUB, n_group=8, topk_group=4)).transformer
    assert (t["moe_router_num_groups"], t["moe_router_group_topk"]) == (8, 4)
