"""How a Megatron parameter is split over the ranks of its tensor-parallel group (plain or expert TP).

A sharding cuts every part of a rule (see rule.py) along one dim into `size` equal pieces, or keeps
it whole (replicated). Vocab-parallel sharding pads the vocabulary the way Megatron does.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridges.architecture import padded_vocab_size
from bridges.checkpoint.pieces import Region, full_region


class ShardingError(ValueError):
    """A tensor that cannot be split as its rule says (sizes not divisible by the TP size)."""


@dataclass(frozen=True)
class Sharding:
    dim: int | None = None  # part dim split over TP ranks; None = replicated
    vocab: int | None = None  # vocab-parallel: real vocabulary size along `dim` (the rest is padding)
    # whole parts: each HF tensor's parts (attention heads) are dealt to the ranks in equal contiguous blocks
    whole_parts: bool = False

    def holds(self, index: int, count: int, rank: int, size: int) -> bool:
        """Whether this rank holds part `index` of an HF tensor's `count` parts (always, unless whole_parts)."""
        if not self.whole_parts:
            return True
        if count % size:
            raise ShardingError(f"{count} heads do not split over {size} tensor-parallel ranks")
        return index // (count // size) == rank

    @property
    def replicated(self) -> bool:
        return self.dim is None

    def region(self, part_shape: tuple[int, ...], rank: int, size: int) -> tuple[Region, int]:
        """This rank's region of a part, and how many padding rows follow it locally."""
        region = list(full_region(part_shape))
        if self.dim is None or self.whole_parts:
            return tuple(region), 0
        n = part_shape[self.dim]
        if self.vocab is not None:
            chunk = padded_vocab_size(self.vocab, size) // size
            start = min(rank * chunk, self.vocab)
            stop = min((rank + 1) * chunk, self.vocab)
            region[self.dim] = slice(start, stop, 1)
            return tuple(region), chunk - (stop - start)
        if n % size:
            raise ShardingError(f"dim {self.dim} of size {n} does not split over {size} tensor-parallel ranks")
        chunk = n // size
        region[self.dim] = slice(rank * chunk, (rank + 1) * chunk, 1)
        return tuple(region), 0


REPLICATED = Sharding()
COLUMN = Sharding(dim=0)  # ColumnParallelLinear: output features split
ROW = Sharding(dim=1)  # RowParallelLinear: input features split
HEADS = Sharding(dim=0, whole_parts=True)  # ColumnParallelLinear whose parts are whole heads (gated attention)


def vocab_parallel(vocab_size: int) -> Sharding:
    """VocabParallelEmbedding / output layer: rows split, padded to a multiple of the TP size."""
    return Sharding(dim=0, vocab=vocab_size)
