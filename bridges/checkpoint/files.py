"""Files read from a checkpoint directory: regular files, checked before they are opened.

A FIFO or a device named like a shard would block a reader forever; a companion file (tokenizer,
generation config) that links outside its directory would copy foreign bytes into every export.
"""

from __future__ import annotations

import os
import stat


class CheckpointFileError(ValueError):
    """A file of a checkpoint directory that is not a regular file, or that leads outside the directory."""


def check_regular_file(path: str) -> None:
    """Raise unless `path` (after following links) is a regular file; never opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CheckpointFileError(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointFileError(f"{path}: not a regular file ({_kind(mode)}), refused")


def contained_regular_file(directory: str, name: str) -> str:
    """`directory/name` resolved: a regular file inside `directory` after following links.

    A Hugging Face hub cache snapshot (`.../models--org--name/snapshots/<rev>/`) links its files into the
    repository's `blobs/`; targets there count as inside. Raises `CheckpointFileError` otherwise.
    """
    path = os.path.join(directory, name)
    real = os.path.realpath(path)
    roots = [os.path.realpath(directory)]
    parent = os.path.dirname(roots[0])
    if os.path.basename(parent) == "snapshots":
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))
    if not any(real.startswith(root + os.sep) for root in roots):
        raise CheckpointFileError(f"{path}: links to {real}, outside the checkpoint directory, refused")
    check_regular_file(real)
    return real


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"
