"""Write HF safetensors files from the pieces each rank owns: every owner writes its bytes in place.

A collective over a process group: all ranks agree on one file plan from metadata, rank 0 lays out the
files, each rank pwrites its own pieces, rank 0 writes the index. The directory protocol (staging,
rename, `latest`) is in bridges/export/directory.py. Never imports Lightning.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from bridges.export.coverage import check_coverage
from bridges.export.plan import FilePlan, TensorSpecs, plan_files
from bridges.checkpoint.piece_bytes import as_bytes, from_bytes, is_one_run, piece_nbytes, tensor_writes
from bridges.checkpoint.pieces import Piece, PieceSpec, region_shape
from bridges.rank_status import RankFailure, agree, exchange, global_rank, group_rank_and_size
from bridges.checkpoint.regions import numel, run_elements
from bridges.checkpoint.safetensors_format import INDEX_FILE_NAME, itemsize

__all__ = ["write_checkpoint", "plan_export", "ExportPlan", "PlanCache", "plan_files", "FilePlan", "RankFailure",
           "DEFAULT_MAX_SHARD_BYTES"]

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # "5GB", the shard size of most released checkpoints
DEFAULT_BATCH_BYTES = 256 * 2**20  # gather mode: bytes a rank sends to rank 0 in one message


def write_checkpoint(
    local_pieces: Iterable[Piece],
    tensor_specs: TensorSpecs,
    out_dir: str,
    group=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
    mode: str = "owner",
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    fsync: bool = True,
    piece_specs: Sequence[PieceSpec] | None = None,
    plan_cache: "PlanCache | None" = None,
) -> FilePlan:
    """Write `tensor_specs` (name -> (shape, dtype), the same on every rank) into `out_dir` as safetensors.

    Every rank of `group` calls this with the pieces it holds; together they must cover every tensor
    exactly once. mode="owner": each rank writes its own bytes (ranks share a filesystem);
    mode="gather": pieces travel to rank 0 in batches of about `batch_bytes`, and rank 0 writes all.
    `piece_specs`: the specs of `local_pieces` in order, known beforehand (`bridges.export.specs.export_specs`).
    Then `local_pieces` may be a generator: it is consumed once, while writing, and a rank holds about one
    piece at a time instead of all of them. Without it, all pieces are taken in before the plan is agreed.
    `plan_cache`: the plan agreed by an earlier call with the same `plan_cache`; reused, with no exchange
    of piece specs and no planning, when every rank passes what it passed then.
    Any failure raises RankFailure on every rank, naming the failing ranks and why.
    """
    if mode not in ("owner", "gather"):
        raise ValueError(f"mode must be 'owner' or 'gather', got {mode!r}")
    rank, world = group_rank_and_size(group)
    if piece_specs is None:
        pieces = list(local_pieces)
        error = _attempt(_check_local_pieces, pieces)
        piece_specs = [p.spec for p in pieces]
    else:
        pieces, error = _as_specified(local_pieces, list(piece_specs)), None
    plan = _agreed_plan(list(piece_specs), tensor_specs, max_shard_bytes, metadata, mode, group, error, plan_cache)
    agree(_attempt(_create_files, out_dir, plan.files) if rank == 0 else None, "export: creating files", group)
    if mode == "owner" or world == 1:
        error = _write_owned(out_dir, plan.files, pieces, plan.specs_by_rank, plan.merges, group, fsync)
    else:
        error = _gather_and_write(out_dir, plan.files, pieces, plan.specs_by_rank, group, batch_bytes, fsync)
    agree(error, "export: writing tensor data", group)
    agree(_attempt(_write_index, out_dir, plan.files, fsync) if rank == 0 else None, "export: writing the index", group)
    return plan.files


@dataclass(frozen=True)
class ExportPlan:
    """What every rank derives alike from all ranks' piece specs: the files and the merged tensors."""

    specs_by_rank: list[list[PieceSpec]]
    files: FilePlan
    merges: list["_Merge"]


