"""Rule groups: the rules of a whole module (embeddings and head, norms, attention, MLP, router, routed experts),
built from the one-tensor constructors below. HF names default to the spelling most families share and are
parameters where families differ (Mixtral's `w1/w3/w2`). Pure functions of names and shapes."""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

import torch

from bridges.architecture import GPTArchitecture
from bridges.rules import ops
from bridges.rules.expert_layouts import ExpertLayout
from bridges.rules.local_params import EMBEDDING, MTP_INNER, OUTPUT
from bridges.rules.rule import Ignore, Rule, Shape, same
from bridges.rules.sharding import COLUMN, HEADS, REPLICATED, ROW, Sharding, vocab_parallel

# ---- rule constructors: the vocabulary of family tables ----------------------------------------


def qkv(megatron: str, q: str, k: str, v: str, shapes: tuple[Shape, Shape, Shape], head_dim: int) -> Rule:
    """q_proj/k_proj/v_proj (weights or biases) <-> linear_qkv, column-parallel by KV group."""
    heads_per_group = shapes[0][0] // shapes[1][0]
    combine = ops.QKVInterleave(heads_per_group, head_dim)
    return Rule(megatron, (q, k, v), tuple(map(tuple, shapes)), combine=combine, shard=COLUMN)


def gate_up(megatron: str, gate: str, up: str, shape: Shape, expert: int | None = None) -> Rule:
    """gate_proj + up_proj [I, H] <-> gated linear_fc1 [2I, H] (dense MLP, shared or per-expert)."""
    shapes = (tuple(shape), tuple(shape))
    return Rule(megatron, (gate, up), shapes, combine=ops.GateUpConcat(), shard=COLUMN, expert=expert)


def down(megatron: str, hf: str, shape: Shape, expert: int | None = None) -> Rule:
    """down_proj [H, I] <-> linear_fc2, row-parallel."""
    return same(megatron, hf, shape, shard=ROW, expert=expert)


def fused_expert(
    megatron: str, hf: str, shape: Shape, expert: int, transpose: bool = False, shard: Sharding = ROW
) -> Rule:
    """Expert `expert` of one fused HF tensor [E, ...] <-> that expert's Megatron weight.
    `transpose`: the HF tensor stores each expert as [in, out] (Megatron keeps [out, in])."""
    views = (ops.ExpertSlice(),) + ((ops.Transpose(),) if transpose else ())
    return Rule(megatron, (hf,), (tuple(shape),), views=views, shard=shard, expert=expert)


def fused_expert_bias(megatron: str, hf: str, shape: Shape, expert: int) -> Rule:
    """Expert `expert` of a fused bias [E, out] <-> that expert's output-layer bias (linear_fc2.bias), which
    Megatron keeps whole on every expert-TP rank. (A gated fc1 bias [E, 2I] is `fused_gated_expert`'s.)"""
    return fused_expert(megatron, hf, shape, expert, shard=REPLICATED)


def fused_gated_expert(
    megatron: str, hf: str, shape: Shape, expert: int, transpose: bool = False, interleaved: bool = False
) -> Rule:
    """Expert `expert` of one fused gate_up HF tensor [E, 2I, H] (or [E, H, 2I] with `transpose`) <->
    that expert's linear_fc1 [gate; up]. `interleaved`: gate/up alternate (even = gate) instead of halves."""
    split = ops.GateUpInterleave() if interleaved else ops.GateUpHalves()
    views = (ops.ExpertSlice(),) + ((ops.Transpose(),) if transpose else ()) + (split,)
    return Rule(megatron, (hf,), (tuple(shape),), views=views, combine=ops.GateUpConcat(), shard=COLUMN, expert=expert)


# ---- groups: the rules of a whole module --------------------------------------------------------


