"""Declarative mapping rules: one Megatron parameter <-> regions of one or more HF tensors.

A rule names the Megatron parameter (its canonical global name, see local_params.py), the HF tensors,
the op chain (view ops on each HF tensor, then one combine op) and the sharding. Rules are pure: they
turn this rank's LOCAL shard into `Piece`s (HF name + region in full HF coordinates + values) and back.
They never communicate; the engine (export.py, load.py) decides who reads and writes what.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from bridges import ops
from bridges.pieces import PieceSpec, region_shape
from bridges.sharding import COLUMN, HEADS, REPLICATED, ROW, Sharding
from bridges.views import View

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Rule:
    megatron: str  # canonical global Megatron name
    hf: tuple[str, ...]  # HF tensor names, in the order the op chain takes them
    hf_shapes: tuple[Shape, ...]  # full HF shapes, same order
    views: tuple = ()  # view ops applied to every HF tensor (may fan one tensor out into parts)
    first_views: tuple = ()  # view ops applied to the first HF tensor only, after `views`
    combine: object = ops.Rename()  # joins the sharded parts into the Megatron tensor
    shard: Sharding = REPLICATED
    expert: int | None = None  # global expert index: expert params use the expert TP / DP groups
    mirrors: tuple[str, ...] = ()  # HF names holding copies of hf[0]: written on export, checked on import
    dtype: torch.dtype | None = None  # fixed HF dtype; None = the checkpoint's dtype
    # dtypes import accepts besides the checkpoint's (transformers 5 re-saves some routers in fp32)
    also_accepts: tuple[torch.dtype, ...] = ()

    @property
    def ops(self) -> tuple:
        return tuple(self.views) + tuple(self.first_views) + (self.combine,)

    def parts(self) -> list[tuple[int, View]]:
        """(HF tensor index, view) for every part the combine op takes, in order."""
        out = []
        for i, shape in enumerate(self.hf_shapes):
            views = [View.whole(shape)]
            for op in self.views + (self.first_views if i == 0 else ()):
                views = [w for v in views for w in op.views(v, self.expert)]
            out += [(i, v) for v in views]
        return out

    def _local(self, rank: int, size: int):
        parts = self.parts()
        if self.shard.whole_parts:  # this rank's block of each HF tensor's parts (heads)
            counts = [sum(1 for i, _ in parts if i == tensor) for tensor in range(len(self.hf))]
            index = [0] * len(self.hf)
            held = []
            for i, view in parts:
                if self.shard.holds(index[i], counts[i], rank, size):
                    held.append((i, view))
                index[i] += 1
            parts = held
        for i, view in parts:
            part_region, pad = self.shard.region(view.shape, rank, size)
            yield i, view, view.region(part_region), pad

    def specs(self, rank: int, size: int, dtype: torch.dtype) -> list[PieceSpec]:
        """The HF regions this rank's shard is made of, one per part."""
        dtype = self.dtype or dtype
        return [PieceSpec(self.hf[i], self.hf_shapes[i], dtype, region) for i, _, region, _ in self._local(rank, size)]

    def to_megatron(self, hf_values: list[torch.Tensor], rank: int, size: int) -> torch.Tensor:
        """Values of `specs(rank, size)` (same order) -> this rank's local Megatron tensor."""
        parts = []
        for (_, view, region, pad), values in zip(self._local(rank, size), hf_values, strict=True):
            if tuple(values.shape) != region_shape(region):
                raise ValueError(f"{self.megatron}: got {tuple(values.shape)} for region {region_shape(region)}")
            part = view.to_part(values)
            if pad:  # vocab padding rows: zero, so padded logits stay zero
                pad_shape = list(part.shape)
                pad_shape[self.shard.dim] = pad
                part = torch.cat([part, part.new_zeros(pad_shape)], dim=self.shard.dim)
            parts.append(part)
        return _one(self.combine.forward(parts), self.megatron)

    def to_hf(self, local: torch.Tensor, rank: int, size: int) -> list[torch.Tensor]:
        """This rank's local Megatron tensor -> values of `specs(rank, size)` (same order)."""
        local_parts = list(self._local(rank, size))
        parts = self.combine.inverse([local])
        if len(parts) != len(local_parts):
            raise ValueError(f"{self.megatron}: combine op gave {len(parts)} parts, expected {len(local_parts)}")
        out = []
        for (_, view, _, pad), part in zip(local_parts, parts):
            if pad:
                part = part.narrow(self.shard.dim, 0, part.shape[self.shard.dim] - pad)
            out.append(view.to_hf(part))
        return out

    def local_shape(self, rank: int, size: int) -> Shape:
        """Shape of this rank's Megatron shard (computed on the meta device, no data)."""
        empty = [torch.empty(region_shape(s.region), device="meta") for s in self.specs(rank, size, torch.float32)]
        return tuple(self.to_megatron(empty, rank, size).shape)


def _one(xs: list[torch.Tensor], name: str) -> torch.Tensor:
    if len(xs) != 1:
        raise ValueError(f"{name}: combine op gave {len(xs)} tensors, expected one")
    return xs[0]


# ---- rule constructors: the vocabulary of family tables ----------------------------------------


def same(megatron: str, hf: str, shape: Shape, shard: Sharding = REPLICATED, **kw) -> Rule:
    """One HF tensor, renamed (norms, router, o_proj, embeddings...)."""
    return Rule(megatron, (hf,), (tuple(shape),), shard=shard, **kw)


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


# ---- groups: the rules of a whole module, in the HF naming several families share ----------------


