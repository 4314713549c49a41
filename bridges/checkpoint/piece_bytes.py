"""Pieces as raw bytes: the (file offset, bytes) writes that put a tensor's pieces in place, and back.

Pure memory work; the caller does the I/O. A piece that is one contiguous run in the HF layout is
written straight from its own memory; pieces that interleave on one rank are merged first.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from bridges.checkpoint.pieces import Piece, PieceSpec, region_shape
from bridges.checkpoint.regions import bounding_box, byte_runs, numel
from bridges.checkpoint.safetensors_format import itemsize, raw_numpy_dtype



def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's values as a flat uint8 array in row-major order (no copy when already contiguous)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def from_bytes(spec: PieceSpec, data: torch.Tensor) -> Piece:
    """The piece described by `spec` over `data`, a flat uint8 tensor of exactly its bytes."""
    return Piece(spec, data.view(spec.dtype).reshape(region_shape(spec.region)))


def piece_nbytes(spec: PieceSpec) -> int:
    return numel(spec.region) * itemsize(spec.dtype)


def is_one_run(spec: PieceSpec) -> bool:
    """Whether the piece's bytes are one contiguous run in the HF layout (a whole tensor, leading rows)."""
    return len(byte_runs(spec.hf_shape, spec.region, itemsize(spec.dtype))[0]) <= 1


def tensor_writes(offset: int, shape: tuple[int, ...], pieces: list[Piece]) -> Iterator[tuple[int, memoryview]]:
    """(absolute file offset, bytes) for every maximal run of the pieces of one tensor starting at `offset`."""
    scattered = []
    for piece in pieces:
        starts, lengths = byte_runs(shape, piece.spec.region, itemsize(piece.spec.dtype))
        if len(starts) == 1:
            yield offset + int(starts[0]), memoryview(as_bytes(piece.tensor))
        elif len(starts) > 1:
            scattered.append((piece, starts, lengths))
    if not scattered:
        return
    box = bounding_box([p.spec.region for p, _, _ in scattered])
    if 2 * sum(numel(p.spec.region) for p, _, _ in scattered) >= numel(box) and len(scattered) > 1:
        # Dense enough (say gate and up columns interleaved on one rank): merge into longer runs.
        yield from _merged_writes(offset, shape, box, [p for p, _, _ in scattered])
        return
    for piece, starts, lengths in scattered:
        data = memoryview(as_bytes(piece.tensor))
        ends = np.cumsum(lengths)
        for start, length, end in zip(starts.tolist(), lengths.tolist(), ends.tolist()):
            yield offset + start, data[end - length : end]


def _merged_writes(offset: int, shape: tuple[int, ...], box, pieces: list[Piece]) -> Iterator[tuple[int, memoryview]]:
    """Scatter the pieces into their bounding box, then write the box's runs where some piece has data."""
    item = itemsize(pieces[0].spec.dtype)
    box_shape = region_shape(box)
    raw = raw_numpy_dtype(item)
    values = np.empty(box_shape, dtype=raw)
    # Pieces that tile their box (TP shards of a whole tensor, gathered) need no record of what is there.
    tiled = sum(numel(p.spec.region) for p in pieces) == values.size
    present = None if tiled else np.zeros(box_shape, dtype=bool)
    for piece in pieces:
        inside = tuple(slice(s.start - b.start, s.stop - b.start, s.step) for s, b in zip(piece.spec.region, box))
        values[inside] = as_bytes(piece.tensor).view(raw).reshape(region_shape(piece.spec.region))
        if present is not None:
            present[inside] = True
    box_starts, box_lengths = byte_runs(shape, box, item)
    data = memoryview(values.reshape(-1).view(np.uint8))
    if present is None:
        ends = np.cumsum(box_lengths)
        for start, length, end in zip(box_starts.tolist(), box_lengths.tolist(), ends.tolist()):
            yield offset + start, data[end - length : end]
        return
    # Each run of the box is a row of `present`; within it, write each stretch of present elements.
    rows = present.reshape(len(box_starts), -1)
    edges = np.diff(np.pad(rows, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    row_of_start, first = np.nonzero(edges == 1)
    _, last = np.nonzero(edges == -1)
    width = rows.shape[1]
    for row, a, b in zip(row_of_start.tolist(), first.tolist(), last.tolist()):
        begin = (row * width + a) * item
        yield offset + int(box_starts[row]) + a * item, data[begin : begin + (b - a) * item]