def plan_export(tensor_specs: TensorSpecs, specs_by_rank: list[list[PieceSpec]], max_shard_bytes: int,
                metadata: dict[str, str] | None = None, owner_writes: bool = True) -> ExportPlan:
    """The plan of an export from every rank's piece specs (metadata only, no process group): checks that
    the pieces cover every tensor exactly once, then plans the files and (owner-writes, several ranks) the
    merges of fragmented pieces. The same on every rank; usable from a config alone (virtual ranks)."""
    check_coverage(tensor_specs, specs_by_rank)
    merges = _plan_merges(specs_by_rank) if owner_writes and len(specs_by_rank) > 1 else []
    return ExportPlan(specs_by_rank, plan_files(tensor_specs, max_shard_bytes, metadata), merges)


class PlanCache:
    """The plan of the last export and what it was made from. The plan depends only on every rank's pieces
    and the tensor specs (so on the model, the layout and the dtype): a later export that passes the same on
    every rank reuses it, and the ranks exchange one flag each instead of their piece specs."""

    def __init__(self):
        self._made_from: tuple | None = None
        self._plan: ExportPlan | None = None

    def lookup(self, tensor_specs: TensorSpecs, piece_specs: list[PieceSpec], max_shard_bytes: int,
               metadata: dict[str, str] | None, mode: str, world: int) -> ExportPlan | None:
        """The plan made from these inputs on this rank (compared by value), else None."""
        if self._made_from is None:
            return None
        now = (tensor_specs, piece_specs, max_shard_bytes, metadata, mode, world)
        return self._plan if all(a is b or a == b for a, b in zip(self._made_from, now)) else None

    def store(self, tensor_specs: TensorSpecs, piece_specs: list[PieceSpec], max_shard_bytes: int,
              metadata: dict[str, str] | None, mode: str, world: int, plan: ExportPlan) -> None:
        """Keep `plan` with copies of its inputs (a caller may change its own afterwards)."""
        metadata = None if metadata is None else dict(metadata)
        self._made_from = (dict(tensor_specs), list(piece_specs), max_shard_bytes, metadata, mode, world)
        self._plan = plan


def _agreed_plan(piece_specs, tensor_specs, max_shard_bytes, metadata, mode, group, error, cache) -> ExportPlan:
    """The plan every rank agrees on: the cached one when every rank finds its inputs unchanged, else made
    from every rank's piece specs (exchanged). Raises RankFailure on every rank if any rank failed."""
    _, world = group_rank_and_size(group)
    inputs = (tensor_specs, piece_specs, max_shard_bytes, metadata, mode, world)
    if cache is not None:
        cached = cache.lookup(*inputs)
        if all(exchange(cached is not None, error, "export: checking local pieces", group)):
            return cached
    gathered = exchange((piece_specs, _digest(tensor_specs, max_shard_bytes, metadata)), error,
                        "export: checking local pieces", group)
    _check_same_specs([digest for _, digest in gathered])
    plan = plan_export(tensor_specs, [specs for specs, _ in gathered], max_shard_bytes, metadata, mode == "owner")
    if cache is not None:
        cache.store(*inputs, plan)
    return plan


def _attempt(fn, *args) -> Exception | None:
    try:
        fn(*args)
    except Exception as e:  # reported to every rank by the next agree()
        return e
    return None


def _check_local_pieces(pieces: list[Piece]) -> None:
    for piece in pieces:
        _check_piece(piece)


def _check_piece(piece: Piece) -> None:
    spec, t = piece.spec, piece.tensor
    if tuple(t.shape) != region_shape(spec.region) or t.dtype != spec.dtype:
        raise ValueError(
            f"piece of {spec.hf_name!r}: tensor is {tuple(t.shape)} {t.dtype}, "
            f"its region {spec.region} needs {region_shape(spec.region)} {spec.dtype}"
        )


def _as_specified(pieces: Iterable[Piece], specs: list[PieceSpec]) -> Iterator[Piece]:
    """`pieces`, checked one by one against the specs announced for them (same order, same count)."""
    produced = iter(pieces)
    for i, spec in enumerate(specs):
        piece = next(produced, None)
        if piece is None:
            raise ValueError(f"{len(specs)} pieces were announced, only {i} came; the first missing is {spec}")
        if piece.spec != spec:
            raise ValueError(f"piece {i} was announced as {spec}, came as {piece.spec}")
        _check_piece(piece)
        yield piece
        del piece  # a piece lives only while it is written
    if next(produced, None) is not None:
        raise ValueError(f"more pieces came than the {len(specs)} announced")


