"""Rules turn full HF tensors into each TP rank's local shard (as Megatron shards them) and back, exactly,
reading and writing only regions of the HF tensors."""

from types import SimpleNamespace

import pytest
import torch

from bridges.architecture import padded_vocab_size
from bridges.checkpoint.sources import DictSource
from bridges.rules import groups, ops, rule as rules
from bridges.rules.expert_layouts import ExpertLayout, detect_expert_layout
from bridges.rules.sharding import ROW, ShardingError, vocab_parallel

gen = torch.Generator().manual_seed(1)
E, H, I = 6, 10, 9  # experts, hidden, expert width: awkward on purpose (splits over 1, 2, 3 ranks)


def reference_local(rule, full, rank, size):
    """Megatron's shard computed the slow way: whole-tensor ops, then split each part."""
    parts = []
    for x in full:
        outs = [x]
        for op in rule.views:
            outs = [y for t in outs for y in op.forward([t])]
            if isinstance(op, ops.ExpertSlice):
                outs = [outs[rule.expert]]
        parts += outs
    local = []
    for part in parts:
        if rule.shard.dim is None:
            local.append(part)
            continue
        if rule.shard.vocab is not None:
            padded = padded_vocab_size(rule.shard.vocab, size)
            pad = list(part.shape)
            pad[rule.shard.dim] = padded - part.shape[rule.shard.dim]
            part = torch.cat([part, part.new_zeros(pad)], dim=rule.shard.dim)
        local.append(part.chunk(size, dim=rule.shard.dim)[rank])
    (out,) = rule.combine.forward(local)
    return out


RULES = [
    rules.same("norm", "n", (H,)),
    rules.same("proj", "o", (H, 12), shard=ROW),
    rules.same("embedding", "e", (13, H), shard=vocab_parallel(13)),
    groups.qkv("qkv.weight", "q", "k", "v", ((6 * 4 * 3, H), (6 * 3, H), (6 * 3, H)), head_dim=3),
    groups.qkv("qkv.bias", "q", "k", "v", ((6 * 4 * 3,), (6 * 3,), (6 * 3,)), head_dim=3),
    groups.gate_up("fc1", "gate", "up", (2 * I, H)),
    groups.down("fc2", "down", (H, 2 * I)),
    groups.fused_expert("fc2", "down_proj", (E, H, 2 * I), expert=4),
    groups.fused_expert("fc2", "down_proj", (E, 2 * I, H), expert=5, transpose=True),
    groups.fused_gated_expert("fc1", "gate_up_proj", (E, 4 * I, H), expert=1),
    groups.fused_gated_expert("fc1", "gate_up_proj", (E, H, 4 * I), expert=3, transpose=True),
    groups.fused_gated_expert("fc1", "gate_up_proj", (E, H, 4 * I), expert=0, transpose=True, interleaved=True),
    groups.fused_gated_expert("fc1", "gate_up_proj", (E, 4 * I, H), expert=2, interleaved=True),
    groups.fused_gated_expert("fc1.bias", "gate_up_proj_bias", (E, 4 * I), expert=4, interleaved=True),
    groups.fused_gated_expert("fc1.bias", "gate_up_proj_bias", (E, 4 * I), expert=1),
    groups.fused_expert_bias("fc2.bias", "down_proj_bias", (E, H), expert=3),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.megatron}:{r.hf[0]}:{[type(o).__name__ for o in r.ops]}")
@pytest.mark.parametrize("size", [1, 2, 3])
def test_rule_round_trip(rule, size):
    if rule.megatron == "embedding" and size == 3:
        size = 5  # 13 rows over 5 ranks: the last rank holds padding only
    full = [torch.randn(s, generator=gen) for s in rule.hf_shapes]
    rebuilt = [torch.full_like(x, float("nan")) for x in full]
    for rank in range(size):
        specs = rule.specs(rank, size, torch.float32)
        values = [full[rule.hf.index(s.hf_name)][s.region] for s in specs]
        local = rule.to_megatron(values, rank, size)
        assert torch.equal(local, reference_local(rule, full, rank, size))
        assert rule.local_shape(rank, size) == tuple(local.shape)
        for spec, back in zip(specs, rule.to_hf(local, rank, size)):
            rebuilt[rule.hf.index(spec.hf_name)][spec.region] = back
    if rule.expert is None:
        for x, y in zip(full, rebuilt):
            assert torch.equal(x, y)
    else:  # only this rule's expert was written
        for x, y in zip(full, rebuilt):
            assert torch.equal(x[rule.expert], y[rule.expert])


def test_vocab_padding_rows_are_zero():
    rule = rules.same("embedding", "e", (5, 3), shard=vocab_parallel(5))
    full = torch.randn(5, 3, generator=gen)
    (spec,) = rule.specs(1, 2, torch.float32)
    local = rule.to_megatron([full[spec.region]], 1, 2)
    assert local.shape == (3, 3) and torch.equal(local[:2], full[3:]) and not local[2].any()


def test_uneven_split_is_refused():
    with pytest.raises(ShardingError):
        groups.down("fc2", "down", (H, 7)).specs(0, 2, torch.float32)