def attention(
    m: str, h: str, hidden: int, heads: int, groups: int, head_dim: int, bias: bool = False, qk_norm: bool = False
) -> list[Rule]:
    """Self-attention: HF `{q,k,v,o}_proj` (+ q/k/v biases, + per-head `q_norm`/`k_norm`) under `h` <->
    Megatron `linear_qkv`, `linear_proj` (+ `linear_qkv.bias`, `{q,k}_layernorm`) under `m`."""
    q, kv = heads * head_dim, groups * head_dim
    weights = ((q, hidden), (kv, hidden), (kv, hidden))
    table = [
        qkv(m + "linear_qkv.weight", *(h + f"{p}_proj.weight" for p in "qkv"), weights, head_dim),
        same(m + "linear_proj.weight", h + "o_proj.weight", (hidden, q), ROW),
    ]
    if bias:
        table.append(qkv(m + "linear_qkv.bias", *(h + f"{p}_proj.bias" for p in "qkv"), ((q,), (kv,), (kv,)), head_dim))
    if qk_norm:
        table += [
            same(m + "q_layernorm.weight", h + "q_norm.weight", (head_dim,)),
            same(m + "k_layernorm.weight", h + "k_norm.weight", (head_dim,)),
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


def gated_mlp(m: str, h: str, ffn: int, hidden: int, expert: int | None = None) -> list[Rule]:
    """A SwiGLU MLP (dense, shared experts or one routed expert): HF `{gate,up,down}_proj.weight` under `h`
    <-> Megatron `linear_fc1.weight` ([gate; up], column-parallel) and `linear_fc2.weight` under `m`."""
    return [
        gate_up(m + "linear_fc1.weight", h + "gate_proj.weight", h + "up_proj.weight", (ffn, hidden), expert),
        down(m + "linear_fc2.weight", h + "down_proj.weight", (hidden, ffn), expert),
    ]


PER_EXPERT = "per_expert"  # HF `experts.{e}.{gate,up,down}_proj.weight` (hub checkpoints, save_pretrained)
FUSED = "fused"  # HF `experts.gate_up_proj` [E, 2I, H] (gate then up) and `experts.down_proj` [E, H, I]
EXPERT_LAYOUTS = (PER_EXPERT, FUSED)


def detect_expert_layout(hf_names) -> str:
    """Which routed-expert layout a checkpoint holds (per-expert when it has no fused expert tensor)."""
    return FUSED if any(n.endswith(".mlp.experts.gate_up_proj") for n in hf_names) else PER_EXPERT


def routed_experts(m: str, h: str, experts: int, ffn: int, hidden: int, layout: str = PER_EXPERT) -> list[Rule]:
    """Every routed expert of one MoE layer, HF names under `h` (`...mlp.experts.`) in `layout`, <->
    Megatron `local_experts.{e}.linear_fc{1,2}.weight` under `m` (global expert numbers)."""
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert layout {layout!r} is not one of {EXPERT_LAYOUTS}")
    table = []
    for e in range(experts):
        x = m + f"local_experts.{e}."
        if layout == PER_EXPERT:
            table += gated_mlp(x, h + f"{e}.", ffn, hidden, expert=e)
        else:
            table += [
                fused_gated_expert(x + "linear_fc1.weight", h + "gate_up_proj", (experts, 2 * ffn, hidden), e),
                fused_expert(x + "linear_fc2.weight", h + "down_proj", (experts, hidden, ffn), e),
            ]
    return table


# ---- a family's complete table ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ignore:
    """Names deliberately not converted, with the reason (never drop a name silently)."""

    pattern: str  # regex, matched against the whole name
    reason: str
    when: Callable[[re.Match], bool] | None = None  # extra condition on the match

    def matches(self, name: str) -> bool:
        m = re.fullmatch(self.pattern, name)
        return bool(m) and (self.when is None or self.when(m))


@dataclass
class RuleSet:
    """Every rule of one model (global names), plus the HF and Megatron names ignored on purpose."""

    rules: list[Rule]
    ignored_hf: list[Ignore] = field(default_factory=list)
    ignored_megatron: list[Ignore] = field(default_factory=list)

    def __post_init__(self):
        self._by_megatron: dict[str, Rule] = {}
        for rule in self.rules:
            if rule.megatron in self._by_megatron:
                raise ValueError(f"two rules for Megatron parameter {rule.megatron}")
            self._by_megatron[rule.megatron] = rule

    def rule_for(self, megatron_name: str) -> Rule | None:
        return self._by_megatron.get(megatron_name)

    def accepted_dtypes(self, hf_name: str) -> tuple[torch.dtype, ...]:
        """Extra dtypes an import accepts for `hf_name` (see Rule.also_accepts)."""
        return next((r.also_accepts for r in self.rules if hf_name in r.hf), ())

    def hf_ignore_reason(self, name: str) -> str | None:
        return _reason(self.ignored_hf, name)

    def megatron_ignore_reason(self, name: str) -> str | None:
        return _reason(self.ignored_megatron, name)

    def hf_tensors(self) -> dict[str, tuple[Shape, torch.dtype | None, bool]]:
        """{HF name: (shape, fixed dtype or None, is a mirror)} of every tensor the rules map."""
        out: dict[str, tuple[Shape, torch.dtype | None, bool]] = {}
        for rule in self.rules:
            for name, shape in zip(rule.hf, rule.hf_shapes):
                out[name] = (shape, rule.dtype, False)
            for name in rule.mirrors:
                out.setdefault(name, (rule.hf_shapes[0], rule.dtype, True))
        return out

    def hf_tensor_specs(self, dtype: torch.dtype) -> dict[str, tuple[Shape, torch.dtype]]:
        return {name: (shape, fixed or dtype) for name, (shape, fixed, _) in self.hf_tensors().items()}


def _reason(ignores: Iterable[Ignore], name: str) -> str | None:
    return next((i.reason for i in ignores if i.matches(name)), None)
