"""`python -m bridges.plan CONFIG_OR_DIR --tp T --pp P --ep E [--etp X] [--world W] [--dtype bf16] [--write-gbps G]`:
the HF export of a model planned from its config alone, before a job is launched.

Prints the files, the bytes each rank writes (busiest / mean), the tensors merged from tensor-parallel shards
and the expected export time. Plans with the export engine itself over virtual ranks (bridges/export/); builds
no model, reads no weight, starts no process. Refuses the layouts a run refuses, with the same message.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

from bridges.checkpoint import hf_config
from bridges.checkpoint.piece_bytes import piece_nbytes
from bridges.errors import debug, user_errors
from bridges.export.specs import hf_tensor_specs
from bridges.export.virtual_ranks import LayoutPlanner
from bridges.export.writer import DEFAULT_MAX_SHARD_BYTES, plan_export
from bridges.megatron.layout import ParallelLayout
from bridges.models import family_for
from bridges.rules.vision_tower import MEGATRON_PREFIX as VISION_PREFIX

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GB = 1e9


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass
class ExportPlanSummary:
    model_type: str
    layout: ParallelLayout
    world: int
    dtype: str
    tensors: int
    file_sizes: list[int]
    bytes_by_rank: list[int]
    merged_tensors: int
    vision_tensors: int  # vision-language families: the vision tower's tensors
    vision_bytes: int
    vision_writers: list[int]  # the ranks that write them (on the first pipeline stage)
    first_stage_ranks: list[int]

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_rank)

    @property
    def busiest(self) -> int:
        return max(self.bytes_by_rank)

    @property
    def mean(self) -> float:
        return self.total_bytes / self.world

    def seconds(self, write_gbps: float) -> float:
        """Every rank writes its own bytes at the same time: the busiest rank sets the time."""
        return self.busiest / (write_gbps * GB)


def _duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1e3:.3g} ms"


def smallest_world(layout: ParallelLayout) -> int:
    """The fewest ranks the layout runs on: a multiple of tp x pp and of etp x ep x pp."""
    return math.lcm(layout.tp * layout.pp, layout.expert_tp * layout.ep * layout.pp)


def plan_export_of(config: dict, layout: ParallelLayout, world: int, dtype: str = "bf16",
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportPlanSummary:
    """The export plan of the model `config` describes, trained with `layout` on `world` ranks.
    Raises HFConfigError for a config no family reads, LayoutError for a layout the run would refuse."""
    family = family_for(config)
    arch = family.architecture(config)
    layout.check_model(world, arch)
    planner = LayoutPlanner(family, arch, layout, world)
    tensor_specs = hf_tensor_specs(family, arch, DTYPES[dtype])
    specs_by_rank = planner.all_export_specs(DTYPES[dtype])
    plan = plan_export(tensor_specs, specs_by_rank, max_shard_bytes)  # what write_checkpoint checks and plans
    vision = {name for rule in planner.ruleset.rules if rule.megatron.startswith(VISION_PREFIX) for name in rule.hf}
    return ExportPlanSummary(
        model_type=config["model_type"], layout=layout, world=world, dtype=dtype, tensors=len(tensor_specs),
        file_sizes=[f.size for f in plan.files.files], bytes_by_rank=[sum(map(piece_nbytes, s)) for s in specs_by_rank],
        merged_tensors=len(plan.merges), vision_tensors=len(vision),
        vision_bytes=sum(math.prod(tensor_specs[n][0]) * tensor_specs[n][1].itemsize for n in vision),
        vision_writers=[r for r, specs in enumerate(specs_by_rank) if any(s.hf_name in vision for s in specs)],
        first_stage_ranks=[v.rank for v in planner.ranks if v.pp_rank == 0],
    )


def describe(plan: ExportPlanSummary, write_gbps: float) -> list[str]:
    """The plan as lines for a person deciding whether to launch."""
    l = plan.layout
    busiest_rank = plan.bytes_by_rank.index(plan.busiest)
    idle = sum(1 for b in plan.bytes_by_rank if b == 0)
    stages = ""
    if l.first_stage_layers or l.last_stage_layers:
        stages = f", first / last stage layers {l.first_stage_layers} / {l.last_stage_layers}"
    lines = [
        f"model: {plan.model_type}, {plan.tensors} HF tensors, {_size(plan.total_bytes)} in {plan.dtype}",
        f"layout: TP{l.tp} x PP{l.pp} x EP{l.ep}, expert TP {l.expert_tp}{stages} on {plan.world} ranks "
        f"(data parallel {plan.world // (l.tp * l.pp)}, expert data parallel {plan.world // (l.expert_tp * l.ep * l.pp)})",
        f"files: {len(plan.file_sizes)} (largest {_size(max(plan.file_sizes))})",
        f"bytes written per rank: busiest {_size(plan.busiest)} (rank {busiest_rank}), mean {_size(plan.mean)}, "
        f"busiest / mean {plan.busiest / plan.mean:.2f}x; {idle} of {plan.world} ranks write nothing",
        f"merged tensors: {plan.merged_tensors} (row-parallel shards sent to one writer of their tensor-parallel group)",
    ]
    if plan.vision_tensors:
        writers = (f"{len(plan.vision_writers)} of the {len(plan.first_stage_ranks)} ranks of the first pipeline stage"
                   if set(plan.vision_writers) <= set(plan.first_stage_ranks) else f"ranks {plan.vision_writers}")
        lines.append(f"vision tower: {plan.vision_tensors} tensors, {_size(plan.vision_bytes)}, written by {writers}")
    lines.append(
        f"expected export time at {write_gbps:g} GB/s per rank: {_duration(plan.seconds(write_gbps))} (the busiest "
        f"rank); {_duration(plan.total_bytes / (write_gbps * GB))} if all ranks share one {write_gbps:g} GB/s path"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridges.plan", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", metavar="CONFIG_OR_DIR", help="an HF config.json or a directory holding one")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None, help="expert tensor parallel (default: --tp)")
    parser.add_argument("--first-stage-layers", type=int, default=None)
    parser.add_argument("--last-stage-layers", type=int, default=None)
    parser.add_argument("--world", type=int, default=None, help="ranks (default: the fewest the layout runs on)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--write-gbps", type=float, default=1.0, help="write bandwidth of one rank, GB/s")
    args = parser.parse_args(argv)
    try:
        if args.write_gbps <= 0:
            raise ValueError(f"--write-gbps must be > 0, got {args.write_gbps}")
        layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp,
                                first_stage_layers=args.first_stage_layers, last_stage_layers=args.last_stage_layers)
        world = args.world if args.world is not None else smallest_world(layout)
        if world < 1:
            raise ValueError(f"--world must be >= 1, got {world}")
        plan = plan_export_of(hf_config.load_config(args.config), layout, world, args.dtype)
    except (*user_errors(), ValueError) as e:
        if debug():
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(describe(plan, args.write_gbps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
