"""DeepSeek-V3 bridge: config translation against transformers' `DeepseekV3Config` (hub spelling included),
clear refusals of what Megatron cannot express, the grouped sigmoid router against transformers', and on tiny
random checkpoints written by `save_pretrained` (+ MTP layer): import -> export through the file writer
reproduces every tensor bit for bit, Megatron logits match transformers (EP1, EP2, TP2, PP2, TP2 x EP2) and
each export loads with `from_pretrained` (tests/bridges/family_checks.py)."""

from __future__ import annotations

import pytest
import torch

from bridges.checkpoint import hf_config as hfc
from bridges.models import deepseek_v3
from tests.bridges.deepseek_v3_tiny import MAIN, VARIANT, make_checkpoint
from tests.bridges.family_checks import check_round_trips, layout_and_specs, tiny_checkpoints

# DeepSeek-V3's hub config.json (transformers 4 era), less its fp8 quantization_config.
HUB = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
    "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}, "rope_theta": 10000,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 4,
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 129280,
}


# ---- config translation -----------------------------------------------------------------------


def test_architecture_field_by_field():
    from transformers import DeepseekV3Config

    ref = DeepseekV3Config(**HUB)  # transformers' reading of the same file
    arch = deepseek_v3.architecture(HUB)
    t = arch.transformer
    assert t["num_layers"] == ref.num_hidden_layers == 61 and t["hidden_size"] == ref.hidden_size
    assert t["multi_latent_attention"] and t["qk_layernorm"]
    assert (t["q_lora_rank"], t["kv_lora_rank"]) == (ref.q_lora_rank, ref.kv_lora_rank) == (1536, 512)
    assert (t["qk_head_dim"], t["qk_pos_emb_head_dim"], t["v_head_dim"]) == (128, 64, 128)
    assert t["num_query_groups"] == t["num_attention_heads"] == ref.num_attention_heads
    assert t["moe_layer_freq"] == [0] * 3 + [1] * 58
    assert t["num_moe_experts"] == 256 and t["moe_ffn_hidden_size"] == 2048
    assert t["moe_shared_expert_intermediate_size"] == 2048 and t["moe_router_topk"] == 8
    assert t["moe_router_score_function"] == "sigmoid" and t["moe_router_enable_expert_bias"]
    assert (t["moe_router_num_groups"], t["moe_router_group_topk"]) == (8, 4)
    assert t["moe_router_topk_scaling_factor"] == ref.routed_scaling_factor == 2.5
    assert t["layernorm_epsilon"] == ref.rms_norm_eps
    assert arch.rotary_base == ref.rope_parameters["rope_theta"] == 10000
    y = arch.yarn
    assert (y.factor, y.original_max_position_embeddings, y.mscale, y.mscale_all_dim) == (40, 4096, 1.0, 1.0)
    assert arch.mtp_num_layers == 1 and arch.vocab_size == 129280
    assert hfc.dtype(HUB) == torch.bfloat16


