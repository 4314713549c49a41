"""The directory protocol of exports under one root: staging, atomic publish, `latest`, pruning.

An export is written into `<root>/.step_<N>.staging`, then `publish` writes the `.complete` marker
and renames it to `<root>/step_<N>` in one atomic step. A directory is complete when it has a final
name, the marker and the index. Single-process helpers: call them from rank 0 only.
"""

from __future__ import annotations

import os
import re
import shutil

from bridges.safetensors_format import INDEX_FILE_NAME

COMPLETE_MARKER = ".complete"
LATEST_NAME = "latest"
_EXPORT = re.compile(r"step_(\d+)")
_STAGING = re.compile(r"\.(.+)\.staging")
_DELETING = re.compile(r"\.(.+)\.deleting")


def export_name(step: int) -> str:
    return f"step_{step}"


def staging_dir(final: str) -> str:
    """Where the export that will become `final` is written: a hidden sibling, on the same filesystem."""
    head, name = os.path.split(os.path.normpath(final))
    return os.path.join(head, f".{name}.staging")


def is_complete(path: str) -> bool:
    """True for a published export: not a staging name, with the `.complete` marker and the index."""
    name = os.path.basename(os.path.normpath(path))
    if _STAGING.fullmatch(name) or _DELETING.fullmatch(name):
        return False
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER)) and os.path.isfile(os.path.join(path, INDEX_FILE_NAME))


def publish(staging: str, final: str) -> None:
    """Mark `staging` complete and rename it to `final` atomically; never replaces an existing `final`."""
    if os.path.lexists(final):
        state = "a complete export" if is_complete(final) else "an incomplete directory"
        raise FileExistsError(f"cannot publish {staging} as {final}: {final} already exists ({state}), not overwriting")
    if not os.path.isfile(os.path.join(staging, INDEX_FILE_NAME)):
        raise FileNotFoundError(f"cannot publish {staging}: it has no {INDEX_FILE_NAME}, the export did not finish")
    _write_durably(os.path.join(staging, COMPLETE_MARKER), "complete\n")
    os.rename(staging, final)
    _fsync_dir(os.path.dirname(os.path.normpath(final)) or ".")


def update_latest(root: str, name: str) -> None:
    """Point `<root>/latest` (a text file holding one export name) at `name`, atomically."""
    if not is_complete(os.path.join(root, name)):
        raise ValueError(f"refusing to point {root}/{LATEST_NAME} at {name}: not a complete export")
    path = os.path.join(root, LATEST_NAME)
    _write_durably(path + ".tmp", name + "\n")
    os.replace(path + ".tmp", path)
    _fsync_dir(root)


def read_latest(root: str) -> str | None:
    """The export name `latest` points at, or None when there is no `latest` yet."""
    try:
        with open(os.path.join(root, LATEST_NAME), encoding="utf-8") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def complete_exports(root: str) -> list[str]:
    """Names of the complete `step_<N>` exports under `root`, oldest (smallest N) first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if _EXPORT.fullmatch(n) and is_complete(os.path.join(root, n))]
    return sorted(names, key=lambda n: int(_EXPORT.fullmatch(n).group(1)))


def prune(root: str, keep_last_k: int) -> list[str]:
    """Delete complete exports older than the newest `keep_last_k`; returns the names deleted.

    Never deletes the newest complete export, the one `latest` names, an incomplete directory, or
    anything not named `step_<N>`.
    """
    if keep_last_k < 1:
        raise ValueError(f"keep_last_k must be at least 1 (the newest export is always kept), got {keep_last_k}")
    exports = complete_exports(root)
    keep = set(exports[-keep_last_k:]) | {read_latest(root)}
    removed = []
    for name in exports:
        if name not in keep:
            _remove(root, name)
            removed.append(name)
    return removed


def clean_stale_staging(root: str) -> list[str]:
    """Remove staging directories left by crashed exports (and half-deleted old ones); returns their names.

    Only call when no export is being written under `root` (for example at the start of training).
    """
    if not os.path.isdir(root):
        return []
    stale = sorted(n for n in os.listdir(root) if _STAGING.fullmatch(n) or _DELETING.fullmatch(n))
    for name in stale:
        shutil.rmtree(os.path.join(root, name))
    return stale


def _remove(root: str, name: str) -> None:
    # Rename first: a crash half-way through rmtree leaves a `.deleting` name, never a broken `step_<N>`.
    doomed = os.path.join(root, f".{name}.deleting")
    os.rename(os.path.join(root, name), doomed)
    shutil.rmtree(doomed)


def _write_durably(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
