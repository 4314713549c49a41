"""Safetensors I/O against its physical limits: owner-writes export vs `save_file`, region reads vs `load_file`.

Plain script (`python benchmarks/io_bench.py [--mb 500] [--repeats 5] [--dir D]`), one process, world 1.
Prints medians and ratios; targets: write within 1.25x of save_file, read within 1.5x of load_file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bridges.export.writer import write_checkpoint  # noqa: E402
from bridges.checkpoint.pieces import Piece, PieceSpec, full_region  # noqa: E402
from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint  # noqa: E402


def model_like_tensors(total_mb: int) -> dict[str, torch.Tensor]:
    """An MoE-shaped fp32 state dict of about `total_mb` MB: embeddings, attention, fused experts, norms."""
    hidden, experts, inter = 1024, 16, 512
    per_layer = (3 * hidden * hidden + hidden * hidden + experts * 3 * inter * hidden + hidden) * 4
    vocab = 32000
    layers = max(1, (total_mb * 10**6 - vocab * hidden * 4) // per_layer)
    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.qkv_proj.weight"] = torch.randn(3 * hidden, hidden, generator=gen)
        tensors[p + "self_attn.o_proj.weight"] = torch.randn(hidden, hidden, generator=gen)
        tensors[p + "mlp.experts.gate_up_proj"] = torch.randn(experts, 2 * inter, hidden, generator=gen)
        tensors[p + "mlp.experts.down_proj"] = torch.randn(experts, hidden, inter, generator=gen)
        tensors[p + "input_layernorm.weight"] = torch.randn(hidden, generator=gen)
    return tensors


def whole_pieces(tensors):
    return [Piece(PieceSpec(n, tuple(t.shape), t.dtype, full_region(tuple(t.shape))), t) for n, t in tensors.items()]


def expert_pieces(tensors):
    """Per-expert slices of fused tensors (what each EP rank owns), whole tensors otherwise."""
    pieces = []
    for name, t in tensors.items():
        if "experts" not in name:
            pieces += whole_pieces({name: t})
            continue
        for e in range(t.shape[0]):
            region = (slice(e, e + 1, 1),) + full_region(tuple(t.shape[1:]))
            pieces.append(Piece(PieceSpec(name, tuple(t.shape), t.dtype, region), t[e : e + 1]))
    return pieces


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def touch(tensors) -> int:
    """Read every byte (load_file maps lazily: untouched it costs nothing)."""
    return sum(int(t.reshape(-1).view(torch.int32).sum()) for t in tensors)


def interleaved_medians(contenders: dict, repeats: int, before=None) -> dict[str, float]:
    """Median seconds of each contender, taking turns within every round so machine noise hits all alike."""
    times: dict[str, list[float]] = {label: [] for label in contenders}
    for _ in range(repeats):
        for label, fn in contenders.items():
            if before:
                before()
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def ratios(medians: dict[str, float]) -> list[tuple[str, float, float]]:
    """(label, seconds, ratio to the first contender) rows."""
    baseline = next(iter(medians.values()))
    return [(label, seconds, seconds / baseline) for label, seconds in medians.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scratch = tempfile.mkdtemp(prefix="io_bench_", dir=args.dir)
    tensors = model_like_tensors(args.mb)
    specs = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    size_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
    ours, ref = os.path.join(scratch, "ours"), os.path.join(scratch, "ref")
    ref_file = os.path.join(ref, "model.safetensors")

    def fresh():
        shutil.rmtree(ours, ignore_errors=True)
        shutil.rmtree(ref, ignore_errors=True)
        os.makedirs(ref)

    def save(durable):
        save_file(tensors, ref_file, metadata={"format": "pt"})
        if durable:
            fsync_path(ref_file)

    rows = []
    for durable in (False, True):
        label = "with fsync" if durable else "page cache"
        medians = interleaved_medians(
            {
                f"write ({label}): save_file": lambda: save(durable),
                f"write ({label}): owner-writes, whole tensors":
                    lambda: write_checkpoint(whole_pieces(tensors), specs, ours, fsync=durable),
                f"write ({label}): owner-writes, per-expert pieces":
                    lambda: write_checkpoint(expert_pieces(tensors), specs, ours, fsync=durable),
            },
            args.repeats,
            before=fresh,
        )
        rows += ratios(medians)

    save(durable=False)  # the last timed run left only our export; both readers read our file
    with open(ref_file, "rb") as a, open(os.path.join(ours, "model.safetensors"), "rb") as b:
        same = a.read() == b.read()

    def read_ours():
        with SafetensorsCheckpoint(ours) as ckpt:
            touch(ckpt.read(n) for n in ckpt.keys())

    def read_ours_column_halves():  # a TP2 split along the last dim: strided runs, copied out
        with SafetensorsCheckpoint(ours) as ckpt:
            for n in ckpt.keys():
                shape = ckpt.shape(n)
                for half in (slice(0, shape[-1] // 2, 1), slice(shape[-1] // 2, shape[-1], 1)):
                    touch([ckpt.read(n, full_region(shape[:-1]) + (half,))])

    def read_ref():
        touch(load_file(os.path.join(ours, "model.safetensors")).values())

    medians = interleaved_medians(
        {
            "read + touch: load_file": read_ref,
            "read + touch: SafetensorsCheckpoint.read": read_ours,
            "read + touch: SafetensorsCheckpoint.read, column halves": read_ours_column_halves,
            "touch alone, tensors in memory": lambda: touch(tensors.values()),
        },
        args.repeats,
    )
    rows += ratios(medians)
    shutil.rmtree(scratch)

    print(f"{len(tensors)} tensors, {size_mb:.0f} MB fp32, medians of {args.repeats}, torch threads 1")
    print(f"  our file is byte-identical to save_file's: {same}")
    for label, seconds, ratio in rows:
        print(f"  {label:<58} {seconds:7.3f} s   {ratio:5.2f}x")


if __name__ == "__main__":
    main()
