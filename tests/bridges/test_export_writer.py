"""Owner-writes export: awkward splits over 1, 2 and 4 ranks give the bytes `load_file` reads back exactly.

Each multi-process test starts its processes once and runs every check inside them.
"""

import filecmp
import json
import os
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bridges.export import writer as export_writer
from bridges.export.coverage import CoverageError
from bridges.export.writer import RankFailure, plan_files, write_checkpoint
from bridges.checkpoint.pieces import Piece, PieceSpec, full_region
from launcher import run_distributed

SHARD = 600  # bytes: forces several files


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {
        "embed.weight": torch.randn(13, 6, generator=gen),
        "columns.weight": torch.randn(12, 10, generator=gen).bfloat16(),
        "experts.gate_up_proj": torch.randn(8, 3, 10, generator=gen),
        "interleaved.weight": torch.randn(5, 8, generator=gen).bfloat16(),
        "rows_strided.weight": torch.randn(9, 6, generator=gen),
        "norm.weight": torch.randn(7, generator=gen).bfloat16(),
        "scalar": torch.randn((), generator=gen),
        "lm_head.weight": torch.randn(11, 4, generator=gen),
    }


def _specs():
    return {name: (tuple(t.shape), t.dtype) for name, t in _tensors().items()}


def _split(n: int, parts: int, part: int) -> slice:
    """Uneven contiguous split: earlier parts are one larger."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return slice(bounds[part], bounds[part + 1], 1)


def _pieces(rank: int, world: int) -> list[Piece]:
    """This rank's share, cut every awkward way: rows, columns, experts, strided columns and rows."""
    t = _tensors()

    def piece(name, region):
        return Piece(PieceSpec(name, tuple(t[name].shape), t[name].dtype, region), t[name][region].clone())

    regions = {
        "embed.weight": (_split(13, world, rank), slice(0, 6, 1)),
        "columns.weight": (slice(0, 12, 1), _split(10, world, rank)),
        "experts.gate_up_proj": (_split(8, world, rank), slice(0, 3, 1), slice(0, 10, 1)),
        "interleaved.weight": (slice(0, 5, 1), slice(rank, 8, world)),
        "rows_strided.weight": (slice(rank, 9, world), slice(0, 6, 1)),
        "norm.weight": (_split(7, world, rank),),
    }
    pieces = [piece(name, region) for name, region in regions.items()]
    # Interleave gate/up style on one rank too: two strided pieces that merge into whole rows.
    if rank == world - 1:
        pieces.append(piece("lm_head.weight", (slice(0, 11, 1), slice(0, 4, 2))))
        pieces.append(piece("lm_head.weight", (slice(0, 11, 1), slice(1, 4, 2))))
    if rank == 0:
        pieces.append(piece("scalar", ()))
    return pieces


