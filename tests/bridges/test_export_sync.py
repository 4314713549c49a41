"""Synchronous export of a built model, pieces made one at a time while written (`export_pieces(copy=False)`
with `piece_specs=export_specs(...)`): the same files, byte for byte, as writing a snapshot of all pieces
and as gathering everything on rank 0 (so TP shards merged before writing land right), and the parameters
are left as they were."""

from __future__ import annotations

import filecmp
import os

from bridges.megatron.layout import ParallelLayout
from tests.bridges.glm45_tiny import tiny_config
from tests.launcher import run_distributed

LAYOUTS = [ParallelLayout(ep=2), ParallelLayout(tp=2)]


def export_both_ways(root: str, layouts) -> None:
    import torch

    from bridges.export.specs import export_pieces, export_specs, hf_tensor_specs
    from bridges.export.writer import write_checkpoint
    from bridges.megatron import build, parallel
    from bridges.models import glm45

    arch = glm45.architecture({**tiny_config().to_dict(), "model_type": "glm4_moe"})
    for i, layout in enumerate(layouts):
        parallel.initialize(layout)
        model = build.build_gpt_model(arch, layout)
        before = {n: t.clone() for n, t in model.state_dict().items() if torch.is_tensor(t)}
        specs = hf_tensor_specs(glm45.FAMILY, arch, torch.float32)
        snapshot = list(export_pieces([model], glm45.FAMILY, arch))
        write_checkpoint(snapshot, specs, os.path.join(root, f"{i}_snapshot"), max_shard_bytes=200_000)
        write_checkpoint(snapshot, specs, os.path.join(root, f"{i}_gather"), max_shard_bytes=200_000, mode="gather")
        del snapshot
        write_checkpoint(export_pieces([model], glm45.FAMILY, arch, copy=False), specs, os.path.join(root, f"{i}_lazy"),
                         max_shard_bytes=200_000, piece_specs=export_specs([model], glm45.FAMILY, arch))
        assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items() if torch.is_tensor(t))


def test_lazy_sync_export_writes_the_same_files(tmp_path):
    run_distributed(2, export_both_ways, str(tmp_path), LAYOUTS)
    for i in range(len(LAYOUTS)):
        # gather: rank 0 writes everything; the others: every owner writes, TP shards merged on one of them
        gather = tmp_path / f"{i}_gather"
        files = sorted(os.listdir(gather))
        assert len(files) > 2
        for other in ("snapshot", "lazy"):
            assert files == sorted(os.listdir(tmp_path / f"{i}_{other}"))
            for file in files:
                assert filecmp.cmp(gather / file, tmp_path / f"{i}_{other}" / file, shallow=False), (LAYOUTS[i], other, file)
