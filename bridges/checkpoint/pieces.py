"""The two shapes data takes between the conversion rules and the file I/O.

- `Piece`: a rectangular region of one HF tensor, with its values, produced on the rank that owns
  it (export) or requested by the rank that needs it (import). Regions are tuples of `slice`s in HF
  tensor coordinates, one per dimension, with start/stop/step all explicit (step >= 1).
- `HFSource`: what an import reads from (a safetensors checkpoint directory, or a dict in tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

Region = tuple[slice, ...]


def full_region(shape: tuple[int, ...]) -> Region:
    return tuple(slice(0, n, 1) for n in shape)


def region_shape(region: Region) -> tuple[int, ...]:
    return tuple(len(range(s.start, s.stop, s.step)) for s in region)


@dataclass
class PieceSpec:
    """Metadata of a piece: enough to plan files without any tensor data."""

    hf_name: str
    hf_shape: tuple[int, ...]
    dtype: torch.dtype
    region: Region


@dataclass
class Piece:
    spec: PieceSpec
    tensor: torch.Tensor  # shape == region_shape(spec.region), dtype == spec.dtype


class HFSource(Protocol):
    """Read access to HF tensors by name, one region at a time (metadata is cheap, data is not)."""

    def keys(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def where(self, name: str) -> str:
        """Where the tensor lives, for error messages (a file path, or '<memory>')."""
        ...

    def read(self, name: str, region: Region | None = None) -> torch.Tensor: ...
