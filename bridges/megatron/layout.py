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

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)

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
        if num_layers is not None and num_layers % self.pp:
            raise LayoutError(f"parallel.pp={self.pp} does not divide the layer count {num_layers}")
        if world_size % (self.tp * self.pp):
            raise LayoutError(
                f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {self.tp} x {self.pp}"
            )
        if world_size % (self.expert_tp * self.ep * self.pp):
            raise LayoutError(
                f"world size {world_size} is not divisible by parallel.etp x parallel.ep x parallel.pp = "
                f"{self.expert_tp} x {self.ep} x {self.pp}"
            )
