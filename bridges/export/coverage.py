"""Check, from piece metadata alone, that every byte of every exported tensor has exactly one writer.

Runs identically on every rank over the all-gathered piece specs, so all ranks reach the same verdict.
"""

from __future__ import annotations

from collections import defaultdict

from bridges.checkpoint.pieces import PieceSpec, Region
from bridges.checkpoint.regions import check_region, numel, regions_overlap

MAX_LISTED = 10  # problems named in one error; the count says how many more


class CoverageError(ValueError):
    """The ranks' pieces miss part of a tensor, write some part twice, or do not match the tensor specs."""


def check_coverage(tensor_specs: dict, specs_by_rank: list[list[PieceSpec]]) -> None:
    """Raise CoverageError unless the pieces of all ranks tile each tensor in `tensor_specs` exactly."""
    problems: list[str] = []
    by_tensor: dict[str, list[tuple[int, Region]]] = defaultdict(list)
    for rank, specs in enumerate(specs_by_rank):
        for spec in specs:
            problem = _mismatch(tensor_specs, spec, rank)
            if problem:
                problems.append(problem)
            else:
                by_tensor[spec.hf_name].append((rank, spec.region))
    for name in sorted(tensor_specs):
        problems += _tiling_problems(name, tensor_specs[name][0], by_tensor.get(name, []))
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        listed = "\n  ".join(problems[:MAX_LISTED])
        raise CoverageError(f"export pieces do not cover the tensors exactly once:\n  {listed}{more}")


def _mismatch(tensor_specs: dict, spec: PieceSpec, rank: int) -> str | None:
    where = f"rank {rank}: piece of {spec.hf_name!r}"
    if spec.hf_name not in tensor_specs:
        return f"{where}: tensor is not in the export's tensor specs"
    shape, dtype = tensor_specs[spec.hf_name]
    if tuple(spec.hf_shape) != tuple(shape) or spec.dtype != dtype:
        return f"{where}: says {tuple(spec.hf_shape)} {spec.dtype}, the tensor specs say {tuple(shape)} {dtype}"
    try:
        check_region(tuple(shape), spec.region, where)
    except ValueError as e:
        return str(e)
    return None


def _tiling_problems(name: str, shape: tuple[int, ...], pieces: list[tuple[int, Region]]) -> list[str]:
    problems = []
    pieces = [p for p in pieces if numel(p[1])]
    # Sweep along the dim the pieces split most (rows, or columns of a row-parallel tensor), so only
    # pieces whose spans along it meet are compared.
    d = max(range(len(shape)), key=lambda d: len({r[d].start for _, r in pieces})) if shape else None
    key = (lambda p: (p[1][d].start, p[1][d].stop)) if shape else (lambda p: (0, 0))
    pieces = sorted(pieces, key=key)
    for i, (rank_a, a) in enumerate(pieces):
        for rank_b, b in pieces[i + 1 :]:
            if shape and b[d].start >= a[d].stop:
                break
            if regions_overlap(a, b):
                problems.append(
                    f"tensor {name!r}: rank {rank_a} region {_show(a)} and rank {rank_b} region {_show(b)} overlap"
                )
    covered, total = sum(numel(r) for _, r in pieces), numel(tuple(slice(0, n, 1) for n in shape))
    if not problems and covered != total:
        ranks = sorted({r for r, _ in pieces})
        problems.append(
            f"tensor {name!r} {tuple(shape)}: pieces from ranks {ranks} cover {covered} of {total} elements; "
            f"regions: {[_show(r) for _, r in pieces][:8]}"
        )
    return problems


def _show(region: Region) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" + (f":{s.step}" if s.step != 1 else "") for s in region) + "]"
