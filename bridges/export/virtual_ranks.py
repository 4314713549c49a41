"""Every rank of a parallel layout from metadata alone: its place in the groups, the canonical Megatron
parameters it holds and the HF pieces it writes on export (or reads on import).

Plans the export of a model of any size without building it: no tensor is allocated, no process group
is created. Ownership is the export's own decision (`bridges.export.owned_specs`); this module only says
which parameters sit on which rank, as Megatron-Core 0.16 places them (rank order tp-cp-ep-dp-pp, even or
first/last-uneven pipeline split, MTP on the last stage, experts split evenly over expert-parallel ranks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
import torch

from bridges.export.specs import family_ruleset, owned_pieces
from bridges.rules.expert_layouts import ExpertLayout
from bridges.rules.local_params import EMBEDDING, OUTPUT, Ranks
from bridges.architecture import GPTArchitecture
from bridges.megatron.layout import ParallelLayout, stage_layers  # noqa: F401 (stage_layers re-exported)
from bridges.checkpoint.pieces import PieceSpec
from bridges.rules.rule import Rule, RuleSet
from bridges.rules.vision_tower import MEGATRON_PREFIX as VISION_PREFIX

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_LAST_STAGE = ("decoder.final_layernorm.", "mtp.layers.", OUTPUT)


@dataclass(frozen=True)
class VirtualRank:
    rank: int  # global rank
    pp_rank: int
    ranks: Ranks


@dataclass(frozen=True)
class VirtualParam:
    """A parameter a rank holds, under its canonical global name (see local_params.py)."""

    name: str
    rule: Rule
    exported: bool = True  # False for a copy another stage writes (tied output layer, MTP embedding)

    def local_shape(self, ranks: Ranks) -> tuple[int, ...]:
        rule = self.rule
        # The shape depends on the op chain and the sharding, not on names or the expert index.
        key = (rule.hf_shapes, rule.views, rule.first_views, rule.combine, rule.shard, *_tp(rule, ranks))
        if key not in _LOCAL_SHAPES:
            _LOCAL_SHAPES[key] = rule.local_shape(*_tp(rule, ranks))
        return _LOCAL_SHAPES[key]


_LOCAL_SHAPES: dict[tuple, tuple[int, ...]] = {}


def virtual_ranks(layout: ParallelLayout, world_size: int) -> list[VirtualRank]:
    """The coordinates of every global rank, as Megatron's default order tp-cp-ep-dp-pp assigns them.

    Dense parameters see the ranks as tp x dp x pp, expert parameters as etp x ep x edp x pp (cp = 1).
    """
    layout.check(world_size)
    tp, etp, ep, pp = layout.tp, layout.expert_tp, layout.ep, layout.pp
    dp, edp = world_size // (tp * pp), world_size // (etp * ep * pp)
    out = []
    for r in range(world_size):
        ranks = Ranks(
            tp_rank=r % tp, tp_size=tp, etp_rank=r % etp, etp_size=etp, ep_rank=r // etp % ep, ep_size=ep,
            dp_rank=r // tp % dp, edp_rank=r // (etp * ep) % edp, dp_size=dp, edp_size=edp,
        )
        out.append(VirtualRank(r, r // (tp * dp), ranks))
    return out


class LayoutPlanner:
    """Which canonical parameters each rank of `layout` holds, for one model (`arch`, `family`)."""

    def __init__(
        self, family, arch: GPTArchitecture, layout: ParallelLayout, world_size: int,
        expert_layout: ExpertLayout | None = None, first_stage_layers: int | None = None,
        last_stage_layers: int | None = None,
    ):
        if first_stage_layers is not None or last_stage_layers is not None:  # else the layout's own split
            layout = replace(layout, first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers)
        self.arch, self.layout = arch, layout
        self.ruleset: RuleSet = family_ruleset(family, arch, expert_layout)
        self.ranks = virtual_ranks(layout, world_size)
        layout.check(world_size, arch.num_experts or 0)
        stages = layout.stage_layers(arch.num_layers)
        self._stage_of_layer = {layer: stage for stage, layers in enumerate(stages) for layer in layers}
        self._experts_per_rank = (arch.num_experts or 0) // layout.ep
        self._by_place = self._place_rules()

    def params(self, vrank: VirtualRank) -> list[VirtualParam]:
        """The parameters `vrank` holds; every rule's parameter is on at least one rank."""
        out = [VirtualParam(rule.megatron, rule) for rule in self._by_place.get((vrank.pp_rank, None), [])]
        experts = self._by_place.get((vrank.pp_rank, vrank.ranks.ep_rank), [])
        out += [VirtualParam(rule.megatron, rule) for rule in experts]
        last, pp = vrank.pp_rank == self.layout.pp - 1, self.layout.pp
        embedding = self.ruleset.rule_for(EMBEDDING)
        if last and pp > 1 and self.arch.mtp_num_layers:
            out.append(VirtualParam(EMBEDDING, embedding, exported=False))  # the MTP block's own embedding
        if last and pp > 1 and self.arch.tie_word_embeddings:
            out.append(VirtualParam(EMBEDDING, embedding, exported=False))  # the output layer's tied copy
        return out

    def export_specs(self, vrank: VirtualRank, dtype: torch.dtype) -> list[PieceSpec]:
        """What `bridges.export.export_specs` gives on that rank of a built model (order aside)."""
        held = [(p.rule, dtype) for p in self.params(vrank) if p.exported]
        return [spec for pieces in owned_pieces(held, vrank.ranks) for _, spec in pieces]

    def import_specs(self, vrank: VirtualRank, dtype: torch.dtype) -> list[PieceSpec]:
        """The HF regions `bridges.load.import_weights` reads on that rank (mirror checks aside)."""
        return [spec for p in self.params(vrank) for spec in p.rule.specs(*_tp(p.rule, vrank.ranks), dtype)]

    def all_export_specs(self, dtype: torch.dtype) -> list[list[PieceSpec]]:
        return [self.export_specs(v, dtype) for v in self.ranks]

    def _place_rules(self) -> dict[tuple[int, int | None], list[Rule]]:
        """(pipeline stage, expert-parallel rank or None for every rank of the stage) -> rules."""
        placed: dict[tuple[int, int | None], list[Rule]] = {}
        for rule in self.ruleset.rules:
            ep_rank = None if rule.expert is None else rule.expert // self._experts_per_rank
            placed.setdefault((self._stage(rule.megatron), ep_rank), []).append(rule)
        return placed

    def _stage(self, name: str) -> int:
        """The pipeline stage that writes parameter `name` (copies elsewhere are added by `params`)."""
        if name == EMBEDDING or name.startswith(VISION_PREFIX):  # the vision tower runs on the first stage
            return 0
        if m := _LAYER.match(name):
            return self._stage_of_layer[int(m[1])]
        if name.startswith(_LAST_STAGE):
            return self.layout.pp - 1
        raise ValueError(f"{name}: no rule says on which pipeline stage Megatron builds this parameter")


def _tp(rule: Rule, ranks: Ranks) -> tuple[int, int]:
    return ranks.tensor_parallel(rule.expert is not None)