def test_expert_region_is_one_slice_of_the_fused_tensor():
    rule = groups.fused_gated_expert("fc1", "gate_up_proj", (E, H, 4 * I), expert=3, transpose=True, interleaved=True)
    gate, up = rule.specs(1, 2, torch.bfloat16)
    # gate/up have 2I rows each; rank 1 of 2 holds rows I..2I-1, at even / odd HF indices from 2I.
    assert gate.region == (slice(3, 4, 1), slice(0, H, 1), slice(2 * I, 4 * I - 1, 2))
    assert up.region == (slice(3, 4, 1), slice(0, H, 1), slice(2 * I + 1, 4 * I, 2))
    assert gate.dtype == torch.bfloat16 and gate.hf_shape == (E, H, 4 * I)


def test_fused_expert_biases_shard_like_their_weights():
    """fc1 bias: each expert-TP rank holds its [gate; up] rows (interleaved in HF); fc2 bias: whole everywhere."""
    up = groups.fused_gated_expert("fc1.bias", "gate_up_proj_bias", (E, 4 * I), expert=5, interleaved=True)
    gate, up_part = up.specs(1, 2, torch.float32)
    assert gate.region == (slice(5, 6, 1), slice(2 * I, 4 * I - 1, 2))
    assert up_part.region == (slice(5, 6, 1), slice(2 * I + 1, 4 * I, 2))
    down = groups.fused_expert_bias("fc2.bias", "down_proj_bias", (E, H), expert=2)
    assert [s.region for s in down.specs(1, 2, torch.float32)] == [(slice(2, 3, 1), slice(0, H, 1))]


def test_rule_groups_name_a_layer_as_transformers_and_megatron_do():
    """attention / gated_mlp / routed_experts: HF names and [out, in] shapes of the shared HF naming, and
    Megatron names; the per-expert and fused tables give each expert the same Megatron tensors."""
    table = groups.attention("a.", "h.", hidden=8, heads=4, groups=2, head_dim=3, bias=True, qk_norm=True)
    assert {r.megatron: dict(zip(r.hf, r.hf_shapes)) for r in table} == {
        "a.linear_qkv.weight": {"h.q_proj.weight": (12, 8), "h.k_proj.weight": (6, 8), "h.v_proj.weight": (6, 8)},
        "a.linear_qkv.bias": {"h.q_proj.bias": (12,), "h.k_proj.bias": (6,), "h.v_proj.bias": (6,)},
        "a.linear_proj.weight": {"h.o_proj.weight": (8, 12)},
        "a.q_layernorm.weight": {"h.q_norm.weight": (3,)},
        "a.k_layernorm.weight": {"h.k_norm.weight": (3,)},
    }
    plain = groups.attention("a.", "h.", 8, 4, 2, 3)
    assert [r.megatron for r in plain] == ["a.linear_qkv.weight", "a.linear_proj.weight"]
    fc1, fc2 = groups.gated_mlp("m.", "h.", ffn=5, hidden=8, expert=2)
    assert (fc1.megatron, fc1.hf, fc1.hf_shapes, fc1.expert) == (
        "m.linear_fc1.weight", ("h.gate_proj.weight", "h.up_proj.weight"), ((5, 8), (5, 8)), 2)
    assert (fc2.megatron, fc2.hf, fc2.hf_shapes, fc2.shard) == (
        "m.linear_fc2.weight", ("h.down_proj.weight",), ((8, 5),), ROW)

    x = "l.mlp.experts."
    per = rules.RuleSet(groups.routed_experts("x.", x, experts=3, ffn=6, hidden=8))
    fused = rules.RuleSet(groups.routed_experts("x.", x, experts=3, ffn=6, hidden=8, layout=ExpertLayout.FUSED))
    hf = {name: torch.randn(shape, generator=gen) for name, (shape, _, _) in per.hf_tensors().items()}
    gate_up = [torch.cat([hf[f"{x}{e}.gate_proj.weight"], hf[f"{x}{e}.up_proj.weight"]]) for e in range(3)]
    hf[x + "gate_up_proj"] = torch.stack(gate_up)
    hf[x + "down_proj"] = torch.stack([hf[f"{x}{e}.down_proj.weight"] for e in range(3)])
    assert set(fused.hf_tensors()) == {x + "gate_up_proj", x + "down_proj"}
    arch = SimpleNamespace(transformer={"hidden_size": 8, "moe_ffn_hidden_size": 6})
    for table, layout in ((fused, ExpertLayout.FUSED), (per, ExpertLayout.PER_EXPERT)):
        source = DictSource({name: hf[name] for name in table.hf_tensors()})
        assert detect_expert_layout(source, arch, {}, tuple(ExpertLayout)).layout == layout
    for rule in per.rules:
        other = fused.rule_for(rule.megatron)
        for rank in range(2):
            parts = [[hf[s.hf_name][s.region] for s in r.specs(rank, 2, torch.float32)] for r in (rule, other)]
            assert torch.equal(rule.to_megatron(parts[0], rank, 2), other.to_megatron(parts[1], rank, 2))
    with pytest.raises(ValueError, match="is not a valid ExpertLayout"):
        groups.routed_experts("x.", x, 3, 5, 8, layout="stacked")
