"""Qwen3-MoE bridge: config translation field by field against transformers' `Qwen3MoeConfig` (hub and
transformers 5 spellings), the router's top-k weights against Megatron's, and on tiny random checkpoints
written by `save_pretrained`: import -> export through the file writer reproduces every tensor bit for bit,
Megatron logits match transformers (EP1, EP2, PP2, TP2 x EP2) and each export loads with `from_pretrained`
with no missing or unexpected keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bridges.checkpoint import hf_config as hfc
from bridges.models import qwen3_moe
from tests.bridges.family_checks import check_round_trips, check_softmax_router, layout_and_specs, tiny_checkpoints
from tests.bridges.qwen3_moe_tiny import MAIN, VARIANT, make_checkpoint

# Qwen3-30B-A3B as its hub config.json spells it, transformers 4 era.
HUB = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def transformers5_style(config: dict) -> dict:
    """The same model as transformers 5 writes it (rope_parameters, dtype, num_local_experts)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**config).to_dict()


@pytest.fixture(params=["hub", "transformers5"])
def config(request):
    return dict(HUB) if request.param == "hub" else transformers5_style(HUB)


# ---- config translation -----------------------------------------------------------------------


def test_architecture_field_by_field(config):
    from transformers import Qwen3MoeConfig

    ref = Qwen3MoeConfig(**config)  # transformers' reading of the same file
    arch = qwen3_moe.architecture(config)
    t = arch.transformer
    assert t["num_layers"] == ref.num_hidden_layers == 48
    assert t["hidden_size"] == ref.hidden_size
    assert t["ffn_hidden_size"] == ref.intermediate_size
    assert t["num_attention_heads"] == ref.num_attention_heads
    assert t["num_query_groups"] == ref.num_key_value_heads
    assert t["kv_channels"] == ref.head_dim == 128  # not hidden / heads (64)
    assert t["layernorm_epsilon"] == ref.rms_norm_eps
    assert t["normalization"] == "RMSNorm" and t["gated_linear_unit"] and t["activation_func"] is F.silu
    assert t["add_qkv_bias"] is t["add_bias_linear"] is False and ref.attention_bias is False
    assert t["qk_layernorm"] is True  # transformers always builds q_norm / k_norm
    assert t["init_method_std"] == ref.initializer_range
    assert t["num_moe_experts"] == ref.num_experts == 128
    assert t["moe_ffn_hidden_size"] == ref.moe_intermediate_size
    assert t.get("moe_shared_expert_intermediate_size") is None
    assert t["moe_layer_freq"] == [1] * 48
    assert t["moe_router_topk"] == ref.num_experts_per_tok
    assert t["moe_router_score_function"] == "softmax" and not t.get("moe_router_enable_expert_bias")
    assert t["moe_router_pre_softmax"] is (not ref.norm_topk_prob) is False
    assert t["moe_router_load_balancing_type"] == "aux_loss" and t["moe_aux_loss_coeff"] == ref.router_aux_loss_coef
    assert arch.vocab_size == ref.vocab_size
    assert arch.max_position_embeddings == ref.max_position_embeddings
    assert arch.rotary_percent == 1.0
    assert arch.rotary_base == ref.rope_parameters["rope_theta"] == 1e6
    assert arch.tie_word_embeddings == ref.tie_word_embeddings
    assert arch.mtp_num_layers == 0
    assert hfc.dtype(config) == torch.bfloat16 == ref.dtype


@pytest.mark.parametrize("step, mlp_only", [(1, []), (2, []), (1, [0, 3]), (3, [2])])
def test_moe_layers_are_where_transformers_builds_them(step, mlp_only):
    from transformers import Qwen3MoeConfig, Qwen3MoeModel
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    fields = dict(MAIN, num_hidden_layers=6, decoder_sparse_step=step, mlp_only_layers=mlp_only)
    with torch.device("meta"):
        model = Qwen3MoeModel(Qwen3MoeConfig(**fields))
    built = [int(isinstance(layer.mlp, Qwen3MoeSparseMoeBlock)) for layer in model.layers]
    config = Qwen3MoeConfig(**fields).to_dict()
    arch = qwen3_moe.architecture(config)
    assert arch.transformer["moe_layer_freq"] == built
    out = qwen3_moe.hf_config(arch, source=config)
    assert (out["decoder_sparse_step"], out["mlp_only_layers"]) == (step, mlp_only)  # the source's spelling
    alone = qwen3_moe.hf_config(arch)  # no source: step 1 and the dense layers listed
    assert alone["decoder_sparse_step"] == 1 and qwen3_moe.architecture(alone) == arch


