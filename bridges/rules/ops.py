"""Small reversible tensor ops between HF and Megatron layouts: `forward` goes HF -> Megatron, `inverse` back.

Every op takes and returns a list of tensors and is pure (no communication, no state). Two kinds:
- view ops (`Transpose`, `ExpertSlice`, `GateUpHalves`, `GateUpInterleave`, `Sections`, `Blocks`) only
  re-index one HF tensor, so they also say where their outputs lie inside it (`views`), which lets rules read
  and write regions;
- combine ops (`Rename`, `QKVInterleave`, `GateUpConcat`, `Concat`, `GatedQKVInterleave`) join the (sharded)
  parts into one Megatron tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bridges.rules.views import View

Tensors = list[torch.Tensor]


def _one(xs: Tensors, op: str) -> torch.Tensor:
    if len(xs) != 1:
        raise ValueError(f"{op} takes one tensor, got {len(xs)}")
    return xs[0]


def _halves(n: int, op: str) -> int:
    if n % 2:
        raise ValueError(f"{op}: the fused gate/up dim has odd size {n}")
    return n // 2


# ---- combine ops -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rename:
    """One HF tensor is one Megatron tensor, values unchanged."""

    def forward(self, xs: Tensors) -> Tensors:
        return [_one(xs, "Rename")]

    def inverse(self, ys: Tensors) -> Tensors:
        return [_one(ys, "Rename")]


@dataclass(frozen=True)
class QKVInterleave:
    """HF q/k/v projections (weights or biases) <-> Megatron `linear_qkv`, grouped by KV head:
    [groups * (heads_per_group + 2) * head_dim, ...] with each group's q heads, then its k, then its v."""

    heads_per_group: int
    head_dim: int

    def forward(self, xs: Tensors) -> Tensors:
        q, k, v = xs
        groups = k.shape[0] // self.head_dim
        rest = tuple(q.shape[1:])
        parts = (
            q.reshape(groups, self.heads_per_group * self.head_dim, *rest),
            k.reshape(groups, self.head_dim, *rest),
            v.reshape(groups, self.head_dim, *rest),
        )
        return [torch.cat(parts, dim=1).reshape(-1, *rest)]

    def inverse(self, ys: Tensors) -> Tensors:
        qkv = _one(ys, "QKVInterleave")
        rest = tuple(qkv.shape[1:])
        per_group = (self.heads_per_group + 2) * self.head_dim
        grouped = qkv.reshape(-1, per_group, *rest)
        q, k, v = grouped.split([self.heads_per_group * self.head_dim, self.head_dim, self.head_dim], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]


@dataclass(frozen=True)
class GateUpConcat:
    """HF gate and up projections <-> Megatron gated `linear_fc1` = [gate; up] along `dim`."""

    dim: int = 0

    def forward(self, xs: Tensors) -> Tensors:
        gate, up = xs
        return [torch.cat([gate, up], dim=self.dim)]

    def inverse(self, ys: Tensors) -> Tensors:
        fc1 = _one(ys, "GateUpConcat")
        return list(fc1.split(_halves(fc1.shape[self.dim], "GateUpConcat"), dim=self.dim))


