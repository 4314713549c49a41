"""Read an HF safetensors checkpoint directory one tensor region at a time (the import side of file I/O).

Every header is validated before any tensor byte is read, and only the bytes a region needs are read.
Pickle weights (.bin/.pt/.pth) are refused, never unpickled: loading them can execute code.
"""

from __future__ import annotations

import glob
import json
import mmap
import os

import numpy as np
import torch

from bridges.checkpoint.files import CheckpointFileError, check_regular_file
from bridges.checkpoint.pieces import Region, full_region, region_shape
from bridges.checkpoint.regions import byte_runs, check_region
from bridges.checkpoint.safetensors_format import INDEX_FILE_NAME, SINGLE_FILE_NAME, FileHeader, TensorEntry, itemsize, raw_numpy_dtype, read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# numpy has no bfloat16/float8: data is copied as unsigned ints of the same width, then viewed.
# Smaller regions are copied: each mapped result costs one of the kernel's ~65k maps per process.
MIN_MAPPED_BYTES = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as asked (names the directory, file or tensor)."""


class PickleWeightsRefused(CheckpointError):
    """The directory holds only pickle weights, which can execute code when loaded."""


class SafetensorsCheckpoint:
    """`HFSource` over a directory of .safetensors files (sharded with an index, or not).

    `bytes_read` adds up the sizes of the regions read (the OS reads whole pages around them).
    """

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise CheckpointError(f"{directory}: not a directory (expected an HF checkpoint directory)")
        self.directory = directory
        self._headers: dict[str, FileHeader] = {}
        self._entries: dict[str, TensorEntry] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self.bytes_read = 0
        paths = _weight_files(directory)
        for path in paths:
            _check_file(path)
            self._headers[path] = header = read_header(path)
            for name, entry in header.tensors.items():
                if name in self._entries:
                    raise CheckpointError(f"tensor {name!r} is in both {self._entries[name].path} and {path}")
                self._entries[name] = entry
        if os.path.isfile(os.path.join(directory, INDEX_FILE_NAME)):
            self._check_index_agrees(os.path.join(directory, INDEX_FILE_NAME))

    # --- metadata (no tensor data is read) ---

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def files(self) -> list[str]:
        return sorted(self._headers)

    def file_metadata(self, path: str) -> dict[str, str]:
        return dict(self._headers[path].metadata)

    def header(self, name: str) -> TensorEntry:
        if name not in self._entries:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.directory}")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.header(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.header(name).dtype

    def where(self, name: str) -> str:
        return self.header(name).path

    # --- data ---

    def read(self, name: str, region: Region | None = None) -> torch.Tensor:
        """The values of `region` of tensor `name` (the whole tensor when None).

        A region of at least MIN_MAPPED_BYTES that is one contiguous run (a whole tensor, a block of
        leading rows) comes back as a private copy-on-write map of its bytes: no copy, pages are read
        when first touched, and writing to it reaches neither the file nor other results. Other
        regions are copied.
        """
        entry = self.header(name)
        region = full_region(entry.shape) if region is None else tuple(region)
        check_region(entry.shape, region, f"{entry.path}: tensor {name!r}")
        item = itemsize(entry.dtype)
        offsets, lengths = byte_runs(entry.shape, region, item)
        size = int(lengths.sum())
        self.bytes_read += size
        start = entry.begin + int(offsets[0]) if len(offsets) else 0
        if len(offsets) == 1 and start % item == 0 and size >= MIN_MAPPED_BYTES:
            flat = _private_view(entry.path, start, size)
        else:
            flat = torch.empty(size, dtype=torch.uint8)
            if size:
                self._copy_region(entry, region, item, flat.numpy())
        return flat.view(entry.dtype).reshape(region_shape(region))

    def _copy_region(self, entry: TensorEntry, region: Region, item: int, out: np.ndarray) -> None:
        # numpy walks the mapped file; only the pages under the region are read.
        raw = raw_numpy_dtype(item)
        mapped = np.frombuffer(self._map(entry.path), dtype=raw, count=entry.nbytes // item, offset=entry.begin)
        view = mapped.reshape(entry.shape)[region]
        out.view(raw).reshape(view.shape)[...] = view

    def _map(self, path: str) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view is still alive (an exception's frame): freed with it
                pass
        self._maps.clear()

    def release_pages(self) -> None:
        """Unmap the files read so far (their pages stay in the page cache, no longer in this process's
        resident memory); later reads map them again."""
        self.close()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_index_agrees(self, index_path: str) -> None:
        weight_map = _read_weight_map(index_path)
        for name, file in sorted(weight_map.items()):
            entry = self._entries.get(name)
            if entry is None:
                raise CheckpointError(f"{index_path}: tensor {name!r} is listed in {file} but no header has it")
            if os.path.basename(entry.path) != file:
                raise CheckpointError(f"{index_path}: tensor {name!r} is listed in {file} but stored in {entry.path}")
        unlisted = sorted(set(self._entries) - set(weight_map))
        if unlisted:
            raise CheckpointError(
                f"{index_path}: {len(unlisted)} tensors are in the files but not in the index, "
                f"e.g. {unlisted[0]!r} in {self._entries[unlisted[0]].path}"
            )


def _check_file(path: str) -> None:
    # A FIFO or device named like a shard would block the first read forever: refused before opening.
    try:
        check_regular_file(path)
    except CheckpointFileError as e:
        raise CheckpointError(str(e)) from None


def _private_view(path: str, offset: int, size: int) -> torch.Tensor:
    """`size` bytes at `offset` as a uint8 tensor over a map of its own: copy-on-write, so writes to one
    result never reach the file nor any other result. The map lives as long as the tensor."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY  # maps begin on a granularity boundary
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), offset + size - start, access=mmap.ACCESS_COPY, offset=start)
    return torch.frombuffer(mapped, dtype=torch.uint8, count=size, offset=offset - start)


def _weight_files(directory: str) -> list[str]:
    """The .safetensors files that hold the weights: those the index names, else model.safetensors, else all."""
    index_path = os.path.join(directory, INDEX_FILE_NAME)
    if os.path.lexists(index_path):
        _check_file(index_path)
        files = sorted(set(_read_weight_map(index_path).values()))
        missing = [f for f in files if not os.path.lexists(os.path.join(directory, f))]
        if missing:
            raise CheckpointError(f"{index_path}: names files that do not exist: {missing}")
        return [os.path.join(directory, f) for f in files]
    if os.path.lexists(os.path.join(directory, SINGLE_FILE_NAME)):
        return [os.path.join(directory, SINGLE_FILE_NAME)]
    found = sorted(glob.glob(os.path.join(glob.escape(directory), "*.safetensors")))
    if found:
        return found
    pickles = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise PickleWeightsRefused(
            f"{directory}: refused to load {pickles}: pickle weights can execute code when loaded. "
            f"Convert them to .safetensors in a trusted environment first."
        )
    raise CheckpointError(f"{directory}: no .safetensors weights found (expected {INDEX_FILE_NAME} or *.safetensors)")


def _read_weight_map(index_path: str) -> dict[str, str]:
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: expected a 'weight_map' object of tensor name -> file name")
    for name, file in weight_map.items():
        # The index is untrusted: it may only name plain files beside it.
        if os.path.basename(file) != file or file in ("", ".", ".."):
            raise CheckpointError(
                f"{index_path}: tensor {name!r} points to {file!r}, expected a file name in the directory"
            )
    return weight_map
