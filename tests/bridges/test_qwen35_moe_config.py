"""Qwen3.5-MoE without processes: config translation both ways and its refusals, the released sizes (35B-A3B,
122B-A10B, 397B-A17B) accepted, the 397B one with a metadata-only export plan at TP2 x PP4 x EP32, the
gated-attention and Gated DeltaNet rules split by heads for tensor parallelism, expert layouts from names and
shapes, and the CPU Gated DeltaNet kernel against transformers' reference."""

from __future__ import annotations

import copy

import pytest
import torch

from bridges.checkpoint.hf_config import HFConfigError
from bridges.models import qwen3_5_moe
from tests.bridges import qwen35_tiny


def _config(mtp=1, **text):
    return qwen35_tiny.hf_config(mtp, **text).to_dict()


def test_architecture_round_trips_through_the_exported_config():
    import transformers

    config = _config()
    arch = qwen3_5_moe.architecture(config)
    t = arch.transformer
    assert t["linear_attention_freq"] == [1, 0, 1, 0] and t["attention_output_gate"] and t["moe_shared_expert_gate"]
    assert t["layernorm_zero_centered_gamma"] and arch.mtp_num_layers == 1 and arch.rotary_percent == 0.5
    exported = qwen3_5_moe.hf_config(arch, config)
    assert qwen3_5_moe.architecture(exported) == arch
    off = qwen3_5_moe.hf_config(arch.without_mtp(), config)
    assert off["text_config"]["mtp_num_hidden_layers"] == 0 and qwen3_5_moe.architecture(off) == arch.without_mtp()
    # transformers reads the exported config as the same model
    hf = transformers.Qwen3_5MoeConfig(**{k: v for k, v in exported.items() if k != "model_type"})
    assert hf.text_config.layer_types == config["text_config"]["layer_types"]


def test_layer_types_from_full_attention_interval():
    config = _config(mtp=0)
    del config["text_config"]["layer_types"]
    config["text_config"]["full_attention_interval"] = 2
    assert qwen3_5_moe.architecture(config).transformer["linear_attention_freq"] == [1, 0, 1, 0]


@pytest.mark.parametrize("change, message", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(attn_output_gate=False), "attn_output_gate"),
    (dict(layer_types=["linear_attention"] * 3 + ["sliding_attention"]), "layer_types"),
    (dict(mtp_num_hidden_layers=2), "mtp_num_hidden_layers=2"),
    (dict(mtp_use_dedicated_embeddings=True), "mtp_use_dedicated_embeddings"),
    (dict(layer_types=["full_attention", "linear_attention"] * 2), "last layer"),
])
def test_refusals_name_the_field(change, message):
    config = _config()
    config["text_config"].update(change)
    with pytest.raises(HFConfigError, match=message):
        qwen3_5_moe.architecture(config)


def test_tensor_parallel_must_split_whole_heads():
    """Gated attention is split by whole KV groups and Gated DeltaNet by whole key / value heads: a TP size that does
    not divide them stops the run before launch, with the count named (the tiny model: 2 KV groups, 2 key heads)."""
    from bridges.megatron.layout import LayoutError, ParallelLayout

    arch = qwen3_5_moe.architecture(_config())
    assert arch.tensor_parallel_heads == {"num_query_groups": 2, "linear_num_key_heads": 2, "linear_num_value_heads": 4}
    ParallelLayout(tp=2).check(2, arch.num_experts, arch.num_layers, heads=arch.tensor_parallel_heads)
    with pytest.raises(LayoutError, match="parallel.tp=4 does not divide num_query_groups=2"):
        ParallelLayout(tp=4).check(4, arch.num_experts, arch.num_layers, heads=arch.tensor_parallel_heads)


def test_deepstack_is_refused():
    config = _config()
    config["vision_config"]["deepstack_visual_indexes"] = [1]
    with pytest.raises(HFConfigError, match="deepstack"):
        qwen3_5_moe.architecture(config)