class MLPNames(NamedTuple):
    """HF names of a SwiGLU MLP's projections (each `<name>.weight`)."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


SWIGLU = MLPNames()


def embeddings_and_head(
    arch: GPTArchitecture, prefix: str = "model.", embed_mirrors: tuple[str, ...] = (),
    head_mirrors: tuple[str, ...] = (),
) -> tuple[list[Rule], list[Ignore]]:
    """(rules, ignored HF names) of the word embedding `<prefix>embed_tokens`, the final norm `<prefix>norm` and
    the output head `lm_head` (top level; ignored with the reason when tied to the embedding). `*_mirrors`: HF
    copies of the embedding / head (MTP layers' own), written on export and checked on import; a tied model's
    head copies mirror the embedding."""
    hidden = arch.transformer["hidden_size"]
    vocab, shard = (arch.vocab_size, hidden), vocab_parallel(arch.vocab_size)
    tied = arch.tie_word_embeddings
    table = [
        same(EMBEDDING, prefix + "embed_tokens.weight", vocab, shard,
             mirrors=embed_mirrors + (head_mirrors if tied else ())),
        same("decoder.final_layernorm.weight", prefix + "norm.weight", (hidden,)),
    ]
    if tied:
        return table, [Ignore(r"lm_head\.weight", f"tied to {prefix}embed_tokens.weight")]
    return table + [same(OUTPUT, "lm_head.weight", vocab, shard, mirrors=head_mirrors)], []


def decoder_with_trailing_mtp(
    arch: GPTArchitecture, prefix: str, layer: Callable[[str, str, int], list[Rule]]
) -> tuple[list[Rule], list[Ignore]]:
    """(rules, ignored HF names) of a decoder whose MTP layers are stored after its last layer, as
    `<prefix>layers.<num_hidden_layers + i>` (GLM-4.5, DeepSeek-V3): the embedding, final norm and head (the MTP
    layers' own copies of the embedding and head as mirrors servers read), every decoder layer, and each MTP
    layer's norms, projection and inner layer, built by Megatron like the last decoder layer. `layer(m, h, i)`:
    the rules of decoder layer i under Megatron prefix m and HF prefix h. Stored layers beyond the model's are
    ignored with the reason (MTP off, or fewer MTP layers built)."""
    n, mtp = arch.num_layers, arch.mtp_num_layers
    hidden = arch.transformer["hidden_size"]
    mtp_hf = [f"{prefix}layers.{n + i}." for i in range(mtp)]
    table, ignored = embeddings_and_head(arch, prefix, embed_mirrors=tuple(h + "embed_tokens.weight" for h in mtp_hf),
                                         head_mirrors=tuple(h + "shared_head.head.weight" for h in mtp_hf))
    for i in range(n):
        table += layer(f"decoder.layers.{i}.", f"{prefix}layers.{i}.", i)
    for i, h in enumerate(mtp_hf):
        m = f"mtp.layers.{i}."
        table += [
            same(m + "enorm.weight",           h + "enorm.weight",            (hidden,)),
            same(m + "hnorm.weight",           h + "hnorm.weight",            (hidden,)),
            same(m + "eh_proj.weight",         h + "eh_proj.weight",          (hidden, 2 * hidden), COLUMN),
            same(m + "final_layernorm.weight", h + "shared_head.norm.weight", (hidden,)),
        ]
        table += layer(m + MTP_INNER + ".", h, n - 1)
    ignored.append(Ignore(re.escape(prefix) + r"layers\.(\d+)\..*",
                          "MTP disabled" if not mtp else f"MTP layer not built (model has {mtp})",
                          when=lambda match: int(match[1]) >= n + mtp))
    return table, ignored


def layer_norms(m: str, h: str, hidden: int, names: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
                ) -> list[Rule]:
    """A decoder layer's two norms: HF `names` (before attention, before the MLP) under `h` <-> Megatron
    `input_layernorm`, `pre_mlp_layernorm` under `m`."""
    return [
        same(m + "input_layernorm.weight", h + names[0] + ".weight", (hidden,)),
        same(m + "pre_mlp_layernorm.weight", h + names[1] + ".weight", (hidden,)),
    ]


def attention(
    m: str, h: str, hidden: int, heads: int, groups: int, head_dim: int, bias: bool = False, qk_norm: bool = False,
    proj: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    norms: tuple[str, str] = ("q_norm", "k_norm"),
) -> list[Rule]:
    """Self-attention: HF `proj` (q, k, v, o; + q/k/v biases, + per-head QK `norms`) under `h` <->
    Megatron `linear_qkv`, `linear_proj` (+ `linear_qkv.bias`, `{q,k}_layernorm`) under `m`."""
    q, kv = heads * head_dim, groups * head_dim
    weights = ((q, hidden), (kv, hidden), (kv, hidden))
    table = [
        qkv(m + "linear_qkv.weight", *(h + f"{p}.weight" for p in proj[:3]), weights, head_dim),
        same(m + "linear_proj.weight", h + proj[3] + ".weight", (hidden, q), ROW),
    ]
    if bias:
        table.append(qkv(m + "linear_qkv.bias", *(h + f"{p}.bias" for p in proj[:3]), ((q,), (kv,), (kv,)), head_dim))
    if qk_norm:
        table += [
            same(m + "q_layernorm.weight", h + norms[0] + ".weight", (head_dim,)),
            same(m + "k_layernorm.weight", h + norms[1] + ".weight", (head_dim,)),
        ]
    return table


def gated_attention(m: str, h: str, hidden: int, heads: int, groups: int, head_dim: int) -> list[Rule]:
    """Self-attention with a sigmoid output gate and QK norm (Qwen3.5): HF `q_proj` [heads x (query, gate) x
    head_dim, H] (each head's query then its gate), `k_proj`, `v_proj`, `o_proj`, `{q,k}_norm` under `h` <->
    Megatron `linear_qkv` (per KV group: q heads, gate heads, k, v), `linear_proj`, `{q,k}_layernorm` under `m`.
    Tensor-parallel by whole heads (KV groups)."""
    q, kv = heads * head_dim, groups * head_dim
    shapes = ((2 * q, hidden), (kv, hidden), (kv, hidden))
    return [
        Rule(m + "linear_qkv.weight", tuple(h + f"{p}_proj.weight" for p in "qkv"), shapes,
             views=(ops.Blocks(head_dim),), combine=ops.GatedQKVInterleave(heads // groups, head_dim), shard=HEADS),
        same(m + "linear_proj.weight", h + "o_proj.weight", (hidden, q), ROW),
        same(m + "q_layernorm.weight", h + "q_norm.weight", (head_dim,)),
        same(m + "k_layernorm.weight", h + "k_norm.weight", (head_dim,)),
    ]


def gated_delta_net(
    m: str, h: str, hidden: int, key_heads: int, value_heads: int, key_dim: int, value_dim: int, kernel: int
) -> list[Rule]:
    """A Gated DeltaNet layer: HF `in_proj_{qkv,z,b,a}`, `conv1d`, `A_log`, `dt_bias`, `norm`, `out_proj` under `h`
    <-> Megatron `in_proj` ([q; k; v; z; beta; alpha] on each TP rank, each its share of the heads), `conv1d`
    ([q; k; v] channels likewise), `A_log`, `dt_bias`, `out_norm`, `out_proj` under `m`."""
    qk, v = key_heads * key_dim, value_heads * value_dim
    qkv = (qk, qk, v)
    return [
        Rule(m + "in_proj.weight", tuple(h + f"in_proj_{p}.weight" for p in ("qkv", "z", "b", "a")),
             ((2 * qk + v, hidden), (v, hidden), (value_heads, hidden), (value_heads, hidden)),
             first_views=(ops.Sections(qkv),), combine=ops.Concat(qkv + (v, value_heads, value_heads)), shard=COLUMN),
        Rule(m + "conv1d.weight", (h + "conv1d.weight",), ((2 * qk + v, 1, kernel),),
             views=(ops.Sections(qkv),), combine=ops.Concat(qkv), shard=COLUMN),
        same(m + "A_log", h + "A_log", (value_heads,), COLUMN),
        same(m + "dt_bias", h + "dt_bias", (value_heads,), COLUMN),
        same(m + "out_norm.weight", h + "norm.weight", (value_dim,)),
        same(m + "out_proj.weight", h + "out_proj.weight", (hidden, v), ROW),
    ]


def gated_mlp(m: str, h: str, ffn: int, hidden: int, expert: int | None = None, names: MLPNames = SWIGLU
              ) -> list[Rule]:
    """A SwiGLU MLP (dense, shared experts or one routed expert): HF `names` (gate, up, down) under `h`
    <-> Megatron `linear_fc1.weight` ([gate; up], column-parallel) and `linear_fc2.weight` under `m`."""
    return [
        gate_up(m + "linear_fc1.weight", h + names.gate + ".weight", h + names.up + ".weight", (ffn, hidden), expert),
        down(m + "linear_fc2.weight", h + names.down + ".weight", (hidden, ffn), expert),
    ]


def router(m: str, h: str, experts: int, hidden: int, expert_bias: str | None = None,
           also_accepts: tuple[torch.dtype, ...] = ()) -> list[Rule]:
    """A MoE router: HF `<h>weight` [E, H] (+ a sigmoid router's `<h><expert_bias>` [E], kept in fp32 on both
    sides) <-> Megatron `<m>router.weight` (+ the `router.expert_bias` buffer). `also_accepts`: dtypes import takes
    for the weight besides the checkpoint's (transformers keeps some routers in fp32)."""
    table = [same(m + "router.weight", h + "weight", (experts, hidden), also_accepts=also_accepts)]
    if expert_bias:
        table.append(same(m + "router.expert_bias", h + expert_bias, (experts,), dtype=torch.float32))
    return table


def routed_experts(m: str, h: str, experts: int, ffn: int, hidden: int,
                   layout: ExpertLayout = ExpertLayout.PER_EXPERT, names: MLPNames = SWIGLU) -> list[Rule]:
    """Every routed expert of one MoE layer, HF names under `h` (`...experts.`) in `layout` (per expert: `names`;
    fused: `gate_up_proj` (gate then up) and `down_proj`, [E, out, in] or [E, in, out]) <-> Megatron
    `local_experts.{e}.linear_fc{1,2}.weight` under `m` (global expert numbers)."""
    layout = ExpertLayout(layout)
    in_out = layout == ExpertLayout.FUSED_IN_OUT
    gate_up_shape = (experts, hidden, 2 * ffn) if in_out else (experts, 2 * ffn, hidden)
    down_shape = (experts, ffn, hidden) if in_out else (experts, hidden, ffn)
    table = []
    for e in range(experts):
        x = m + f"local_experts.{e}."
        if layout == ExpertLayout.PER_EXPERT:
            table += gated_mlp(x, h + f"{e}.", ffn, hidden, expert=e, names=names)
        else:
            table += [
                fused_gated_expert(x + "linear_fc1.weight", h + "gate_up_proj", gate_up_shape, e, transpose=in_out),
                fused_expert(x + "linear_fc2.weight", h + "down_proj", down_shape, e, transpose=in_out),
            ]
    return table
