"""The file plan of an export: which shard file holds each tensor, at which byte offset, under which header.

Computed from tensor metadata alone, deterministically, so every rank derives the same plan. Never
touches tensor data or the filesystem.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from bridges.checkpoint.safetensors_format import SINGLE_FILE_NAME, encode_header, itemsize

DEFAULT_METADATA = {"format": "pt"}  # what transformers writes; its loader checks the format key

TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor's bytes go: the file and the absolute byte offset of its first byte."""

    name: str
    file: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass(frozen=True)
class PlannedFile:
    name: str
    header: bytes  # 8-byte length + padded JSON, written at offset 0
    size: int  # header + data: the file's final size
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class FilePlan:
    files: tuple[PlannedFile, ...]
    slots: dict[str, TensorSlot] = field(repr=False)

    @property
    def total_size(self) -> int:
        return sum(slot.nbytes for slot in self.slots.values())

    def weight_map(self) -> dict[str, str]:
        return {name: self.slots[name].file for name in sorted(self.slots)}

    def index_json(self) -> str:
        """`model.safetensors.index.json` as transformers writes it (sorted keys, indent 2)."""
        total_parameters = sum(math.prod(s.shape) for s in self.slots.values())
        index = {
            "metadata": {"total_size": self.total_size, "total_parameters": total_parameters},
            "weight_map": self.weight_map(),
        }
        return json.dumps(index, indent=2, sort_keys=True) + "\n"


def plan_files(specs: TensorSpecs, max_shard_bytes: int, metadata: dict[str, str] | None = None) -> FilePlan:
    """Shard `specs` (name -> (shape, dtype)) into files of at most `max_shard_bytes` of tensor data.

    Names are taken in sorted order and packed greedily, as huggingface_hub shards a state dict; a
    tensor larger than the limit gets a file of its own (kept in name order, unlike the hub). One
    file is named `model.safetensors`, more are `model-0000i-of-0000N.safetensors`, as transformers
    names them.
    """
    if not specs:
        raise ValueError("nothing to export: no tensors were given")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    metadata = DEFAULT_METADATA if metadata is None else metadata
    shards = _shard(specs, max_shard_bytes)
    names = [SINGLE_FILE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    files, slots = [], {}
    for file, tensors in zip(names, shards):
        planned, file_slots = _plan_one_file(file, tensors, specs, metadata)
        files.append(planned)
        slots.update(file_slots)
    return FilePlan(tuple(files), slots)


def _nbytes(spec: tuple[tuple[int, ...], torch.dtype]) -> int:
    shape, dtype = spec
    return math.prod(shape) * itemsize(dtype)


def _shard(specs: TensorSpecs, max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name in sorted(specs):
        size = _nbytes(specs[name])
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def _plan_one_file(file: str, tensors: list[str], specs: TensorSpecs, metadata: dict[str, str]):
    # Widest dtypes first, then by name (as safetensors orders data): every tensor stays aligned to
    # its item size, given the 8-byte aligned start of the data section.
    order = sorted(tensors, key=lambda n: (-itemsize(specs[n][1]), n))
    entries, begin = [], 0
    for name in order:
        shape, dtype = specs[name]
        end = begin + _nbytes(specs[name])
        entries.append((name, dtype, tuple(shape), begin, end))
        begin = end
    header = encode_header(entries, metadata)
    slots = {
        name: TensorSlot(name, file, len(header) + b, tuple(shape), dtype, e - b)
        for name, dtype, shape, b, e in entries
    }
    return PlannedFile(file, header, len(header) + begin, tuple(order)), slots
