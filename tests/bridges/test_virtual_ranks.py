"""Ranks planned from metadata alone (bridges/export/virtual_ranks.py) against built models: on every rank of
2- and 4-process layouts, the same place in the parallel groups, the same parameters and local shapes,
and the same export pieces as `export_specs` of the real model; plus the pipeline split and the
byte-balanced choice of the writing replica."""

from __future__ import annotations

import pytest
import torch

from bridges.export.specs import balanced_owners
from bridges.megatron.layout import LayoutError, ParallelLayout
from bridges.export.virtual_ranks import stage_layers
from tests.bridges.glm45_tiny import tiny_config
from tests.launcher import run_distributed

EXPERT_LAYOUTS = ("per_expert", "fused")


def _config(tied: bool) -> dict:
    return {**tiny_config(tie_word_embeddings=tied).to_dict(), "model_type": "glm4_moe"}


def _key(spec) -> tuple:
    return spec.hf_name, tuple((s.start, s.stop, s.step) for s in spec.region), str(spec.dtype), spec.hf_shape


def real_ranks(cases):
    """On every rank, for each (layout, tied, stage overrides): what the built model holds and exports."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from bridges.export.specs import export_specs
    from bridges.rules.local_params import Ranks, local_params
    from bridges.megatron import build, parallel
    from bridges.models import glm45

    out = []
    for layout, tied, stages in cases:
        arch = glm45.architecture(_config(tied))
        parallel.initialize(layout)
        model = build.build_gpt_model(arch, layout)  # uneven stages: the layout's first/last_stage_layers
        params = sorted((p.name, p.exported, tuple(p.tensor.shape)) for p in local_params([model]))
        specs = {e: sorted(map(_key, export_specs([model], glm45.FAMILY, arch, None, e))) for e in EXPERT_LAYOUTS}
        out.append((dist.get_rank(), ps.get_pipeline_model_parallel_rank(), Ranks.current(), params, specs))
    return out


def _assert_same_as_planned(world, cases, results):
    from bridges.models import glm45
    from bridges.export.virtual_ranks import LayoutPlanner

    for i, (layout, tied, stages) in enumerate(cases):
        arch = glm45.architecture(_config(tied))
        planners = {e: LayoutPlanner(glm45.FAMILY, arch, layout, world, e) for e in EXPERT_LAYOUTS}
        for rank_results in results:
            rank, pp_rank, ranks, params, specs = rank_results[i]
            vrank = planners["per_expert"].ranks[rank]
            where = f"{layout} tied={tied} {stages} rank {rank}"
            assert (vrank.rank, vrank.pp_rank, vrank.ranks) == (rank, pp_rank, ranks), where
            planned = sorted((p.name, p.exported, p.local_shape(ranks)) for p in planners["per_expert"].params(vrank))
            assert planned == params, where
            for e, planner in planners.items():
                assert sorted(map(_key, planner.export_specs(vrank, torch.float32))) == specs[e], f"{where} {e}"


WORLD_2 = [
    (ParallelLayout(ep=2), False, {}),
    (ParallelLayout(tp=2), False, {}),
    (ParallelLayout(pp=2), False, {}),
    (ParallelLayout(pp=2, first_stage_layers=1), True, {}),
]
WORLD_4 = [
    (ParallelLayout(tp=2, ep=2), False, {}),
    (ParallelLayout(pp=2, ep=2), True, {}),
    (ParallelLayout(tp=2, pp=2, last_stage_layers=1), False, {}),
    (ParallelLayout(ep=2, etp=1, tp=2), False, {}),
]


@pytest.mark.parametrize("world, cases", [(2, WORLD_2), (4, WORLD_4)], ids=["world-2", "world-4"])
def test_planned_ranks_match_built_models(world, cases):
    _assert_same_as_planned(world, cases, run_distributed(world, real_ranks, cases))


def test_stage_layers_even_and_uneven():
    assert stage_layers(8, 1) == [range(0, 8)]
    assert stage_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_layers(92, 8, first=10, last=10) == [range(0, 10)] + [range(10 + 12 * i, 22 + 12 * i) for i in range(6)] + [range(82, 92)]
    assert stage_layers(4, 2, first=1) == [range(0, 1), range(1, 4)]
    for args in [(92, 8), (4, 2, 5), (4, 1, 2), (5, 2, 1, 1)]:
        with pytest.raises(LayoutError):
            stage_layers(*args)


def test_balanced_owners_spread_bytes_whatever_the_order():
    sizes = {"embedding": 100, "mirror": 100, "qkv": 40, "o": 30, "fc1": 30, "norm": 1}
    owners = balanced_owners(sizes, 2)
    assert owners == balanced_owners(dict(reversed(list(sizes.items()))), 2)
    loads = [sum(n for name, n in sizes.items() if owners[name] == r) for r in range(2)]
    # Largest first (LPT) is within 4/3 of the best split.
    assert owners["embedding"] != owners["mirror"] and max(loads) <= 4 / 3 * sum(sizes.values()) / 2
    assert set(balanced_owners(sizes, 1).values()) == {0}
