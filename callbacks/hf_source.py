"""What an export needs to know about the HF checkpoint a run was imported from (set by the import
callback on the LightningModule as `hf_source`; absent when the run started from random weights)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from bridges.checkpoint.files import contained_regular_file

# Files of an HF model directory that travel with every export (tokenizer, chat template, generation settings,
# processor settings).
COMPANION_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    # a vision-language model's processor (AutoProcessor): image and video preprocessing, the processor itself
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)


@dataclass
class ImportedSource:
    path: str
    config: dict[str, Any]
    dtype: torch.dtype
    expert_layout: str
    mtp_tensors: list[str] = field(default_factory=list)  # HF names of the source's MTP layers

    def companion_files(self) -> list[tuple[str, str]]:
        return companion_files(self.path)


def companion_files(directory: str) -> list[tuple[str, str]]:
    """(name, resolved path) of the companion files present in `directory`, each a regular file inside it
    after following links (hub-cache blobs count as inside); raises `bridges.checkpoint.files.CheckpointFileError`
    for any other."""
    return [(n, contained_regular_file(directory, n)) for n in COMPANION_FILES
            if os.path.lexists(os.path.join(directory, n))]


def mtp_tensor_names(names, num_hidden_layers: int) -> list[str]:
    """HF tensors of MTP layers: `model.layers.{num_hidden_layers + i}.*` (GLM-4.5 / DeepSeek style) or `mtp.*`
    (Qwen3.5)."""
    out = []
    for name in names:
        if name.startswith("mtp."):
            out.append(name)
            continue
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
            if int(parts[2]) >= num_hidden_layers:
                out.append(name)
    return sorted(out)
