"""The parallel layout of a run (TP, PP, EP, expert-TP) and the checks that it fits a world size.

Pure data: no process groups are created here (see `parallel.py`).
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A parallel layout that cannot run (raised before any process group is created)."""


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel; None means "same as tp"
    # Uneven pipeline stages (Megatron's num_layers_in_first/last_pipeline_stage); None: an even split.
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    virtual_stages: int | None = None  # interleaved schedule: not supported (refused by `check`)

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)

    def check_model(self, world_size: int, arch) -> None:
        """`check` against a model (a `GPTArchitecture`): what train.py, the Lightning module and
        `python -m bridges.plan` refuse alike, with the same message."""
        self.check(world_size, arch.num_experts or 0, arch.num_layers, arch.expert_biases, arch.tensor_parallel_heads)

    def check(self, world_size: int, num_experts: int | None = None, num_layers: int | None = None,
              expert_biases: bool = False, heads: dict[str, int] | None = None) -> None:
        for name, value in (("tp", self.tp), ("pp", self.pp), ("ep", self.ep), ("etp", self.expert_tp)):
            if value < 1:
                raise LayoutError(f"parallel.{name} must be >= 1, got {value}")
        # num_experts: None when unknown here, 0 for a dense model.
        if num_experts == 0 and self.ep > 1:
            raise LayoutError(f"parallel.ep={self.ep} needs an MoE model, this model has no experts")
        if num_experts and num_experts % self.ep:
            raise LayoutError(f"parallel.ep={self.ep} does not divide the expert count {num_experts}")
        if expert_biases and num_experts and self.expert_tp > 1:
            # Megatron-Core 0.16: "Bias in Moe is only supported when ETP==1"
            raise LayoutError(
                f"this model's experts have biases, which Megatron-Core supports only with expert tensor "
                f"parallel 1: set parallel.etp=1 (got {self.expert_tp})"
            )
        for name, count in (heads or {}).items():  # e.g. GPTArchitecture.tensor_parallel_heads
            if count % self.tp:
                raise LayoutError(f"parallel.tp={self.tp} does not divide {name}={count}")
        if self.virtual_stages not in (None, 1):
            raise LayoutError(
                f"parallel.virtual_stages={self.virtual_stages}: the interleaved pipeline schedule (virtual "
                f"stages) is not supported; use parallel.first_stage_layers / last_stage_layers to balance stages"
            )
        for name in ("first_stage_layers", "last_stage_layers"):
            value = getattr(self, name)
            if value is not None and (self.pp < 2 or value < 1):
                raise LayoutError(f"parallel.{name}={value} needs parallel.pp > 1 and at least one layer")
        if num_layers is not None:
            self.stage_layers(num_layers)
        if world_size % (self.tp * self.pp):
            raise LayoutError(
                f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {self.tp} x {self.pp}"
            )
        if world_size % (self.expert_tp * self.ep * self.pp):
            raise LayoutError(
                f"world size {world_size} is not divisible by parallel.etp x parallel.ep x parallel.pp = "
                f"{self.expert_tp} x {self.ep} x {self.pp}"
            )

    def stage_layers(self, num_layers: int) -> list[range]:
        """Global decoder layer numbers of each pipeline stage, as Megatron-Core builds them: an even
        split, or `first_stage_layers` / `last_stage_layers` on the end stages and the rest split evenly."""
        return stage_layers(num_layers, self.pp, self.first_stage_layers, self.last_stage_layers)


def stage_layers(num_layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[range]:
    """See `ParallelLayout.stage_layers`."""
    counts = [None] * pp
    if pp > 1:
        counts[0], counts[-1] = first, last
    elif first is not None or last is not None:
        raise LayoutError("parallel.first_stage_layers / last_stage_layers need pipeline parallelism (pp > 1)")
    fixed = sum(c for c in counts if c is not None)
    free = counts.count(None)
    if fixed > num_layers or (free and (num_layers - fixed) % free) or (not free and fixed != num_layers):
        if first is None and last is None:
            raise LayoutError(f"parallel.pp={pp} does not divide the layer count {num_layers} (set "
                              f"parallel.first_stage_layers / last_stage_layers for uneven stages)")
        raise LayoutError(
            f"{num_layers} layers do not split over {pp} pipeline stages with parallel.first_stage_layers={first}, "
            f"parallel.last_stage_layers={last} (the middle stages must share the rest evenly)"
        )
    each = (num_layers - fixed) // free if free else 0
    out, start = [], 0
    for c in counts:
        n = each if c is None else c
        out.append(range(start, start + n))
        start += n
    return out
