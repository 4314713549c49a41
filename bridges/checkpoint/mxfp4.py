"""MXFP4 checkpoints (transformers' layout, e.g. released GPT-OSS experts) read as the dequantized tensors.

transformers stores a quantized parameter X of shape [E, C, R] as `X_blocks` uint8 [E, R, C/32, 16] and
`X_scales` uint8 [E, R, C/32]: each row of X^T is cut into blocks of 32 values (E2M1 codes, two per byte,
the even element in the low nibble) sharing one E8M0 scale 2^(s - 127); dequantized rows give [E, R, C],
transposed to X [E, C, R] (see transformers/integrations/mxfp4.py). `DequantizedSource` shows an
`HFSource` with X in place of each blocks/scales pair and dequantizes only the regions read, so the rules
of the unquantized layout apply unchanged and a rank reads only the experts it owns.
"""

from __future__ import annotations

import collections

import torch

from bridges.checkpoint.pieces import Region, full_region, region_shape

BLOCKS, SCALES = "_blocks", "_scales"
BLOCK = 32  # values per scale
# E2M1 code -> value (the sign is the high bit of the nibble)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


class MXFP4Error(ValueError):
    """A blocks/scales pair that is not in transformers' MXFP4 layout (names the tensor and the file)."""


def dequantize_rows(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 blocks [..., G, 16] and scales [..., G] -> values [..., G * 32] (rows, not yet transposed)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise MXFP4Error(f"blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair up")
    table = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).to(torch.int32)  # even element in the low nibble
    values = table[codes].flatten(-2)  # [..., G, 32]
    exponents = scales.to(torch.int32) - SCALE_BIAS
    # Exact in float32 for E8M0 exponents a float32 can hold; then cast once.
    values = torch.ldexp(values, exponents.unsqueeze(-1).to(torch.float32))
    return values.flatten(-2).to(dtype)


def dequantized(source, dtype: torch.dtype | None = None):
    """`source` as seen after dequantizing its MXFP4 pairs (itself when it has none).
    `dtype`: of the dequantized tensors; None: the most common floating dtype of the other tensors."""
    names = set(source.keys())
    pairs = sorted(n[: -len(BLOCKS)] for n in names if n.endswith(BLOCKS) and n[: -len(BLOCKS)] + SCALES in names)
    if not pairs:
        return source
    return DequantizedSource(source, pairs, dtype or _usual_float_dtype(source, names, pairs))


class DequantizedSource:
    """`HFSource` over `source` with each MXFP4 pair X_blocks / X_scales shown as X [E, C, R]."""

    def __init__(self, source, quantized: list[str], dtype: torch.dtype):
        self.source = source
        self.dtype_of_dequantized = dtype
        self.quantized: dict[str, tuple[int, ...]] = {name: self._check(name) for name in quantized}
        hidden = {name + suffix for name in self.quantized for suffix in (BLOCKS, SCALES)}
        self._keys = sorted([n for n in source.keys() if n not in hidden] + list(self.quantized))

    def _check(self, name: str) -> tuple[int, ...]:
        blocks, scales = name + BLOCKS, name + SCALES
        where = self.source.where(blocks)
        shape_b, shape_s = tuple(self.source.shape(blocks)), tuple(self.source.shape(scales))
        for n in (blocks, scales):
            if self.source.dtype(n) != torch.uint8:
                raise MXFP4Error(f"{n} ({self.source.where(n)}): MXFP4 tensors are uint8, found {self.source.dtype(n)}")
        if len(shape_b) != 4 or shape_b[-1] != BLOCK // 2 or shape_b[:-1] != shape_s:
            raise MXFP4Error(
                f"{blocks} {shape_b} / {scales} {shape_s} ({where}): expected blocks [E, R, G, {BLOCK // 2}] "
                f"and scales [E, R, G]"
            )
        experts, rows, groups, _ = shape_b
        return (experts, groups * BLOCK, rows)

    # --- metadata ---

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.quantized[name] if name in self.quantized else self.source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.dtype_of_dequantized if name in self.quantized else self.source.dtype(name)

    def where(self, name: str) -> str:
        return self.source.where(name + BLOCKS if name in self.quantized else name)

    # --- data ---

    def release_pages(self) -> None:
        release = getattr(self.source, "release_pages", None)
        if release is not None:
            release()

    def read(self, name: str, region: Region | None = None) -> torch.Tensor:
        if name not in self.quantized:
            return self.source.read(name, region)
        shape = self.quantized[name]
        experts, cols, rows = region = tuple(region) if region is not None else full_region(shape)
        if 0 in region_shape(region):
            return torch.empty(region_shape(region), dtype=self.dtype_of_dequantized)
        # Whole blocks covering the columns asked for, every row and expert asked for.
        last = cols.start + (len(range(cols.start, cols.stop, cols.step)) - 1) * cols.step
        first_group, end_group = cols.start // BLOCK, last // BLOCK + 1
        groups = slice(first_group, end_group, 1)
        blocks = self.source.read(name + BLOCKS, (experts, rows, groups, slice(0, BLOCK // 2, 1)))
        scales = self.source.read(name + SCALES, (experts, rows, groups))
        values = dequantize_rows(blocks, scales, self.dtype_of_dequantized)  # [e, r, groups * 32]
        start = cols.start - first_group * BLOCK
        values = values[..., start : start + (last - cols.start) + 1 : cols.step]
        out = values.transpose(1, 2).contiguous()
        assert tuple(out.shape) == region_shape(region)
        return out


def _usual_float_dtype(source, names: set[str], pairs: list[str]) -> torch.dtype:
    hidden = {p + s for p in pairs for s in (BLOCKS, SCALES)}
    counts = collections.Counter(source.dtype(n) for n in names - hidden if source.dtype(n).is_floating_point)
    return counts.most_common(1)[0][0] if counts else torch.bfloat16
