"""Export, in memory: this rank's Megatron shards -> the HF `Piece`s this rank owns and should write.

Ownership needs no communication: the first data-parallel replica writes (expert params: the first
expert-data-parallel replica), each pipeline stage its own layers, each expert-parallel rank its
experts, each tensor-parallel rank its shard as a region (replicated params: TP rank 0 only).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch

from bridges.local_params import LocalParam, Ranks, local_params
from bridges.megatron.build import GPTArchitecture
from bridges.models import family_module
from bridges.pieces import Piece, PieceSpec, region_shape
from bridges.rules import Rule, RuleSet


class ExportError(RuntimeError):
    """A Megatron parameter that no rule maps and no ignore entry explains."""


def hf_tensor_specs(family, arch: GPTArchitecture, dtype: torch.dtype, expert_layout: str | None = None) -> dict:
    """{HF name: (shape, dtype)} of the whole exported checkpoint; the same on every rank (no model needed)."""
    return _ruleset(family, arch, expert_layout).hf_tensor_specs(dtype)


def export_specs(
    model_chunks, family, arch: GPTArchitecture, dtype: torch.dtype | None = None,
    expert_layout: str | None = None, ranks: Ranks | None = None,
) -> list[PieceSpec]:
    """What `export_pieces` would yield on this rank, as metadata only (no tensor is touched)."""
    return [spec for spec, _ in _owned(model_chunks, family, arch, dtype, expert_layout, ranks)]


def export_pieces(
    model_chunks, family, arch: GPTArchitecture, dtype: torch.dtype | None = None,
    expert_layout: str | None = None, ranks: Ranks | None = None,
) -> Iterator[Piece]:
    """The HF pieces this rank owns, cast to `dtype` (None: each parameter's own dtype), on the CPU.

    `expert_layout` is the family's on-disk expert layout (GLM-4.5: "per_expert", the default, or
    "fused"); export in the layout of the import source. `ranks` defaults to Megatron's parallel state.
    """
    for spec, make in _owned(model_chunks, family, arch, dtype, expert_layout, ranks):
        yield Piece(spec, make())


def _ruleset(family, arch: GPTArchitecture, expert_layout: str | None) -> RuleSet:
    module = family_module(family)
    return module.rules(arch, expert_layout) if expert_layout else module.rules(arch)


def _owned(model_chunks, family, arch, dtype, expert_layout, ranks):
    """(spec, thunk making the values) for every piece this rank writes, in a fixed order."""
    ranks = ranks or Ranks.current()
    ruleset = _ruleset(family, arch, expert_layout)
    for param in local_params(model_chunks, ranks):
        rule = ruleset.rule_for(param.name)
        if rule is None:
            if ruleset.megatron_ignore_reason(param.name) is not None:
                continue
            raise ExportError(f"Megatron parameter {param.local_name} ({param.name}) has no HF rule")
        expert = rule.expert is not None
        if not param.exported or not ranks.writes_replica(expert):
            continue
        rank, size = ranks.tensor_parallel(expert)
        if rule.shard.replicated and rank != 0:
            continue
        specs = rule.specs(rank, size, dtype or param.tensor.dtype)
        values = _Values(rule, param, rank, size)
        for i, spec in enumerate(specs):
            if 0 in region_shape(spec.region):
                continue  # a vocab shard made of padding only
            yield spec, values.getter(i, spec.dtype)
            for mirror in rule.mirrors if i == 0 else ():
                yield replace(spec, hf_name=mirror), values.getter(i, spec.dtype)


class _Values:
    """Converts one local parameter once, however many pieces (and mirrors) it yields."""

    def __init__(self, rule: Rule, param: LocalParam, rank: int, size: int):
        self.rule, self.param, self.rank, self.size = rule, param, rank, size
        self._tensors: list[torch.Tensor] | None = None

    def getter(self, i: int, dtype: torch.dtype):
        def make() -> torch.Tensor:
            if self._tensors is None:
                local = self.param.tensor.detach().to("cpu")
                self._tensors = self.rule.to_hf(local, self.rank, self.size)
            # A copy: pieces must not alias live parameters (training goes on while they are written).
            return self._tensors[i].to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)

        return make