@pytest.mark.parametrize("experts, expected", [
    ({"0.gate_proj.weight": (16, 48), "0.up_proj.weight": (16, 48), "0.down_proj.weight": (48, 16)}, "per_expert"),
    ({"gate_up_proj": (4, 32, 48), "down_proj": (4, 48, 16)}, "fused"),  # [E, out, in]
    ({"gate_up_proj": (4, 48, 32), "down_proj": (4, 16, 48)}, "fused_in_out"),  # [E, in, out]
])
def test_expert_layout_from_names_and_shapes(experts, expected):
    from bridges.checkpoint.sources import DictSource
    from bridges.rules.expert_layouts import LayoutFound

    arch = qwen3_5_moe.architecture(_config())  # hidden 48, expert ffn 16
    prefixes = ("model.language_model.layers.0", "mtp.layers.0")
    names = [f"{prefix}.mlp.experts.{k}" for prefix in prefixes for k in experts]
    source = DictSource({n: torch.zeros(experts[n.split(".mlp.experts.")[1]]) for n in names})
    assert qwen3_5_moe.FAMILY.detect(source, arch) == LayoutFound(expected)


# ---- released sizes --------------------------------------------------------------------------------

_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, spatial_merge_size=2,
               temporal_patch_size=2, num_position_embeddings=2304, in_channels=3, hidden_act="gelu_pytorch_tanh",
               deepstack_visual_indexes=[], model_type="qwen3_5_moe_vision")


def _released(layers, hidden, heads, experts, topk, moe, shared, value_heads):
    """A released Qwen3.5-MoE config.json (the fields that fix shapes and translation)."""
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
        "image_token_id": 248056, "video_token_id": 248057, "vision_start_token_id": 248053,
        "vision_end_token_id": 248054, "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_5_moe_text", "num_hidden_layers": layers, "hidden_size": hidden,
            "num_attention_heads": heads, "num_key_value_heads": 2, "head_dim": 256, "attn_output_gate": True,
            "layer_types": ["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)],
            "full_attention_interval": 4, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
            "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": value_heads,
            "num_experts": experts, "num_experts_per_tok": topk, "moe_intermediate_size": moe,
            "shared_expert_intermediate_size": shared, "router_aux_loss_coef": 0.001, "vocab_size": 248320,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "hidden_act": "silu",
            "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                                "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        },
        "vision_config": dict(_VISION, out_hidden_size=hidden),
    }


RELEASED = {
    "35B-A3B": (_released(40, 2048, 16, 256, 8, 512, 512, 32), 34e9, 37e9),
    "122B-A10B": (_released(48, 3072, 32, 256, 8, 1024, 1024, 64), 120e9, 127e9),
    "397B-A17B": (_released(60, 4096, 32, 512, 10, 1024, 1024, 64), 395e9, 405e9),
}


@pytest.mark.parametrize("size", sorted(RELEASED))
def test_released_configs_translate(size):
    from bridges.export.specs import hf_tensor_specs

    config, low, high = RELEASED[size]
    arch = qwen3_5_moe.architecture(config)
    assert qwen3_5_moe.architecture(qwen3_5_moe.hf_config(arch, config)) == arch
    specs = hf_tensor_specs(qwen3_5_moe.FAMILY, arch, torch.bfloat16)
    total = sum(torch.Size(shape).numel() for shape, _ in specs.values())
    assert low < total < high, total  # the name says the size (MTP layer and vision tower included)


def test_397b_export_plan_at_tp2_pp4_ep32():
    """Every byte of every HF tensor has exactly one writer among 128 ranks (expert-TP 1), from metadata alone."""
    from bridges.export.specs import hf_tensor_specs
    from bridges.export.coverage import check_coverage
    from bridges.megatron.layout import ParallelLayout
    from bridges.export.virtual_ranks import LayoutPlanner

    config = copy.deepcopy(RELEASED["397B-A17B"][0])
    arch = qwen3_5_moe.architecture(config)
    planner = LayoutPlanner(qwen3_5_moe.FAMILY, arch, ParallelLayout(tp=2, pp=4, ep=32, etp=1), 128)
    check_coverage(hf_tensor_specs(qwen3_5_moe.FAMILY, arch, torch.bfloat16), planner.all_export_specs(torch.bfloat16))


