"""The directory protocol of exports under one root: ownership, staging, atomic publish, `latest`, pruning.

A run owns the root while it holds `<root>/.lock` (its id, host and pid). An export is written into
`<root>/.step_<N>.<run id>.staging`, then `publish` writes the `.complete` marker and renames it to
`<root>/step_<N>` in one atomic step. A directory is complete when it has a final name, the marker and
the index; its `trainer_state.json` names the run that wrote it, and a run prunes only its own exports.
Single-process helpers: call them from rank 0 only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import time

from bridges.checkpoint.safetensors_format import INDEX_FILE_NAME

COMPLETE_MARKER = ".complete"
LATEST_NAME = "latest"
LOCK_NAME = ".lock"
TRAINER_STATE = "trainer_state.json"
_EXPORT = re.compile(r"step_(\d+)")
_STAGING = re.compile(r"\.(.+)\.staging")
_DELETING = re.compile(r"\.(.+)\.deleting")


class ExportDirError(ValueError):
    """The export root cannot be used by this run (held by another run, a name already taken, not a directory)."""


def export_name(step: int) -> str:
    return f"step_{step}"


def staging_dir(final: str, run_id: str | None = None) -> str:
    """Where the export that will become `final` is written: a hidden sibling, on the same filesystem,
    named with the run's id so that a run only ever removes staging directories of its own."""
    head, name = os.path.split(os.path.normpath(final))
    return os.path.join(head, f".{name}.{run_id}.staging" if run_id else f".{name}.staging")


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


def export_run_id(path: str) -> str | None:
    """The id of the run that wrote the export at `path` (its trainer_state.json), None when unknown."""
    state_file = os.path.join(path, TRAINER_STATE)
    try:
        if not stat.S_ISREG(os.stat(state_file).st_mode):
            return None
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    run_id = state.get("run_id") if isinstance(state, dict) else None
    return run_id if isinstance(run_id, str) else None


def prune(root: str, keep_last_k: int, run_id: str, protect=()) -> list[str]:
    """Delete this run's complete exports older than its newest `keep_last_k`; returns the names deleted.

    Only exports whose trainer_state.json carries `run_id` are candidates. Never deletes the newest of
    them, the one `latest` names, a path in `protect` (the import source), an incomplete directory, or
    anything not named `step_<N>`.
    """
    if keep_last_k < 1:
        raise ValueError(f"keep_last_k must be at least 1 (the newest export is always kept), got {keep_last_k}")
    ours = [n for n in complete_exports(root) if export_run_id(os.path.join(root, n)) == run_id]
    protected = {os.path.realpath(p) for p in protect if p}
    keep = set(ours[-keep_last_k:]) | {read_latest(root)}
    removed = []
    for name in ours:
        if name not in keep and os.path.realpath(os.path.join(root, name)) not in protected:
            _remove(root, name, run_id)
            removed.append(name)
    return removed


def clean_stale_staging(root: str, run_id: str) -> list[str]:
    """Remove this run's staging directories left by failed exports (and its half-deleted old ones);
    returns their names. Other runs' leftovers are never touched (see `leftover_staging`)."""
    if not os.path.isdir(root):
        return []
    stale = sorted(n for n in os.listdir(root) if n.endswith((f".{run_id}.staging", f".{run_id}.deleting")))
    for name in stale:
        shutil.rmtree(os.path.join(root, name))
    return stale


def leftover_staging(root: str) -> list[str]:
    """Hidden staging / half-deleted directories under `root` (left by exports that crashed); listed, not removed."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if _STAGING.fullmatch(n) or _DELETING.fullmatch(n))


def check_root(root: str, planned_steps) -> None:
    """Refuse, before any training, a root this run cannot export into without replacing what it did not
    write: a root that is not a directory, a `latest` that is not a file, or an export name this run will
    write (`planned_steps`) already taken. Raises `ExportDirError` naming the conflict."""
    if os.path.lexists(root) and not os.path.isdir(root):
        raise ExportDirError(f"{root}: exists and is not a directory; the HF exports cannot go there")
    latest = os.path.join(root, LATEST_NAME)
    if os.path.lexists(latest) and (os.path.islink(latest) or not os.path.isfile(latest)):
        raise ExportDirError(f"{latest}: expected the text file naming the newest export, found something else")
    for step in sorted(planned_steps):
        path = os.path.join(root, export_name(step))
        if os.path.lexists(path):
            owner = export_run_id(path)
            raise ExportDirError(
                f"{path} already exists ({'written by run ' + owner if owner else 'not written by this run'}) and this "
                f"run would export step {step} there; choose another hf_export.dirpath or hydra.run.dir"
            )


def acquire_lock(root: str, run_id: str) -> str | None:
    """Take `<root>/.lock` for this run (id, host, pid). A lock left by a dead process on this host is
    replaced (returns a note saying so); one held by a live process, or by another host, raises
    `ExportDirError` naming its holder."""
    path = os.path.join(root, LOCK_NAME)
    me = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    note = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                raise ExportDirError(
                    f"{path}: a lock that cannot be read; if no run uses {root}, remove the file"
                ) from None
            if holder["host"] == me["host"] and not _alive(holder["pid"]):
                os.remove(path)
                note = f"removed a stale lock of run {holder['run_id']} (pid {holder['pid']} is gone)"
                continue
            raise ExportDirError(
                f"{root} is in use by run {holder['run_id']} (pid {holder['pid']} on {holder['host']}); "
                f"choose another hf_export.dirpath or hydra.run.dir, or remove {path} if that run is gone"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return note
    raise ExportDirError(f"{path}: could not take the lock (other runs keep replacing it)")


def release_lock(root: str, run_id: str) -> None:
    """Remove `<root>/.lock` if this process of run `run_id` holds it."""
    path = os.path.join(root, LOCK_NAME)
    holder = _read_lock(path)
    if holder and holder["run_id"] == run_id and holder["pid"] == os.getpid():
        os.remove(path)


def _read_lock(path: str) -> dict | None:
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # never open a FIFO (it would block)
            return None
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or not isinstance(holder.get("host"), str):
        return None
    holder.setdefault("run_id", "?")
    return holder


def _alive(pid: int) -> bool:
    if pid <= 0:  # 0 and negative numbers name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _remove(root: str, name: str, run_id: str) -> None:
    # Rename first: a crash half-way through rmtree leaves a `.deleting` name, never a broken `step_<N>`.
    doomed = os.path.join(root, f".{name}.{run_id}.deleting")
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
