"""The safetensors file format: dtype names, and headers parsed, validated and encoded from bytes.

A header is untrusted input: it is fully checked here before anyone reads tensor data through it.
Layout: 8-byte little-endian header length N, N bytes of JSON (space-padded), then the data section.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

# safetensors dtype name -> torch dtype; the float8 kinds only where this torch has them.
# Sub-byte kinds (F4, F6) and complex are not supported: a header naming them is refused.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in [
        ("F64", "float64"),
        ("F32", "float32"),
        ("F16", "float16"),
        ("BF16", "bfloat16"),
        ("I64", "int64"),
        ("I32", "int32"),
        ("I16", "int16"),
        ("I8", "int8"),
        ("U64", "uint64"),
        ("U32", "uint32"),
        ("U16", "uint16"),
        ("U8", "uint8"),
        ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
        ("F8_E8M0", "float8_e8m0fnu"),
    ]
    if hasattr(torch, attr)
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

# How transformers names checkpoint files in a directory.
SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"

# safetensors itself refuses headers above 100 MB; a larger length means a corrupt or hostile file.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"


class SafetensorsFormatError(ValueError):
    """A safetensors file whose header is malformed or inconsistent (names the file and the tensor)."""


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def raw_numpy_dtype(size: int) -> np.dtype:
    """An unsigned numpy type of `size` bytes: numpy lacks bfloat16 and float8, so bytes move as these."""
    return np.dtype(f"u{size}")


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise SafetensorsFormatError(
            f"dtype {dtype} cannot be stored in safetensors here (supported: {sorted(DTYPES)})"
        )
    return DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file: its dtype, shape and absolute byte range [begin, end) in the file."""

    name: str
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class FileHeader:
    path: str
    data_start: int  # absolute offset of the data section (8 + header length)
    file_size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def read_header(path: str) -> FileHeader:
    """Parse and validate the header of one file; no tensor data is read."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsFormatError(f"{path}: file is {file_size} bytes, too short for the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > file_size - 8:
            raise SafetensorsFormatError(
                f"{path}: header length {header_len} runs past the end of the file ({file_size} bytes): truncated file?"
            )
        if header_len > MAX_HEADER_BYTES:
            raise SafetensorsFormatError(
                f"{path}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsFormatError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    except RecursionError:
        raise SafetensorsFormatError(f"{path}: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    return _validate(path, header, data_start=8 + header_len, file_size=file_size)


def _validate(path: str, header: dict, data_start: int, file_size: int) -> FileHeader:
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsFormatError(f"{path}: {METADATA_KEY} must map strings to strings, found {metadata!r}")
    data_len = file_size - data_start
    tensors = {name: _entry(path, name, value, data_start, data_len) for name, value in header.items()}
    _check_no_overlap(path, tensors.values())
    return FileHeader(path, data_start, file_size, metadata, tensors)


def _entry(path: str, name: str, value, data_start: int, data_len: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(value, dict) or not {"dtype", "shape", "data_offsets"} <= value.keys():
        raise SafetensorsFormatError(f"{where}: expected an object with dtype, shape and data_offsets, found {value!r}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in DTYPES:
        raise SafetensorsFormatError(f"{where}: unknown or unsupported dtype {dtype!r} (supported: {sorted(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise SafetensorsFormatError(f"{where}: shape must be a list of non-negative integers, found {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise SafetensorsFormatError(f"{where}: data_offsets must be two non-negative integers, found {offsets!r}")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise SafetensorsFormatError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the data section of {data_len} bytes"
        )
    expected = math.prod(shape) * itemsize(DTYPES[dtype])
    if end - begin != expected:
        raise SafetensorsFormatError(
            f"{where}: data_offsets span {end - begin} bytes, but shape {shape} of {dtype} needs {expected}"
        )
    return TensorEntry(name, path, DTYPES[dtype], tuple(shape), data_start + begin, data_start + end)


def _is_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _check_no_overlap(path: str, entries) -> None:
    previous = None
    for entry in sorted((e for e in entries if e.nbytes), key=lambda e: (e.begin, e.end)):
        if previous is not None and entry.begin < previous.end:
            raise SafetensorsFormatError(
                f"{path}: tensors {previous.name!r} and {entry.name!r} overlap "
                f"(bytes [{previous.begin}, {previous.end}) and [{entry.begin}, {entry.end}))"
            )
        previous = entry


def encode_header(
    tensors: list[tuple[str, torch.dtype, tuple[int, ...], int, int]], metadata: dict[str, str] | None
) -> bytes:
    """The 8-byte length and the JSON header for `(name, dtype, shape, begin, end)` with data-relative offsets.

    The JSON is space-padded to a multiple of 8 bytes, as safetensors does, so the data section starts
    8-byte aligned.
    """
    header: dict = {METADATA_KEY: dict(metadata)} if metadata else {}
    for name, dtype, shape, begin, end in tensors:
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