# ---- rules -----------------------------------------------------------------------------------------


def _rule(arch, name):
    return qwen3_5_moe.rules(arch).rule_for(name)


@pytest.mark.parametrize("tp", [1, 2])
def test_gated_attention_and_gdn_rules_invert_under_tensor_parallelism(tp):
    """HF tensors -> each TP rank's shard -> back: the same tensors; the shards are what Megatron's layouts say."""
    arch = qwen3_5_moe.architecture(_config())
    gen = torch.Generator().manual_seed(0)
    for name in ("decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.0.self_attention.in_proj.weight",
                 "decoder.layers.0.self_attention.conv1d.weight"):
        rule = _rule(arch, name)
        full = {n: torch.randn(shape, generator=gen) for n, shape in zip(rule.hf, rule.hf_shapes)}
        rebuilt = {n: torch.full_like(v, float("nan")) for n, v in full.items()}
        for rank in range(tp):
            specs = rule.specs(rank, tp, torch.float32)
            local = rule.to_megatron([full[s.hf_name][s.region] for s in specs], rank, tp)
            for spec, values in zip(specs, rule.to_hf(local, rank, tp)):
                rebuilt[spec.hf_name][spec.region] = values
        assert all(torch.equal(rebuilt[n], full[n]) for n in full), name


def test_gated_qkv_layout_is_megatrons():
    """Megatron's linear_qkv with an output gate, per KV group: the group's query heads, their gate heads, k, v;
    transformers' q_proj keeps each head's query and gate together."""
    arch = qwen3_5_moe.architecture(_config())  # 4 heads, 2 KV groups, head_dim 16
    rule = _rule(arch, "decoder.layers.1.self_attention.linear_qkv.weight")
    head = lambda tag, i: torch.full((16, 48), float(100 * tag + i))  # noqa: E731
    q_proj = torch.cat([torch.cat([head(1, i), head(2, i)]) for i in range(4)])  # q_i, gate_i
    k_proj, v_proj = (torch.cat([head(tag, g) for g in range(2)]) for tag in (3, 4))
    full = dict(zip(rule.hf, (q_proj, k_proj, v_proj)))
    fused = rule.to_megatron([full[s.hf_name][s.region] for s in rule.specs(0, 1, torch.float32)], 0, 1)
    order = [int(block[0, 0]) for block in fused.split(16)]
    assert order == [100, 101, 200, 201, 300, 400, 102, 103, 202, 203, 301, 401]


def test_cpu_gated_delta_rule_matches_transformers():
    """The CPU runtime's Gated DeltaNet kernel (Megatron-Core's torch chunked rule after the L2 norm) against
    transformers' chunked and recurrent references, over more than one chunk, with grouped value heads."""
    from megatron.core.ssm.gated_delta_net import torch_chunk_gated_delta_rule
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf

    from bridges.megatron.cpu_runtime import l2norm

    gen = torch.Generator().manual_seed(0)
    b, s, hk, hv, d = 2, 80, 2, 4, 8
    q, k = (torch.randn(b, s, hk, d, generator=gen) for _ in range(2))
    v = torch.randn(b, s, hv, d, generator=gen)
    g = -torch.rand(b, s, hv, generator=gen)
    beta = torch.rand(b, s, hv, generator=gen)
    ours, _ = torch_chunk_gated_delta_rule(l2norm(q).repeat_interleave(2, 2), l2norm(k).repeat_interleave(2, 2), v,
                                           g=g, beta=beta)
    for reference in (hf.torch_chunk_gated_delta_rule, hf.torch_recurrent_gated_delta_rule):
        want, _ = reference(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
        assert (ours - want).abs().max().item() <= 1e-5 * want.abs().max().item(), reference.__name__
