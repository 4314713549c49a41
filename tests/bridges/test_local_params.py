"""Local Megatron names -> canonical global names: pipeline and expert offsets, both expert naming
schemes, both MTP inner names, Transformer Engine's fused norm names."""

import pytest

from bridges.rules.local_params import Naming, Ranks

NAMING = Naming(layer_numbers={0: 6, 1: 7}, mtp_numbers={0: 0}, expert_offset=8)


@pytest.mark.parametrize(
    "local, canonical",
    [
        ("decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.7.self_attention.linear_qkv.weight"),
        ("decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight", "decoder.layers.6.mlp.experts.local_experts.11.linear_fc1.weight"),
        ("decoder.layers.0.mlp.experts.linear_fc2.weight3", "decoder.layers.6.mlp.experts.local_experts.11.linear_fc2.weight"),
        ("decoder.layers.0.mlp.router.expert_bias", "decoder.layers.6.mlp.router.expert_bias"),
        ("mtp.layers.0.mtp_model_layer.mlp.experts.linear_fc1.weight0", "mtp.layers.0.transformer_layer.mlp.experts.local_experts.8.linear_fc1.weight"),
        ("mtp.layers.0.transformer_layer.input_layernorm.weight", "mtp.layers.0.transformer_layer.input_layernorm.weight"),
        ("mtp.layers.0.eh_proj.weight", "mtp.layers.0.eh_proj.weight"),
        ("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.7.input_layernorm.weight"),
        ("decoder.layers.1.mlp.linear_fc1.layer_norm_weight", "decoder.layers.7.pre_mlp_layernorm.weight"),
        ("decoder.layers.10.mlp.shared_experts.linear_fc1.weight", None),  # layer 10 is not on this stage
        ("embedding.word_embeddings.weight", "embedding.word_embeddings.weight"),
    ],
)
def test_canonical_names(local, canonical):
    if canonical is None:
        with pytest.raises(KeyError):
            NAMING.canonical(local)
    else:
        assert NAMING.canonical(local) == canonical


def test_ranks_pick_the_expert_groups_for_expert_params():
    ranks = Ranks(tp_rank=1, tp_size=2, etp_rank=0, etp_size=1, ep_rank=1, ep_size=4, dp_rank=0, edp_rank=1,
                  dp_size=2, edp_size=4)
    assert ranks.tensor_parallel(expert=False) == (1, 2) and ranks.tensor_parallel(expert=True) == (0, 1)
    assert ranks.replica(expert=False) == (0, 2) and ranks.replica(expert=True) == (1, 4)
