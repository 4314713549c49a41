"""Declarative mapping rules: one Megatron parameter <-> regions of one or more HF tensors.

A rule names the Megatron parameter (its canonical global name, see local_params.py), the HF tensors,
the op chain (view ops on each HF tensor, then one combine op) and the sharding. Rules are pure: they
turn this rank's LOCAL shard into `Piece`s (HF name + region in full HF coordinates + values) and back.
They never communicate; the engines (bridges/export/, bridges/load.py) decide who reads and writes what.
The rule constructors families combine (attention, MLPs, experts) are in groups.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from bridges.checkpoint.pieces import PieceSpec, region_shape
from bridges.rules import ops
from bridges.rules.sharding import REPLICATED, Sharding
from bridges.rules.views import View

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


def same(megatron: str, hf: str, shape: Shape, shard: Sharding = REPLICATED, **kw) -> Rule:
    """One HF tensor, renamed (norms, router, o_proj, embeddings...)."""
    return Rule(megatron, (hf,), (tuple(shape),), shard=shard, **kw)


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
