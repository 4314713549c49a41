"""The files of an HF model directory that travel with its weights (tokenizer, chat template, generation and
processor settings): which ones, and where they are, checked to be regular files inside the directory."""

from __future__ import annotations

import os

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


def companion_files(directory: str, names: tuple[str, ...] = COMPANION_FILES) -> list[tuple[str, str]]:
    """(name, resolved path) of the files among `names` present in `directory`, each a regular file inside it
    after following links (hub-cache blobs count as inside); raises `CheckpointFileError` for any other."""
    return [(n, contained_regular_file(directory, n)) for n in names if os.path.lexists(os.path.join(directory, n))]