def _digest(tensor_specs: TensorSpecs, max_shard_bytes: int, metadata) -> str:
    described = repr((sorted((n, tuple(s), str(d)) for n, (s, d) in tensor_specs.items()), max_shard_bytes,
                      sorted((metadata or {}).items())))
    return hashlib.sha256(described.encode()).hexdigest()


def _check_same_specs(digests: list[str]) -> None:
    if len(set(digests)) > 1:
        groups = defaultdict(list)
        for rank, digest in enumerate(digests):
            groups[digest].append(rank)
        raise ValueError(
            "export: ranks disagree on tensor_specs, max_shard_bytes or metadata; ranks grouped by what they "
            f"passed: {sorted(groups.values())}"
        )


def _create_files(out_dir: str, plan: FilePlan) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for planned in plan.files:
        fd = os.open(os.path.join(out_dir, planned.name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, memoryview(planned.header), 0)
            os.ftruncate(fd, planned.size)  # sparse until the owners fill it
        finally:
            os.close(fd)


class _TensorWriter:
    """pwrites pieces into the planned files as they come. Consecutive pieces of one tensor that are not
    one run each (say gate and up columns interleaved) are written together, so their runs can merge."""

    def __init__(self, out_dir: str, plan: FilePlan):
        self.out_dir, self.plan = out_dir, plan
        self.fds: dict[str, int] = {}
        self.pending: list[Piece] = []

    def add(self, piece: Piece) -> None:
        if self.pending and self.pending[0].spec.hf_name != piece.spec.hf_name:
            self.flush()
        self.pending.append(piece)
        if is_one_run(piece.spec):
            self.flush()

    def write_tensor(self, pieces: list[Piece]) -> None:
        """Pieces of one tensor, written together."""
        self.flush()
        self.pending = pieces
        self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        slot = self.plan.slots[self.pending[0].spec.hf_name]
        if slot.file not in self.fds:
            self.fds[slot.file] = _open_planned(self.out_dir, slot.file)
        for offset, data in tensor_writes(slot.offset, slot.shape, self.pending):
            _pwrite_all(self.fds[slot.file], data, offset)
        self.pending = []

    def close(self, fsync: bool) -> None:
        try:
            self.flush()
            if fsync:
                for fd in self.fds.values():
                    os.fsync(fd)
        finally:
            for fd in self.fds.values():
                os.close(fd)
            self.fds = {}


def _write_pieces(out_dir: str, plan: FilePlan, pieces: Iterable[Piece], fsync: bool) -> None:
    writer = _TensorWriter(out_dir, plan)
    try:
        for piece in pieces:
            writer.add(piece)
            del piece  # do not hold it while the next one is made
    finally:
        writer.close(fsync)


# ---- owner-writes: fragmented pieces merged on one rank -------------------------------------------

MIN_RUN_BYTES = 64 * 2**10  # a piece whose bytes lie in shorter runs (a row-parallel shard) is "fragmented"


@dataclass(frozen=True)
class _Merge:
    """The fragmented pieces of one tensor, held by several ranks, sent to one of them (`writer`), which
    writes them together in long runs: a gather inside the small TP group instead of many tiny writes."""

    name: str
    writer: int
    parts: dict[int, tuple[int, ...]]  # group rank -> indices of its pieces in the merge


def _fragmented(spec: PieceSpec) -> bool:
    if numel(spec.region) == 0:
        return False
    run = run_elements(spec.hf_shape, spec.region)
    return run < numel(spec.region) and run * itemsize(spec.dtype) < MIN_RUN_BYTES


def _plan_merges(specs_by_rank: list[list[PieceSpec]]) -> list[_Merge]:
    """Merges every rank derives alike from all ranks' specs; none when their order cannot be agreed.

    Each rank runs a merge right after its last piece of that tensor has come, so each rank meets its
    merges in the order of its own pieces; those orders must fit one global order (blocking sends and
    receives then cannot wait on each other in a circle). Otherwise each rank writes its own runs.
    """
    parts: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for rank, specs in enumerate(specs_by_rank):
        for i, spec in enumerate(specs):
            if _fragmented(spec):
                parts[spec.hf_name][rank].append(i)
    merges = []
    for name, held in sorted(parts.items()):
        if len(held) > 1:
            ranks = sorted(held)
            writer = ranks[len(merges) % len(ranks)]  # take turns, so no rank writes every merged tensor
            merges.append(_Merge(name, writer, {r: tuple(held[r]) for r in ranks}))
    return merges if _one_order(merges, len(specs_by_rank)) else []


def _merge_order(merges: list[_Merge], rank: int) -> list[_Merge]:
    return sorted((m for m in merges if rank in m.parts), key=lambda m: m.parts[rank][-1])


def _one_order(merges: list[_Merge], world: int) -> bool:
    """Whether the ranks' merge orders fit one global order (the 'comes before' graph has no cycle)."""
    after: dict[str, set[str]] = defaultdict(set)
    for rank in range(world):
        order = _merge_order(merges, rank)
        for a, b in zip(order, order[1:]):
            after[a.name].add(b.name)
    waiting = {m.name: 0 for m in merges}
    for successors in after.values():
        for b in successors:
            waiting[b] += 1
    ready = [name for name, n in waiting.items() if n == 0]
    seen = 0
    while ready:
        seen += 1
        for b in after[ready.pop()]:
            waiting[b] -= 1
            if waiting[b] == 0:
                ready.append(b)
    return seen == len(merges)


def _write_owned(out_dir, plan, pieces, specs_by_rank, merges, group, fsync) -> Exception | None:
    """Owner-writes on this rank: its own pieces in place, the fragmented ones through their merges.

    Returns this rank's first failure. After a failure the rank stops taking pieces but still sends and
    receives every planned merge message (zeros where it has no data), so no rank waits forever.
    """
    own = _OwnPieces(out_dir, plan, pieces, specs_by_rank, merges, group)
    error = _attempt(_write_pieces, out_dir, plan, iter(own), fsync)
    return own.finish(error, fsync)


class _OwnPieces:
    """This rank's pieces in their announced order: iterating yields those it writes alone and runs each
    merge when its turn comes (after this rank's last piece of that tensor)."""

    def __init__(self, out_dir, plan, pieces, specs_by_rank, merges, group):
        self.rank, _ = group_rank_and_size(group)
        self.specs_by_rank, self.group = specs_by_rank, group
        self.produced = iter(pieces)
        self.merge_of = {i: m for m in merges for i in m.parts.get(self.rank, ())}
        self.runs_after = {m.parts[self.rank][-1]: m for m in _merge_order(merges, self.rank)}
        self.merged = _TensorWriter(out_dir, plan)  # writes the tensors this rank merges
        self.held: dict[str, list[Piece]] = defaultdict(list)
        self.sending: list = []  # the one merge message in flight: (work, buffer)
        self.next_index, self.error = 0, None

    def __iter__(self) -> Iterator[Piece]:
        while self.next_index < len(self.specs_by_rank[self.rank]):
            piece = self._step()
            if piece is not None:
                yield piece
            del piece

    def finish(self, error: Exception | None, fsync: bool) -> Exception | None:
        """Run what is left (every planned message, whatever failed) and return the first failure."""
        self.error = self.error or error
        while self.next_index < len(self.specs_by_rank[self.rank]):
            self._step()
        for work, _ in self.sending:
            failure = _attempt(work.wait)
            self.error = self.error or failure
        if self.error is None:
            self.error = _attempt(lambda: next(self.produced, None))  # an announced generator: nothing left over
        failure = _attempt(self.merged.close, fsync)
        return self.error or failure

    def _step(self) -> Piece | None:
        i, piece = self.next_index, None
        self.next_index += 1
        if self.error is None:
            try:
                piece = next(self.produced)
                if i in self.merge_of:
                    self.held[self.merge_of[i].name].append(piece)
                    piece = None
            except Exception as e:  # noqa: BLE001 - agreed by every rank after the writes
                self.error, piece = e, None
        if i in self.runs_after:
            merge = self.runs_after[i]
            self.error = _run_merge(merge, self.held.pop(merge.name, []), self.specs_by_rank, self.merged, self.group,
                                    self.error, self.sending)
        return piece


def _run_merge(merge: _Merge, mine: list[Piece], specs_by_rank, writer: _TensorWriter, group, error, sending):
    """Send this rank's pieces of `merge` to its writer, or receive the others' and write them all.

    A send goes out without waiting for the writer to take it; the previous one must have been taken
    first, so at most one message per rank is in flight."""
    rank, _ = group_rank_and_size(group)
    if rank != merge.writer:
        specs = [specs_by_rank[rank][i] for i in merge.parts[rank]]
        try:
            if error is not None:
                raise error
            buf = torch.from_numpy(_pack(mine))
        except Exception as e:  # noqa: BLE001 - the message still goes out
            error = error or e
            buf = torch.zeros(sum(piece_nbytes(s) for s in specs), dtype=torch.uint8)
        while sending:
            failure = _attempt(sending.pop()[0].wait)
            error = error or failure
        sending.append((dist.isend(buf, dst=global_rank(group, merge.writer), group=group), buf))
        return error
    received = []
    for source, indices in sorted(merge.parts.items()):
        if source != rank:
            specs = [specs_by_rank[source][i] for i in indices]
            buf = torch.empty(sum(piece_nbytes(s) for s in specs), dtype=torch.uint8)
            dist.recv(buf, src=global_rank(group, source), group=group)
            received += _unpack(specs, buf)
    if error is None:
        error = _attempt(writer.write_tensor, mine + received)
    return error


def _open_planned(out_dir: str, file: str) -> int:
    path = os.path.join(out_dir, file)
    try:
        return os.open(path, os.O_WRONLY)  # never create: rank 0 did, on the filesystem all ranks share
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} does not exist on this rank although rank 0 created it: owner-writes needs a shared "
            f"filesystem (use mode='gather' otherwise)"
        ) from None


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = data.cast("B") if data.format != "B" else data
    while len(data):  # pwrite may write less than asked (Linux caps one call near 2 GiB)
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _write_index(out_dir: str, plan: FilePlan, fsync: bool = True) -> None:
    path = os.path.join(out_dir, INDEX_FILE_NAME)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(plan.index_json())
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _batches(specs: list[PieceSpec], batch_bytes: int) -> list[list[int]]:
    """Consecutive pieces grouped up to `batch_bytes` (a bigger piece travels alone); same on both ends."""
    batches: list[list[int]] = []
    size = 0
    for i, spec in enumerate(specs):
        if not batches or size + piece_nbytes(spec) > batch_bytes:
            batches.append([])
            size = 0
        batches[-1].append(i)
        size += piece_nbytes(spec)
    return batches


