"""Where a Megatron-oriented tensor ("part") lies inside one HF tensor: an affine, strided index map.

A `View` turns a region of the part into a region of the HF tensor (for reads and writes of slices)
and turns the values between the two orientations. Pure index arithmetic: no tensor data is held.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from bridges.checkpoint.pieces import Region


@dataclass(frozen=True)
class View:
    hf_shape: tuple[int, ...]
    offset: tuple[int, ...]  # per HF dim: first HF index of the part
    step: tuple[int, ...]  # per HF dim: HF stride between neighbouring part indices
    length: tuple[int, ...]  # per HF dim: part extent (1 for a fixed index)
    order: tuple[int, ...]  # part dim p is HF dim order[p]; HF dims not listed are fixed indices

    @staticmethod
    def whole(hf_shape: tuple[int, ...]) -> "View":
        n = len(hf_shape)
        return View(tuple(hf_shape), (0,) * n, (1,) * n, tuple(hf_shape), tuple(range(n)))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.length[d] for d in self.order)

    def select(self, part_dim: int, index: int) -> "View":
        """Fix one index of a part dim (that dim disappears), e.g. one expert of a fused tensor."""
        d = self.order[part_dim]
        if not 0 <= index < self.length[d]:
            raise IndexError(f"index {index} out of range for part dim {part_dim} of size {self.length[d]}")
        return replace(
            self,
            offset=_set(self.offset, d, self.offset[d] + self.step[d] * index),
            length=_set(self.length, d, 1),
            order=tuple(x for x in self.order if x != d),
        )

    def transpose(self, a: int, b: int) -> "View":
        order = list(self.order)
        order[a], order[b] = order[b], order[a]
        return replace(self, order=tuple(order))

    def stride(self, part_dim: int, start: int, step: int, length: int) -> "View":
        """Keep every `step`-th index of a part dim from `start`, `length` of them."""
        d = self.order[part_dim]
        return replace(
            self,
            offset=_set(self.offset, d, self.offset[d] + self.step[d] * start),
            step=_set(self.step, d, self.step[d] * step),
            length=_set(self.length, d, length),
        )

    def region(self, part_region: Region) -> Region:
        """The HF region holding `part_region` of the part."""
        out = []
        for d in range(len(self.hf_shape)):
            if d not in self.order:
                out.append(slice(self.offset[d], self.offset[d] + 1, 1))
                continue
            s = part_region[self.order.index(d)]
            n = len(range(s.start, s.stop, s.step))
            start = self.offset[d] + self.step[d] * s.start
            step = self.step[d] * s.step
            out.append(slice(start, start + (n - 1) * step + 1 if n else start, step))
        return tuple(out)

    def to_part(self, hf_values: torch.Tensor) -> torch.Tensor:
        """Values read from an HF region -> the same values in part orientation."""
        fixed = [d for d in range(len(self.hf_shape)) if d not in self.order]
        for d in reversed(fixed):
            hf_values = hf_values.squeeze(d)
        kept = sorted(self.order)
        return hf_values.permute(*[kept.index(d) for d in self.order])

    def to_hf(self, part_values: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_part`: part values -> values shaped like their HF region."""
        kept = sorted(self.order)
        out = part_values.permute(*[self.order.index(d) for d in kept])
        for d in range(len(self.hf_shape)):
            if d not in self.order:
                out = out.unsqueeze(d)
        return out


def _set(values: tuple[int, ...], index: int, value: int) -> tuple[int, ...]:
    return values[:index] + (value,) + values[index + 1 :]
