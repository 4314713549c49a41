"""Export, in memory: this rank's Megatron shards -> the HF `Piece`s this rank owns and should write.

Ownership needs no communication: each pipeline stage writes its own layers, each expert-parallel rank
its experts, each tensor-parallel rank its shard as a region (replicated params: TP rank 0 only), and
of the data-parallel replicas holding a shard (expert params: expert-data-parallel) exactly one, picked
so that the replicas write about as many bytes each.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch

from bridges.rules.local_params import LocalParam, Ranks, local_params
from bridges.architecture import GPTArchitecture
from bridges.models import family_of
from bridges.models.family import Family
from bridges.rules.expert_layouts import ExpertLayout
from bridges.checkpoint.piece_bytes import piece_nbytes
from bridges.checkpoint.pieces import Piece, PieceSpec, region_shape
from bridges.rules.rule import Rule, RuleSet


class ExportError(RuntimeError):
    """A Megatron parameter that no rule maps and no ignore entry explains."""


def hf_tensor_specs(family: Family | str, arch: GPTArchitecture, dtype: torch.dtype,
                    expert_layout: ExpertLayout | None = None) -> dict:
    """{HF name: (shape, dtype)} of the whole exported checkpoint; the same on every rank (no model needed)."""
    return family_ruleset(family, arch, expert_layout).hf_tensor_specs(dtype)


@dataclass(frozen=True)
class OwnedParam:
    """A local parameter of which this rank writes pieces: (part index, spec) of each, in writing order."""

    param: LocalParam
    rule: Rule
    pieces: tuple[tuple[int, PieceSpec], ...]
    tp: tuple[int, int]  # (rank, size) in the tensor-parallel group the parameter is split over


def owned_params(
    model_chunks, family: Family | str, arch: GPTArchitecture, dtype: torch.dtype | None = None,
    expert_layout: ExpertLayout | None = None, ranks: Ranks | None = None,
) -> list[OwnedParam]:
    """The parameters this rank writes pieces of, and those pieces, cast to `dtype` (None: each parameter's
    own dtype), from metadata alone (no tensor is touched). `expert_layout` is the family's on-disk expert
    layout (None: its default, e.g. GLM-4.5 per expert); export in the layout of the import source.
    `ranks` defaults to Megatron's parallel state. Depends only on the model, the layout and the dtype, so a
    caller may keep it from one export to the next."""
    ranks = ranks or Ranks.current()
    ruleset = family_ruleset(family, arch, expert_layout)
    held = []
    for param in local_params(model_chunks, ranks):
        rule = ruleset.rule_for(param.name)
        if rule is None:
            if ruleset.megatron_ignore_reason(param.name) is not None:
                continue
            raise ExportError(f"Megatron parameter {param.local_name} ({param.name}) has no HF rule")
        if param.exported:
            held.append((param, rule))
    owned = owned_pieces([(rule, dtype or param.tensor.dtype) for param, rule in held], ranks)
    return [OwnedParam(param, rule, tuple(pieces), ranks.tensor_parallel(rule.expert is not None))
            for (param, rule), pieces in zip(held, owned) if pieces]


def pieces_of(owned: Sequence[OwnedParam], tensors: Sequence[torch.Tensor] | None = None,
              copy: bool = True) -> Iterator[Piece]:
    """The pieces of `owned`, on the CPU, made one at a time as the iterator is consumed, in order.

    `tensors[i]` stands for `owned[i]`'s parameter (its host snapshot, say); None: the parameters
    themselves. `copy=False`: a piece may share memory with its tensor (no copy where the layouts agree),
    for a synchronous export that writes each piece before the parameters change, or for private copies.
    """
    for i, o in enumerate(owned):
        values = _Values(o.rule, o.param.tensor if tensors is None else tensors[i], *o.tp, uses=len(o.pieces))
        for part, spec in o.pieces:
            yield Piece(spec, values.make(part, spec.dtype, copy))


def export_specs(
    model_chunks, family: Family | str, arch: GPTArchitecture, dtype: torch.dtype | None = None,
    expert_layout: ExpertLayout | None = None, ranks: Ranks | None = None,
) -> list[PieceSpec]:
    """What `export_pieces` would yield on this rank, as metadata only (no tensor is touched)."""
    return [spec for o in owned_params(model_chunks, family, arch, dtype, expert_layout, ranks) for _, spec in o.pieces]


def export_pieces(
    model_chunks, family: Family | str, arch: GPTArchitecture, dtype: torch.dtype | None = None,
    expert_layout: ExpertLayout | None = None, ranks: Ranks | None = None, copy: bool = True,
) -> Iterator[Piece]:
    """The HF pieces this rank owns (`owned_params`), made one at a time (`pieces_of`), in the order of
    `export_specs`."""
    yield from pieces_of(owned_params(model_chunks, family, arch, dtype, expert_layout, ranks), copy=copy)


def family_ruleset(family: Family | str, arch: GPTArchitecture, expert_layout: ExpertLayout | None = None) -> RuleSet:
    """The family's complete rule table for `arch` (its default expert layout when None)."""
    return family_of(family).ruleset(arch, expert_layout)


