"""An in-memory `HFSource`: HF tensors in a dict (tests, in-memory round trips, renamed checkpoints).

Checkpoint directories are read by `bridges.checkpoint.safetensors_io.SafetensorsCheckpoint`, not here.
"""

from __future__ import annotations

import torch

from bridges.checkpoint.pieces import Region


class DictSource:
    """HF tensors held in memory, by name."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str = "<memory>"):
        self.tensors = tensors
        self._where = where

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def where(self, name: str) -> str:
        return self._where

    def read(self, name: str, region: Region | None = None) -> torch.Tensor:
        tensor = self.tensors[name]
        return (tensor if region is None else tensor[region]).clone()