def _read_back(out_dir: str) -> dict[str, torch.Tensor]:
    with open(os.path.join(out_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(os.path.join(out_dir, file)))
        with safe_open(os.path.join(out_dir, file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors


def _assert_exact(out_dir: str) -> None:
    got, expected = _read_back(out_dir), _tensors()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def _export_checks(root: str) -> dict[str, str]:
    """Run on every rank: exports in both modes, then each failure the writer must agree on."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    specs, mine = _specs(), _pieces(rank, world)
    write_checkpoint(mine, specs, os.path.join(root, "owner"), max_shard_bytes=SHARD)
    write_checkpoint(mine, specs, os.path.join(root, "gather"), max_shard_bytes=SHARD, mode="gather", batch_bytes=200)
    announced = [p.spec for p in mine]
    for mode in ("owner", "gather"):  # pieces made one by one while writing, their specs announced first
        write_checkpoint((p for p in _pieces(rank, world)), specs, os.path.join(root, f"lazy_{mode}"),
                         max_shard_bytes=SHARD, mode=mode, batch_bytes=200, piece_specs=announced)
    errors = {}

    def failure(kind, pieces, **kwargs):
        try:
            write_checkpoint(pieces, specs, os.path.join(root, kind), max_shard_bytes=SHARD, **kwargs)
        except (CoverageError, RankFailure) as e:
            errors[kind] = f"{type(e).__name__}: {e}"

    failure("missing", mine[:-1] if rank == world - 1 else mine)  # the odd lm_head columns
    failure("twice", mine + (_pieces(0, world)[:1] if rank == 1 else []))
    for mode in ("owner", "gather"):  # a producer that breaks its announcement, on the last rank
        short = (p for p in (mine[:-1] if rank == world - 1 else mine))
        failure(f"fewer_{mode}", short, mode=mode, batch_bytes=200, piece_specs=announced)
    real_pwrite, real_write_pieces = export_writer._pwrite_all, export_writer._write_pieces

    def disk_full(*args):
        raise OSError("disk full (injected)")

    if rank == 1:  # an owner fails half-way through its writes
        export_writer._pwrite_all = disk_full
    failure("mid_write", mine)
    export_writer._pwrite_all = real_pwrite
    if rank == 0:  # the gathering writer fails: the senders must not wait for it
        export_writer._write_pieces = disk_full
    failure("mid_gather", mine, mode="gather", batch_bytes=200)
    export_writer._write_pieces = real_write_pieces
    # A plan kept from one export to the next: made once, remade on every rank when one rank's pieces change.
    cache, planned, real_plan = export_writer.PlanCache(), [], export_writer.plan_export
    export_writer.plan_export = lambda *args: planned.append(1) or real_plan(*args)
    for i in range(2):
        write_checkpoint(mine, specs, os.path.join(root, f"cached_{i}"), max_shard_bytes=SHARD, plan_cache=cache)
    failure("cache_stale", mine[:-1] if rank == world - 1 else mine, plan_cache=cache)
    export_writer.plan_export = real_plan
    errors["plans_made"] = len(planned)
    # Everyone is still in step after the failures: a subgroup exports in gather mode on its own.
    sub = dist.new_group([world - 2, world - 1])
    if rank >= world - 2:
        sub_specs = {"experts.gate_up_proj": specs["experts.gate_up_proj"]}
        sub_pieces = [p for p in _pieces(rank - (world - 2), 2) if p.spec.hf_name == "experts.gate_up_proj"]
        write_checkpoint(sub_pieces, sub_specs, os.path.join(root, "subgroup"), group=sub, mode="gather")
    dist.barrier()
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_export_across_ranks(tmp_path, world):
    root = str(tmp_path)
    errors = run_distributed(world, _export_checks, root)
    _assert_exact(os.path.join(root, "owner"))
    assert len([f for f in os.listdir(os.path.join(root, "owner")) if f.endswith(".safetensors")]) > 2
    for file in os.listdir(os.path.join(root, "owner")):
        for other in ("gather", "lazy_owner", "lazy_gather", "cached_0", "cached_1"):
            assert filecmp.cmp(os.path.join(root, "owner", file), os.path.join(root, other, file), shallow=False)
    subgroup = load_file(os.path.join(root, "subgroup", "model.safetensors"))
    assert torch.equal(subgroup["experts.gate_up_proj"], _tensors()["experts.gate_up_proj"])
    for rank_errors in errors:  # every rank saw every failure, with the same explanation
        assert rank_errors == errors[0]
    assert "'lm_head.weight'" in errors[0]["missing"] and "cover 22 of 44 elements" in errors[0]["missing"]
    assert errors[0]["plans_made"] == 2 and "cover 22 of 44 elements" in errors[0]["cache_stale"]
    assert "rank 0 region [0:" in errors[0]["twice"] and "rank 1 region" in errors[0]["twice"]
    for mode in ("owner", "gather"):
        assert f"rank {world - 1}: ValueError: {len(_pieces(world - 1, world))} pieces were announced" in errors[0][f"fewer_{mode}"]
    for kind, failing in (("mid_write", 1), ("mid_gather", 0)):
        assert f"writing tensor data failed on 1 of {world} ranks" in errors[0][kind], errors[0][kind]
        assert f"rank {failing}: OSError: disk full (injected)" in errors[0][kind]


def test_single_process_without_torch_distributed(tmp_path):
    out = str(tmp_path / "one")
    plan = write_checkpoint(_pieces(0, 1), _specs(), out, max_shard_bytes=SHARD)
    _assert_exact(out)
    assert plan.files[0].name == f"model-00001-of-{len(plan.files):05d}.safetensors" and len(plan.files) > 2
    single = write_checkpoint(_pieces(0, 1), _specs(), str(tmp_path / "single"))
    assert [f.name for f in single.files] == ["model.safetensors"]
    _assert_exact(str(tmp_path / "single"))


def test_plan_is_deterministic_and_shards_like_transformers():
    specs = _specs()
    plan = plan_files(specs, SHARD)
    again = plan_files(dict(reversed(list(specs.items()))), SHARD)
    assert plan.files == again.files and plan.slots == again.slots
    for planned in plan.files:
        data = sum(plan.slots[n].nbytes for n in planned.tensors)
        assert data <= SHARD or len(planned.tensors) == 1
        assert len(planned.header) % 8 == 0 and planned.size == len(planned.header) + data
    names = sorted(specs)
    assert [n for f in plan.files for n in sorted(f.tensors)] == names  # sorted names, filled in order


def test_local_piece_errors_are_reported(tmp_path):
    specs = _specs()
    bad = Piece(PieceSpec("norm.weight", (7,), torch.bfloat16, (slice(0, 7, 1),)), torch.zeros(6, dtype=torch.bfloat16))
    with pytest.raises(RankFailure, match=r"rank 0: ValueError: piece of 'norm.weight': tensor is \(6,\)"):
        write_checkpoint([bad], specs, str(tmp_path))
    unknown = Piece(PieceSpec("ghost", (2,), torch.float32, full_region((2,))), torch.zeros(2))
    with pytest.raises(CoverageError, match="'ghost': tensor is not in the export's tensor specs"):
        write_checkpoint(_pieces(0, 1) + [unknown], specs, str(tmp_path))


def test_announced_pieces_are_written_one_at_a_time(tmp_path):
    """With `piece_specs`, the writer takes in the next piece only once the earlier ones are written and
    let go (whole rows here: each is one run), so a rank never holds all its pieces at once."""
    t = _tensors()
    shown = None  # weak references to the pieces made while writing

    def made_one_by_one():
        for name, tensor in t.items():
            for rows in range(tensor.shape[0]) if tensor.dim() else [None]:
                region = full_region(tuple(tensor.shape)) if rows is None else \
                    (slice(rows, rows + 1, 1),) + full_region(tuple(tensor.shape[1:]))
                assert all(ref() is None for ref in shown or ()), "an earlier piece is still held"
                piece = Piece(PieceSpec(name, tuple(tensor.shape), tensor.dtype, region), tensor[region].clone())
                if shown is not None:
                    shown.append(weakref.ref(piece.tensor))
                yield piece
                del piece

    specs = [p.spec for p in made_one_by_one()]
    shown = []
    write_checkpoint(made_one_by_one(), _specs(), str(tmp_path), max_shard_bytes=SHARD, piece_specs=specs)
    assert len(shown) == len(specs)
    _assert_exact(str(tmp_path))
    with pytest.raises(RankFailure, match="piece 0 was announced as PieceSpec.hf_name='embed.weight'"):
        write_checkpoint(made_one_by_one(), _specs(), str(tmp_path / "x"), piece_specs=specs[1:] + specs[:1])


def test_fragmented_pieces_are_merged_on_one_rank_in_an_order_all_can_follow():
    """Column halves of a row-parallel weight (short runs) go to one writer, taking turns per tensor;
    when two ranks would meet their merges in opposite orders, none is planned (each writes its runs)."""
    def halves(name, rank):
        return PieceSpec(name, (1024, 8), torch.float32, (slice(0, 1024, 1), slice(4 * rank, 4 * rank + 4, 1)))

    rows = PieceSpec("rows", (1024, 8), torch.float32, (slice(0, 512, 1), slice(0, 8, 1)))
    merges = export_writer._plan_merges([[rows, halves("a", 0), halves("b", 0)], [halves("a", 1), halves("b", 1)]])
    assert [(m.name, m.writer, m.parts) for m in merges] == [("a", 0, {0: (1,), 1: (0,)}), ("b", 1, {0: (2,), 1: (1,)})]
    crossed = [[halves("a", 0), halves("b", 0)], [halves("b", 1), halves("a", 1)]]
    assert export_writer._plan_merges(crossed) == []