@dataclass(frozen=True)
class Concat:
    """Parts of global sizes `sizes` along dim 0 <-> one Megatron tensor [part 0; part 1; ...]. Each part may be
    a tensor-parallel shard of the same fraction of its global size (Gated DeltaNet's in-projection)."""

    sizes: tuple[int, ...]

    def forward(self, xs: Tensors) -> Tensors:
        if len(xs) != len(self.sizes):
            raise ValueError(f"Concat takes {len(self.sizes)} parts, got {len(xs)}")
        return [torch.cat(xs, dim=0)]

    def inverse(self, ys: Tensors) -> Tensors:
        y = _one(ys, "Concat")
        total = sum(self.sizes)
        if (y.shape[0] * self.sizes[0]) % total:
            raise ValueError(f"Concat: {y.shape[0]} rows are not a whole fraction of {list(self.sizes)}")
        return list(y.split([s * y.shape[0] // total for s in self.sizes], dim=0))


@dataclass(frozen=True)
class GatedQKVInterleave:
    """Per-head parts of a gated attention's projections <-> Megatron `linear_qkv` with an output gate,
    grouped by KV head: per group its q heads, then their gate heads, then its k head, then its v head.

    The parts come in the rule's order: the query and gate heads of the held groups alternating (q_0, g_0, q_1,
    g_1, ...: transformers' q_proj keeps each head's query and gate together), then the k heads, then the
    v heads; every part is one head ([head_dim, ...])."""

    heads_per_group: int
    head_dim: int

    def forward(self, xs: Tensors) -> Tensors:
        hpg, per_group = self.heads_per_group, 2 * self.heads_per_group + 2
        if len(xs) % per_group:
            raise ValueError(f"GatedQKVInterleave: {len(xs)} parts are not groups of {per_group} heads")
        groups = len(xs) // per_group
        qg, k, v = xs[: 2 * hpg * groups], xs[2 * hpg * groups : (2 * hpg + 1) * groups], xs[(2 * hpg + 1) * groups :]
        out = []
        for g in range(groups):
            heads = qg[2 * hpg * g : 2 * hpg * (g + 1)]
            out += heads[0::2] + heads[1::2] + [k[g], v[g]]
        return [torch.cat(out, dim=0)]

    def inverse(self, ys: Tensors) -> Tensors:
        y = _one(ys, "GatedQKVInterleave")
        hpg, per_group = self.heads_per_group, 2 * self.heads_per_group + 2
        if y.shape[0] % (per_group * self.head_dim):
            raise ValueError(f"GatedQKVInterleave: {y.shape[0]} rows are not groups of {per_group} heads")
        heads = list(y.split(self.head_dim, dim=0))
        qg, k, v = [], [], []
        for g in range(len(heads) // per_group):
            group = heads[per_group * g : per_group * (g + 1)]
            qg += [h for pair in zip(group[:hpg], group[hpg : 2 * hpg]) for h in pair]
            k.append(group[2 * hpg])
            v.append(group[2 * hpg + 1])
        return qg + k + v


# ---- view ops ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transpose:
    """Swap two dims (HF [out, in] stored as [in, out], for example)."""

    a: int = 0
    b: int = 1

    def forward(self, xs: Tensors) -> Tensors:
        return [x.transpose(self.a, self.b) for x in xs]

    inverse = forward

    def views(self, view: View, expert: int | None = None) -> list[View]:
        return [view.transpose(self.a, self.b)]


@dataclass(frozen=True)
class ExpertSlice:
    """A fused expert tensor [E, ...] <-> E per-expert tensors (forward slices, inverse stacks).
    As a view it picks one expert: expert e of a fused tensor is just the region [e, ...]."""

    dim: int = 0

    def forward(self, xs: Tensors) -> Tensors:
        return list(_one(xs, "ExpertSlice").unbind(self.dim))

    def inverse(self, ys: Tensors) -> Tensors:
        return [torch.stack(ys, dim=self.dim)]

    def views(self, view: View, expert: int | None = None) -> list[View]:
        if expert is None:
            raise ValueError("ExpertSlice needs the rule's expert index")
        return [view.select(self.dim, expert)]


@dataclass(frozen=True)
class GateUpHalves:
    """One fused gate_up tensor with gate then up as contiguous halves along `dim` <-> [gate, up]."""

    dim: int = 0

    def forward(self, xs: Tensors) -> Tensors:
        x = _one(xs, "GateUpHalves")
        return list(x.split(_halves(x.shape[self.dim], "GateUpHalves"), dim=self.dim))

    def inverse(self, ys: Tensors) -> Tensors:
        return [torch.cat(ys, dim=self.dim)]

    def views(self, view: View, expert: int | None = None) -> list[View]:
        n = _halves(view.shape[self.dim], "GateUpHalves")
        return [view.stride(self.dim, 0, 1, n), view.stride(self.dim, n, 1, n)]


@dataclass(frozen=True)
class GateUpInterleave:
    """One fused gate_up tensor with gate and up interleaved along `dim` (even = gate, odd = up,
    GPT-OSS) <-> [gate, up]."""

    dim: int = 0

    def forward(self, xs: Tensors) -> Tensors:
        x = _one(xs, "GateUpInterleave")
        _halves(x.shape[self.dim], "GateUpInterleave")
        index = lambda start: torch.arange(start, x.shape[self.dim], 2)  # noqa: E731
        return [x.index_select(self.dim, index(0)), x.index_select(self.dim, index(1))]

    def inverse(self, ys: Tensors) -> Tensors:
        gate, up = ys
        # stack along a new dim right after `dim`, then merge: g0 u0 g1 u1 ...
        d = self.dim % gate.dim()
        pairs = torch.stack([gate, up], dim=d + 1)
        return [pairs.flatten(d, d + 1)]

    def views(self, view: View, expert: int | None = None) -> list[View]:
        n = _halves(view.shape[self.dim], "GateUpInterleave")
        return [view.stride(self.dim, 0, 2, n), view.stride(self.dim, 1, 2, n)]


@dataclass(frozen=True)
class Sections:
    """One HF tensor made of consecutive sections of `sizes` along `dim` (Gated DeltaNet's fused q/k/v
    projection and convolution) <-> one part per section."""

    sizes: tuple[int, ...]
    dim: int = 0

    def _starts(self, n: int) -> list[int]:
        if sum(self.sizes) != n:
            raise ValueError(f"Sections: sizes {list(self.sizes)} do not add up to {n}")
        return [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def forward(self, xs: Tensors) -> Tensors:
        x = _one(xs, "Sections")
        self._starts(x.shape[self.dim])
        return list(x.split(list(self.sizes), dim=self.dim))

    def inverse(self, ys: Tensors) -> Tensors:
        return [torch.cat(ys, dim=self.dim)]

    def views(self, view: View, expert: int | None = None) -> list[View]:
        starts = self._starts(view.shape[self.dim])
        return [view.stride(self.dim, start, 1, size) for start, size in zip(starts, self.sizes)]


@dataclass(frozen=True)
class Blocks:
    """One HF tensor cut along `dim` into consecutive blocks of `size` (one part per attention head)."""

    size: int
    dim: int = 0

    def _count(self, n: int) -> int:
        if n % self.size:
            raise ValueError(f"Blocks: dim of size {n} is not whole blocks of {self.size}")
        return n // self.size

    def forward(self, xs: Tensors) -> Tensors:
        x = _one(xs, "Blocks")
        self._count(x.shape[self.dim])
        return list(x.split(self.size, dim=self.dim))

    def inverse(self, ys: Tensors) -> Tensors:
        return [torch.cat(ys, dim=self.dim)]

    def views(self, view: View, expert: int | None = None) -> list[View]:
        n = self._count(view.shape[self.dim])
        return [view.stride(self.dim, i * self.size, 1, self.size) for i in range(n)]
