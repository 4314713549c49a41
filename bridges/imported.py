"""The HF checkpoint a run starts from: opening it (every file check, rank-local, before any collective), importing
it, and the record of it an export needs afterwards (`ImportedCheckpoint`: its config, dtype, expert layout, MTP
tensors and companion files)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from bridges.architecture import GPTArchitecture
from bridges.checkpoint import hf_config
from bridges.checkpoint.companions import companion_files
from bridges.checkpoint.pieces import Piece, PieceSpec, full_region
from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint
from bridges.load import ImportReport, import_weights
from bridges.models import family_of
from bridges.models.family import Family
from bridges.rules.expert_layouts import ExpertLayout


@dataclass(frozen=True)
class OpenedCheckpoint:
    """An HF checkpoint directory whose headers, config and companion files were read and checked."""

    path: str  # absolute
    reader: SafetensorsCheckpoint
    config: dict[str, Any]
    companions: tuple[tuple[str, str], ...]  # (name, resolved path) of the files that travel with exports


def open_checkpoint(path: str, family: Family | str | None = None, config: dict[str, Any] | None = None
                    ) -> OpenedCheckpoint:
    """Read the safetensors headers, `config.json` (unless given as `config`, already read) and the companion files'
    places (of `family`, else of the config's family) of the checkpoint at `path`. Rank-local; raises on anything
    unreadable."""
    reader = SafetensorsCheckpoint(path)
    config = config if config is not None else hf_config.load_config(path)
    names = family_of(family or config.get("model_type")).companion_files
    return OpenedCheckpoint(os.path.abspath(path), reader, config, tuple(companion_files(path, names)))


@dataclass(frozen=True)
class ImportedCheckpoint:
    """What an export needs to know about the HF checkpoint a run was imported from."""

    path: str
    config: dict[str, Any]
    dtype: torch.dtype  # the checkpoint's dtype: an export's default
    expert_layout: ExpertLayout  # exports keep it
    mtp_layers: int  # MTP layers the source's config declares (an MTP passthrough keeps the count)
    mtp_tensors: tuple[str, ...]  # HF names of the source's MTP layers
    companions: tuple[tuple[str, str], ...]  # (name, resolved path), copied into every export

    def mtp_specs(self) -> list[PieceSpec]:
        """The source's MTP tensors, whole, as an export writes them when it carries them through unchanged."""
        reader = SafetensorsCheckpoint(self.path)
        return [PieceSpec(n, tuple(reader.shape(n)), reader.dtype(n), full_region(tuple(reader.shape(n))))
                for n in self.mtp_tensors]

    def read_pieces(self, specs: list[PieceSpec]) -> Iterator[Piece]:
        """The values of `specs` (whole tensors of the source), read one at a time as they are consumed."""
        reader = SafetensorsCheckpoint(self.path)
        return (Piece(spec, reader.read(spec.hf_name)) for spec in specs)


def import_checkpoint(
    model_chunks, family: Family | str, arch: GPTArchitecture, opened: OpenedCheckpoint, group=None,
) -> tuple[ImportedCheckpoint, ImportReport]:
    """Load `opened` into this rank's model chunks (collective, all or nothing: see bridges.load.import_weights) and
    return the record of it, with the import report."""
    family = family_of(family)
    report = import_weights(model_chunks, family, arch, opened.reader, config=opened.config, group=group)
    imported = ImportedCheckpoint(
        path=opened.path,
        config=opened.config,
        dtype=hf_config.dtype(opened.config, default=_usual_dtype(opened.reader)),
        expert_layout=report.expert_layout,
        mtp_layers=family.mtp_layers(opened.config),
        mtp_tensors=tuple(family.mtp_tensor_names(opened.reader.keys(), opened.config)),
        companions=opened.companions,
    )
    return imported, report


def _usual_dtype(source) -> torch.dtype:
    dtypes = [source.dtype(n) for n in source.keys()]
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
