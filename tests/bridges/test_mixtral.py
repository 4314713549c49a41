"""Mixtral bridge: config translation field by field against transformers' `MixtralConfig` (hub and transformers 5
spellings), the router's top-k weights against Megatron's, and on tiny random checkpoints written by
`save_pretrained`: round trips bit for bit, logits against transformers and `from_pretrained` of every export at
EP1, EP2, TP2, PP2 and TP2 x EP2 (tests/bridges/family_checks.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bridges.checkpoint import hf_config as hfc
from bridges.models import family_for, mixtral
from tests.bridges.family_checks import check_round_trips, check_softmax_router, layout_and_specs, tiny_checkpoints
from tests.bridges.mixtral_tiny import MAIN, VARIANT, make_checkpoint

# Mixtral-8x7B-v0.1 as its hub config.json spells it, transformers 4 era.
HUB = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": True,
    "vocab_size": 32000,
}


@pytest.fixture(params=["hub", "transformers5"])
def config(request):
    from transformers import MixtralConfig

    return dict(HUB) if request.param == "hub" else MixtralConfig(**HUB).to_dict()


# ---- config translation -----------------------------------------------------------------------


def test_architecture_field_by_field(config):
    from transformers import MixtralConfig

    ref = MixtralConfig(**config)  # transformers' reading of the same file
    arch = mixtral.architecture(config)
    t = arch.transformer
    assert family_for(config) is mixtral.FAMILY
    assert t["num_layers"] == ref.num_hidden_layers == 32
    assert t["hidden_size"] == ref.hidden_size
    assert t["num_attention_heads"] == ref.num_attention_heads
    assert t["num_query_groups"] == ref.num_key_value_heads == 8
    assert t["kv_channels"] == ref.hidden_size // ref.num_attention_heads == 128
    assert t["layernorm_epsilon"] == ref.rms_norm_eps
    assert t["normalization"] == "RMSNorm" and t["gated_linear_unit"] and t["activation_func"] is F.silu
    assert t["add_qkv_bias"] is t["add_bias_linear"] is t["qk_layernorm"] is False
    assert t["init_method_std"] == ref.initializer_range
    assert t["num_moe_experts"] == ref.num_local_experts == 8
    assert t["moe_ffn_hidden_size"] == ref.intermediate_size == 14336
    assert t.get("moe_shared_expert_intermediate_size") is None
    assert t["moe_layer_freq"] == [1] * 32
    assert t["moe_router_topk"] == ref.num_experts_per_tok
    assert t["moe_router_score_function"] == "softmax" and not t.get("moe_router_enable_expert_bias")
    assert t["moe_router_pre_softmax"] is False  # transformers renormalises the top-k probabilities
    assert t["moe_router_load_balancing_type"] == "aux_loss" and t["moe_aux_loss_coeff"] == ref.router_aux_loss_coef
    assert arch.vocab_size == ref.vocab_size
    assert arch.max_position_embeddings == ref.max_position_embeddings
    assert arch.rotary_percent == 1.0
    assert arch.rotary_base == ref.rope_parameters["rope_theta"] == 1e6
    assert arch.tie_word_embeddings == ref.tie_word_embeddings
    assert arch.mtp_num_layers == 0
    assert hfc.dtype(config) == torch.bfloat16 == ref.dtype


def test_rope_theta_defaults_as_transformers_does():
    from transformers import MixtralConfig

    bare = {k: v for k, v in HUB.items() if k != "rope_theta"}
    assert mixtral.architecture(bare).rotary_base == MixtralConfig(**bare).rope_parameters["rope_theta"] == 1e6


def test_hf_config_round_trips(config):
    from transformers import MixtralConfig

    arch = mixtral.architecture(config)
    out = mixtral.hf_config(arch, source=config, dtype=torch.bfloat16)
    assert mixtral.architecture(out) == arch
    assert not {"rope_theta", "torch_dtype"} & set(out) and out["dtype"] == "bfloat16"
    ref, back = MixtralConfig(**config).to_dict(), MixtralConfig(**out).to_dict()
    assert ref["head_dim"] is None and back["head_dim"] == ref["hidden_size"] // ref["num_attention_heads"]  # written
    for key in set(ref) - {"transformers_version", "head_dim"}:
        assert back[key] == ref[key], key
    assert mixtral.architecture(mixtral.hf_config(arch)) == arch  # no source: everything from the architecture


def test_router_weights_match_transformers():
    """Softmax over all experts, top-k, renormalised == Megatron's softmax over the top-k logits."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    hidden = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    for topk in (1, 2, 3):
        fields = dict(MAIN, num_experts_per_tok=topk)
        router = MixtralTopKRouter(MixtralConfig(**fields))
        torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(topk))
        check_softmax_router(router, mixtral.architecture(dict(fields, model_type="mixtral")).transformer, hidden)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "llama"}, "model_type"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"router_jitter_noise": 0.1}, "router_jitter_noise"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        ({"num_local_experts": None}, "num_local_experts"),
    ],
)
def test_unsupported_configs_are_refused(fields, words):
    with pytest.raises(hfc.HFConfigError, match=words):
        mixtral.architecture(dict(HUB, **fields))


# ---- weights, under parallel layouts -----------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{case: (directory, token ids, transformers logits)}."""
    return tiny_checkpoints(tmp_path_factory.mktemp("mixtral"), make_checkpoint, MAIN, VARIANT)


def test_world_2_ep1_ep2_tp2_pp2(checkpoints, tmp_path):
    """EP1 runs as two data-parallel replicas (one process start less than a world of one)."""
    from bridges.megatron.layout import ParallelLayout

    runs = [(ParallelLayout(ep=ep), case) for ep in (1, 2) for case in ("main", "variant")]
    runs += [(ParallelLayout(tp=2), "main"), (ParallelLayout(pp=2), "variant")]
    check_round_trips(mixtral.FAMILY, checkpoints, runs, 2, tmp_path)


def test_world_4_tp_x_ep(checkpoints, tmp_path):
    from bridges.megatron.layout import ParallelLayout

    runs = [(ParallelLayout(tp=2, ep=2), case) for case in ("main", "variant")]
    check_round_trips(mixtral.FAMILY, checkpoints, runs, 4, tmp_path)


def test_hf_tensor_specs_describe_the_checkpoints(checkpoints):
    for case, (directory, _, _) in checkpoints.items():
        assert layout_and_specs(mixtral.FAMILY, directory) == "per_expert", case
