"""The export plan of the real GLM-4.5 (355B) at training layouts of 32 and 256 ranks, from metadata alone:
pieces, files, the busiest rank against the mean, and the CPU time it takes (bridges/export/virtual_ranks.py).

    python benchmarks/plan_bench.py [--out docs/benchmarks_plan.json]

What every rank of a real export also does before writing: compute its pieces, check the coverage of all
ranks' pieces, plan the files and the merges of fragmented pieces (write_checkpoint), so the CPU time is
that of one rank. A later export of the same run reuses that plan (the callback keeps its pieces, the writer's
PlanCache the plan): its planning CPU per rank is the cache lookup, measured here on the rank with the most
pieces, with inputs equal to the first export's but not the same objects (the callback passes fresh ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bridges.export.specs import hf_tensor_specs  # noqa: E402
from bridges.export.writer import DEFAULT_MAX_SHARD_BYTES, PlanCache, plan_export  # noqa: E402
from bridges.megatron.layout import ParallelLayout  # noqa: E402
from bridges.models.glm45 import FAMILY as glm45  # noqa: E402
from bridges.checkpoint.piece_bytes import piece_nbytes  # noqa: E402
from bridges.export.virtual_ranks import LayoutPlanner  # noqa: E402
from tests.bridges.test_full_scale_plan import GLM45_355B  # noqa: E402

LAYOUTS = [  # (name, layout, world size, uneven pipeline stages)
    ("TP2 x PP8 x EP16", ParallelLayout(tp=2, pp=8, ep=16), 256, {"first_stage_layers": 10, "last_stage_layers": 10}),
    ("TP8 x PP4 x EP8, ETP1", ParallelLayout(tp=8, pp=4, ep=8, etp=1), 32, {}),
    ("TP8 x PP4 x EP8", ParallelLayout(tp=8, pp=4, ep=8), 256, {}),
]


def plan(name: str, layout: ParallelLayout, world: int, stages: dict, dtype=torch.bfloat16) -> dict:
    arch = glm45.architecture(GLM45_355B)
    cpu, wall = time.process_time(), time.perf_counter()
    tensor_specs = hf_tensor_specs(glm45, arch, dtype)
    planner = LayoutPlanner(glm45, arch, layout, world, **stages)
    specs_by_rank = planner.all_export_specs(dtype)
    pieces_cpu = time.process_time() - cpu
    export_plan = plan_export(tensor_specs, specs_by_rank, DEFAULT_MAX_SHARD_BYTES)  # coverage, files, merges
    files, merges = export_plan.files, export_plan.merges
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    written = [sum(piece_nbytes(s) for s in specs) for specs in specs_by_rank]
    first, later = _per_export_cpu(planner, tensor_specs, specs_by_rank, dtype)
    mean = sum(written) / world
    return {
        "layout": name, "ranks": world, "stages": stages, "tensors": len(tensor_specs),
        "total_bytes": sum(written), "pieces": sum(map(len, specs_by_rank)), "files": len(files.files),
        "merged_tensors": len(merges),
        "largest_file": max(f.size for f in files.files), "max_shard_bytes": DEFAULT_MAX_SHARD_BYTES,
        "busiest_rank_bytes": max(written), "mean_rank_bytes": mean, "busiest_over_mean": max(written) / mean,
        "plan_cpu_seconds": cpu, "plan_wall_seconds": wall,
        # A real rank computes only its own pieces; the checks over all ranks' pieces it repeats.
        "all_pieces_cpu_seconds": pieces_cpu, "checks_cpu_seconds": cpu - pieces_cpu,
        # Planning CPU of one rank (the one with the most pieces) per export: the first, and every later one.
        "first_export_cpu_seconds": first, "later_export_cpu_seconds": later,
    }


def _per_export_cpu(planner: LayoutPlanner, tensor_specs: dict, specs_by_rank: list, dtype) -> tuple[float, float]:
    """CPU seconds of one rank's planning at its first export (the tensor specs, its own pieces, the plan
    from every rank's pieces, as write_checkpoint makes it) and at a later one (the PlanCache lookup)."""
    busiest = max(range(len(specs_by_rank)), key=lambda r: len(specs_by_rank[r]))
    cpu = time.process_time()
    specs = hf_tensor_specs(glm45, planner.arch, dtype)
    mine = planner.export_specs(planner.ranks[busiest], dtype)
    cache = PlanCache()
    cache.store(specs, mine, DEFAULT_MAX_SHARD_BYTES, None, "owner", len(specs_by_rank),
                plan_export(specs, specs_by_rank, DEFAULT_MAX_SHARD_BYTES))
    first = time.process_time() - cpu
    again_specs, again_mine = dict(specs), list(mine)  # what the callback passes at a later export
    cpu = time.process_time()
    plan = cache.lookup(again_specs, again_mine, DEFAULT_MAX_SHARD_BYTES, None, "owner", len(specs_by_rank))
    later = time.process_time() - cpu
    assert plan is not None, "the plan of the first export was not reused"
    return first, later


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks_plan.json"))
    args = parser.parse_args()
    results = []
    for name, layout, world, stages in LAYOUTS:
        results.append(plan(name, layout, world, stages))
        r = results[-1]
        print(f"{name} on {world} ranks: {r['pieces']} pieces, busiest rank {r['busiest_over_mean']:.2f}x the mean, "
              f"{r['plan_cpu_seconds']:.1f} s CPU ({r['checks_cpu_seconds']:.1f} s in the checks every rank runs); "
              f"per rank and export: first {r['first_export_cpu_seconds']:.2f} s, later {r['later_export_cpu_seconds']:.3f} s",
              flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": "GLM-4.5 355B (bf16)", "layouts": results}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