@pytest.mark.parametrize("fields", [MAIN, VARIANT], ids=["main", "variant"])
def test_hf_config_round_trips(fields):
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(**fields).to_dict()
    arch = deepseek_v3.architecture(config)
    out = deepseek_v3.hf_config(arch, source=config, dtype=torch.float32)
    assert deepseek_v3.architecture(out) == arch
    ref, back = DeepseekV3Config(**config).to_dict(), DeepseekV3Config(**out).to_dict()
    for key in set(ref) - {"transformers_version", "architectures", "dtype"}:  # the export adds these two
        assert back[key] == ref[key], key
    hub = deepseek_v3.hf_config(deepseek_v3.architecture(HUB), source=HUB)
    assert not {"rope_scaling", "rope_theta", "torch_dtype"} & set(hub) and hub["rope_parameters"]["factor"] == 40
    assert deepseek_v3.architecture(hub) == deepseek_v3.architecture(HUB)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ({"topk_method": "group_limited_greedy"}, "topk_method"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
        ({"rope_interleave": False}, "rope_interleave"),
        ({"attention_bias": True}, "attention_bias"),
        ({"norm_topk_prob": False}, "norm_topk_prob=false"),
        # transformers weighs a lone expert 1.0, Megatron by its sigmoid score
        ({"num_experts_per_tok": 1, "n_group": 1, "topk_group": 1}, "norm_topk_prob=true with num_experts_per_tok=1"),
        ({"topk_group": 2}, "num_experts_per_tok / topk_group == 2"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
        ({"rope_scaling": dict(HUB["rope_scaling"], mscale=0)}, "mscale_all_dim without mscale"),
        ({"rope_scaling": dict(HUB["rope_scaling"], truncate=False)}, "truncate"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "deepseek_v2"}, "model_type"),
    ],
)
def test_unsupported_configs_are_refused(fields, words):
    with pytest.raises(hfc.HFConfigError, match=words):
        deepseek_v3.architecture(dict(HUB, **fields))


def test_grouped_router_weights_match_transformers():
    """Sigmoid + expert bias, grouped top-k (top-2 sum per group), normalised and scaled."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hidden = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    for fields in (MAIN, VARIANT, dict(MAIN, num_experts_per_tok=1, norm_topk_prob=False)):
        config = DeepseekV3Config(**fields)
        router = DeepseekV3TopkRouter(config)
        gen = torch.Generator().manual_seed(1)
        torch.nn.init.normal_(router.weight, generator=gen)
        router.e_score_correction_bias.copy_(0.1 * torch.randn(config.n_routed_experts, generator=gen))
        logits, weights, experts = router(hidden)
        t = deepseek_v3.architecture(config.to_dict()).transformer
        probs, chosen = topk_routing_with_score_function(
            logits.detach(), t["moe_router_topk"], use_pre_softmax=False, num_groups=t["moe_router_num_groups"],
            group_topk=t["moe_router_group_topk"], scaling_factor=t["moe_router_topk_scaling_factor"],
            score_function="sigmoid", expert_bias=router.e_score_correction_bias,
        )
        expected = torch.zeros_like(probs).scatter(1, experts, weights.detach())
        assert torch.equal(chosen, expected > 0)
        torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)


# ---- weights, under parallel layouts -----------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{case: (directory, token ids, transformers logits)}; "fused" holds MAIN's weights with fused experts."""
    return tiny_checkpoints(tmp_path_factory.mktemp("deepseek_v3"), make_checkpoint, MAIN, VARIANT,
                            fused_experts=MAIN["n_routed_experts"])


def test_world_2_ep1_ep2_tp2_pp2(checkpoints, tmp_path):
    """EP1 runs as two data-parallel replicas (one process start less than a world of one)."""
    from bridges.megatron.layout import ParallelLayout

    runs = [(ParallelLayout(), "main"), (ParallelLayout(), "fused"), (ParallelLayout(ep=2), "main"),
            (ParallelLayout(ep=2), "variant"), (ParallelLayout(tp=2), "variant"),
            # 3 layers: uneven stages (1 dense + 2 MoE with the MTP layer)
            (ParallelLayout(pp=2, first_stage_layers=1), "variant")]
    check_round_trips(deepseek_v3.FAMILY, checkpoints, runs, 2, tmp_path)


def test_world_4_tp_x_ep(checkpoints, tmp_path):
    from bridges.megatron.layout import ParallelLayout

    runs = [(ParallelLayout(tp=2, ep=2), case) for case in ("main", "variant")]
    check_round_trips(deepseek_v3.FAMILY, checkpoints, runs, 4, tmp_path)


def test_hf_tensor_specs_describe_the_checkpoints(checkpoints):
    for case, (directory, _, _) in checkpoints.items():
        assert layout_and_specs(deepseek_v3.FAMILY, directory) == ("fused" if case == "fused" else "per_expert"), case