def owned_pieces(held: list[tuple[Rule, torch.dtype]], ranks: Ranks) -> list[list[tuple[int, PieceSpec]]]:
    """For each parameter this rank holds and exports (its rule and dtype): (part index, spec) of the
    pieces this rank writes for it, often none.

    The one ownership decision, shared by the export of a built model and by plans made from metadata
    alone (bridges/export/virtual_ranks.py). Every data-parallel replica holds the same parameters, so each
    computes the same byte-balanced assignment to replicas without communication. A mirror (an MTP
    copy of the embedding) is assigned on its own, so two large copies need not land on one replica.
    """
    shards = [_shard_specs(rule, ranks, dtype) for rule, dtype in held]
    owner: dict[str, int] = {}
    for expert in (False, True):
        sizes: dict[str, int] = {}
        for (rule, _), pieces in zip(held, shards):
            if (rule.expert is not None) == expert:
                for key, _, spec in pieces:
                    sizes[key] = sizes.get(key, 0) + piece_nbytes(spec)
        owner.update(balanced_owners(sizes, ranks.replica(expert)[1]))
    return [
        [(i, spec) for key, i, spec in pieces if owner[key] == ranks.replica(rule.expert is not None)[0]]
        for (rule, _), pieces in zip(held, shards)
    ]


def balanced_owners(sizes: dict[str, int], replicas: int) -> dict[str, int]:
    """name -> replica index: largest first, each to the replica with the fewest bytes so far (ties: the
    lowest index). Depends only on the names and sizes, not on their order."""
    loads = [(0, r) for r in range(replicas)]
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        load, r = heapq.heappop(loads)
        owners[name] = r
        heapq.heappush(loads, (load + sizes[name], r))
    return owners


def _shard_specs(rule: Rule, ranks: Ranks, dtype: torch.dtype) -> list[tuple[str, int, PieceSpec]]:
    """(ownership key, part index, spec) of the pieces of this rank's tensor-parallel shard, were its
    replica the writer. The key is the Megatron name, or the HF name of a mirror."""
    rank, size = ranks.tensor_parallel(rule.expert is not None)
    if rule.shard.replicated and rank != 0:
        return []
    out = []
    for i, spec in enumerate(rule.specs(rank, size, dtype)):
        if 0 in region_shape(spec.region):
            continue  # a vocab shard made of padding only
        out.append((rule.megatron, i, spec))
        out += [(mirror, i, replace(spec, hf_name=mirror)) for mirror in (rule.mirrors if i == 0 else ())]
    return out


class _Values:
    """Converts one local tensor once, however many pieces (and mirrors) it yields, and lets the converted
    tensors go once the last of its `uses` pieces is made."""

    def __init__(self, rule: Rule, tensor: torch.Tensor, rank: int, size: int, uses: int):
        self.rule, self.tensor, self.rank, self.size, self.uses = rule, tensor, rank, size, uses
        self._tensors: list[torch.Tensor] | None = None

    def make(self, i: int, dtype: torch.dtype, copy: bool = True) -> torch.Tensor:
        if self._tensors is None:
            self._tensors = self.rule.to_hf(self.tensor.detach().to("cpu"), self.rank, self.size)
        # copy=True: pieces must not alias live parameters (training goes on while they are written).
        tensor = self._tensors[i].to(dtype=dtype, memory_format=torch.contiguous_format, copy=copy)
        self.uses -= 1
        if not self.uses:
            self._tensors = None
        return tensor