def test_hf_config_round_trips(config):
    from transformers import Qwen3MoeConfig

    arch = qwen3_moe.architecture(config)
    out = qwen3_moe.hf_config(arch, source=config, dtype=torch.bfloat16)
    assert qwen3_moe.architecture(out) == arch
    # transformers 5 spelling, with the expert count as every transformers release reads it
    assert not {"rope_theta", "torch_dtype", "num_local_experts"} & set(out) and out["num_experts"] == 128
    ref, back = Qwen3MoeConfig(**config).to_dict(), Qwen3MoeConfig(**out).to_dict()
    for key in set(ref) - {"transformers_version"}:
        assert back[key] == ref[key], key
    assert out["bos_token_id"] == 151643 and out["max_window_layers"] == 48  # travel from the source


def test_router_weights_match_transformers():
    """norm_topk_prob=true <-> softmax over the top-k logits; false <-> top-k of the full softmax."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    hidden = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    for topk, norm in [(1, False), (2, False), (2, True), (3, True)]:
        if topk == 1 and norm:
            continue
        router = Qwen3MoeTopKRouter(Qwen3MoeConfig(**dict(MAIN, num_experts_per_tok=topk, norm_topk_prob=norm)))
        torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(topk))
        t = qwen3_moe.architecture(dict(MAIN, model_type="qwen3_moe", num_experts_per_tok=topk,
                                        norm_topk_prob=norm)).transformer
        check_softmax_router(router, t, hidden)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "llama"}, "model_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"num_experts": 0}, "no MoE layer"),
        ({"decoder_sparse_step": 100}, "no MoE layer"),
        ({"num_experts_per_tok": 1}, "num_experts_per_tok=1 with norm_topk_prob"),  # HF weight 1.0, Megatron p
        ({"num_local_experts": 64}, "expert counts disagree"),
    ],
)
def test_unsupported_configs_are_refused(fields, words):
    with pytest.raises(hfc.HFConfigError, match=words):
        qwen3_moe.architecture(dict(HUB, **fields))


def test_top_1_without_renormalisation_translates():
    t = qwen3_moe.architecture(dict(HUB, num_experts_per_tok=1, norm_topk_prob=False)).transformer
    assert t["moe_router_topk"] == 1 and t["moe_router_pre_softmax"] is True


# ---- weights, under parallel layouts -----------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{case: (directory, token ids, transformers logits)}; "fused" holds MAIN's weights with fused experts."""
    return tiny_checkpoints(tmp_path_factory.mktemp("qwen3_moe"), make_checkpoint, MAIN, VARIANT,
                            fused_experts=MAIN["num_experts"])


def test_world_2_ep1_ep2_pp2(checkpoints, tmp_path):
    """EP1 runs as two data-parallel replicas (one process start less than a world of one)."""
    from bridges.megatron.layout import ParallelLayout

    runs = [(ParallelLayout(ep=ep), case) for ep in (1, 2) for case in ("main", "variant", "fused")]
    check_round_trips(qwen3_moe.FAMILY, checkpoints, runs + [(ParallelLayout(pp=2), "variant")], 2, tmp_path)


def test_world_4_tp_x_ep(checkpoints, tmp_path):
    from bridges.megatron.layout import ParallelLayout

    runs = [(ParallelLayout(tp=2, ep=2), case) for case in ("main", "variant")]
    check_round_trips(qwen3_moe.FAMILY, checkpoints, runs, 4, tmp_path)


def test_hf_tensor_specs_describe_the_checkpoints(checkpoints):
    for case, (directory, _, _) in checkpoints.items():
        assert layout_and_specs(qwen3_moe.FAMILY, directory) == ("fused" if case == "fused" else "per_expert"), case