def _gather_and_write(out_dir, plan, pieces, specs_by_rank, group, batch_bytes, fsync) -> Exception | None:
    """Ranks send their pieces to rank 0 in turn; rank 0 writes them all. Returns this rank's failure.

    Every planned message is sent and received even after a failure, so no rank waits forever.
    """
    rank, world = group_rank_and_size(group)
    error = None
    if rank == 0:
        error = _attempt(_write_pieces, out_dir, plan, pieces, False)
        for source in range(1, world):
            specs = specs_by_rank[source]
            for batch in _batches(specs, batch_bytes):
                buf = torch.empty(sum(piece_nbytes(specs[i]) for i in batch), dtype=torch.uint8)
                dist.recv(buf, src=global_rank(group, source), group=group)
                if error is None:
                    error = _attempt(_write_pieces, out_dir, plan, _unpack([specs[i] for i in batch], buf), False)
        if fsync and error is None:
            error = _attempt(_fsync_files, out_dir, plan)
    else:
        specs, pieces = specs_by_rank[rank], iter(pieces)
        for batch in _batches(specs, batch_bytes):
            try:
                if error is not None:
                    raise error
                buf = torch.from_numpy(_pack([next(pieces) for _ in batch]))
            except Exception as e:  # the planned messages still go out, so rank 0 does not wait forever
                error = error or e
                buf = torch.zeros(sum(piece_nbytes(specs[i]) for i in batch), dtype=torch.uint8)
            dist.send(buf, dst=global_rank(group, 0), group=group)
        if error is None:
            error = _attempt(list, pieces)  # an announced generator checks that nothing is left over
    return error


def _pack(pieces: list[Piece]) -> np.ndarray:
    return np.concatenate([as_bytes(p.tensor) for p in pieces])


def _unpack(specs: list[PieceSpec], buf: torch.Tensor) -> list[Piece]:
    pieces, at = [], 0
    for spec in specs:
        size = piece_nbytes(spec)
        pieces.append(from_bytes(spec, buf[at : at + size]))
        at += size
    return pieces


def _fsync_files(out_dir: str, plan: FilePlan) -> None:
    for planned in plan.files:
        fd = os.open(os.path.join(out_dir, planned.name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
