"""Geometry of regions (one `slice` per dim) inside a row-major tensor: bounds, byte runs, overlaps.

Pure arithmetic on shapes and slices; never touches tensor data or files.
"""

from __future__ import annotations

import math

import numpy as np

from bridges.checkpoint.pieces import Region, region_shape


def check_region(shape: tuple[int, ...], region: Region, where: str) -> None:
    """Raise ValueError unless `region` has one explicit slice per dim, inside `shape`, with step >= 1."""
    if len(region) != len(shape):
        raise ValueError(f"{where}: region has {len(region)} dims, tensor shape {tuple(shape)} has {len(shape)}")
    for dim, (s, n) in enumerate(zip(region, shape)):
        ok = all(isinstance(v, int) for v in (s.start, s.stop, s.step))
        if not ok or s.step < 1 or not 0 <= s.start <= s.stop <= n:
            raise ValueError(
                f"{where}: dim {dim} slice {s} is not inside [0, {n}] with explicit start/stop and step >= 1"
            )


def numel(region: Region) -> int:
    return math.prod(region_shape(region))


def _normalised(region: Region) -> list[slice]:
    # A dim with one element has no stride to speak of: step 1 lets it merge with inner dims.
    return [slice(s.start, s.start + 1, 1) if len(range(s.start, s.stop, s.step)) == 1 else s for s in region]


def byte_runs(shape: tuple[int, ...], region: Region, itemsize: int) -> tuple[np.ndarray, np.ndarray]:
    """The maximal contiguous byte runs of `region` in the row-major layout of `shape`, in order.

    Returns (start offsets relative to the tensor's first byte, lengths in bytes). The runs follow the
    region's own row-major order, so they are consecutive pieces of the region made contiguous. A
    whole tensor, or a block of leading-dim rows, is one run.
    """
    if numel(region) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    region = _normalised(region)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    inner, run = _runs(shape, region)
    base = sum(region[d].start * strides[d] for d in range(inner, len(shape)))
    if all(region[d].stop - region[d].start == 1 for d in range(inner)):  # one run: skip the arrays
        base += sum(region[d].start * strides[d] for d in range(inner))
        return np.array([base * itemsize], dtype=np.int64), np.array([run * itemsize], dtype=np.int64)
    offsets = np.full((), base, dtype=np.int64)
    for d in range(inner):
        s = region[d]
        offsets = np.add.outer(offsets, np.arange(s.start, s.stop, s.step, dtype=np.int64) * strides[d])
    return _coalesced(offsets.reshape(-1) * itemsize, run * itemsize)


def run_elements(shape: tuple[int, ...], region: Region) -> int:
    """Elements in each contiguous run of a non-empty `region` (as byte_runs cuts them before joining
    runs that happen to touch): the whole region for a block of leading rows, 1 for a strided last dim."""
    return _runs(shape, _normalised(region))[1]


def _runs(shape: tuple[int, ...], region: list[slice]) -> tuple[int, int]:
    """(inner, run): dims from `inner` on fold into runs of `run` elements (region normalised)."""
    run = 1
    inner = len(shape)
    while inner > 0:
        s = region[inner - 1]
        if s.step != 1:
            break
        run *= s.stop - s.start
        inner -= 1
        if s.stop - s.start != shape[inner]:
            break  # a partial dim ends the run: the next one out repeats it with gaps
    return inner, run


def _coalesced(offsets: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    # A strided last dim can end a row on its last element and start the next row on its first.
    first = np.ones(len(offsets), dtype=bool)
    first[1:] = offsets[1:] != offsets[:-1] + length
    starts = np.flatnonzero(first)
    lengths = np.diff(np.append(starts, len(offsets))) * length
    return offsets[starts], lengths


def bounding_box(regions: list[Region]) -> Region:
    """The smallest step-1 region containing all of `regions` (non-empty ones)."""
    dims = range(len(regions[0]))
    lo = [min(r[d].start for r in regions) for d in dims]
    hi = [max(range(r[d].start, r[d].stop, r[d].step)[-1] + 1 for r in regions) for d in dims]
    return tuple(slice(a, b, 1) for a, b in zip(lo, hi))


def regions_overlap(a: Region, b: Region) -> bool:
    """True when the two regions share at least one element (exact, steps included)."""
    return all(_progressions_meet(x, y) for x, y in zip(a, b))


def _progressions_meet(x: slice, y: slice) -> bool:
    """Do the index sets range(x) and range(y) intersect? Solved with the Chinese remainder theorem."""
    rx, ry = range(x.start, x.stop, x.step), range(y.start, y.stop, y.step)
    if not rx or not ry:
        return False
    lo, hi = max(rx[0], ry[0]), min(rx[-1], ry[-1])
    if lo > hi:
        return False
    g = math.gcd(x.step, y.step)
    if (y.start - x.start) % g:
        return False
    # First common index: x.start + x.step * t with x.step * t = y.start - x.start (mod y.step).
    m = y.step // g
    t = ((y.start - x.start) // g) * pow(x.step // g, -1, m) % m if m > 1 else 0
    first = x.start + x.step * t
    period = x.step * m  # lcm of the two steps: common indices are first + k * period
    return lo + (first - lo) % period <= hi
