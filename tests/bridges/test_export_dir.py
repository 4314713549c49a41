"""Export directory protocol: atomic publish that never overwrites, `latest`, pruning that keeps what matters."""

import json
import os
import subprocess
import sys

import pytest

from bridges.export import directory as ed


def _export(root, step, publish=True, run_id=None):
    final = os.path.join(root, ed.export_name(step))
    staging = ed.staging_dir(final)
    os.makedirs(staging)
    with open(os.path.join(staging, "model.safetensors.index.json"), "w") as f:
        f.write("{}")
    if run_id:
        with open(os.path.join(staging, "trainer_state.json"), "w") as f:
            json.dump({"global_step": step, "run_id": run_id}, f)
    if publish:
        ed.publish(staging, final)
    return final, staging


def test_publish_is_atomic_and_refuses_to_overwrite(tmp_path):
    final, staging = _export(str(tmp_path), 5, publish=False)
    assert staging == str(tmp_path / ".step_5.staging")
    assert not ed.is_complete(staging) and not os.path.exists(final)
    ed.publish(staging, final)
    assert ed.is_complete(final) and not os.path.exists(staging)
    _, again = _export(str(tmp_path), 6, publish=False)
    with pytest.raises(FileExistsError, match="a complete export"):
        ed.publish(again, final)
    assert ed.is_complete(final) and os.path.isdir(again)
    os.makedirs(tmp_path / ".step_7.staging")
    with pytest.raises(FileNotFoundError, match="did not finish"):
        ed.publish(str(tmp_path / ".step_7.staging"), str(tmp_path / "step_7"))


def test_latest_points_at_complete_exports_only(tmp_path):
    root = str(tmp_path)
    assert ed.read_latest(root) is None
    _export(root, 1)
    ed.update_latest(root, "step_1")
    assert ed.read_latest(root) == "step_1"
    _export(root, 2, publish=False)
    with pytest.raises(ValueError, match="not a complete export"):
        ed.update_latest(root, "step_2")
    assert ed.read_latest(root) == "step_1"


def test_prune_keeps_newest_latest_and_incomplete(tmp_path):
    root = str(tmp_path)
    for step in (1, 2, 10, 20):
        _export(root, step, run_id="me")
    _export(root, 30, publish=False)  # being written
    os.makedirs(tmp_path / "step_3")  # incomplete, not ours to judge
    (tmp_path / "notes").mkdir()
    ed.update_latest(root, "step_2")
    assert ed.complete_exports(root) == ["step_1", "step_2", "step_10", "step_20"]
    assert ed.prune(root, keep_last_k=1, run_id="me") == ["step_1", "step_10"]
    assert sorted(os.listdir(root)) == [".step_30.staging", "latest", "notes", "step_2", "step_20", "step_3"]
    with pytest.raises(ValueError, match="at least 1"):
        ed.prune(root, keep_last_k=0, run_id="me")
    assert ed.complete_exports(root) == ["step_2", "step_20"]


def test_prune_touches_only_this_runs_exports_and_never_the_import_source(tmp_path):
    root = str(tmp_path)
    for step in (1, 2):
        _export(root, step, run_id="other")  # an earlier run's exports, and a foreign one without an id
    _export(root, 3)
    for step in (4, 5, 6, 7):
        _export(root, step, run_id="me")
    ed.update_latest(root, "step_7")
    source = os.path.join(root, "step_5")  # this run continued from it (same id: a resumed run, say)
    assert ed.prune(root, keep_last_k=1, run_id="me", protect=[source]) == ["step_4", "step_6"]
    assert ed.complete_exports(root) == ["step_1", "step_2", "step_3", "step_5", "step_7"]


def test_stale_staging_cleanup_touches_only_this_runs(tmp_path):
    root = str(tmp_path)
    for name in (".step_2.me.staging", ".step_1.me.deleting", ".step_2.other.staging", ".mine.staging", ".x.deleting"):
        os.makedirs(tmp_path / name)
    assert ed.clean_stale_staging(root, "me") == [".step_1.me.deleting", ".step_2.me.staging"]
    assert ed.leftover_staging(root) == [".mine.staging", ".step_2.other.staging", ".x.deleting"]
    assert sorted(os.listdir(root)) == [".mine.staging", ".step_2.other.staging", ".x.deleting"]
    assert ed.staging_dir(os.path.join(root, "step_4"), "me") == os.path.join(root, ".step_4.me.staging")


def test_lock_refuses_a_live_run_and_replaces_a_dead_ones(tmp_path):
    root = str(tmp_path)
    assert ed.acquire_lock(root, "run_a") is None
    with pytest.raises(ed.ExportDirError, match=r"in use by run run_a \(pid \d+ on "):
        ed.acquire_lock(root, "run_b")
    ed.release_lock(root, "run_b")  # not the holder: nothing happens
    assert json.load(open(tmp_path / ".lock"))["run_id"] == "run_a"
    ed.release_lock(root, "run_a")
    assert not (tmp_path / ".lock").exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"run_id": "run_dead", "host": __import__("socket").gethostname(), "pid": int(dead.stdout)}
    (tmp_path / ".lock").write_text(json.dumps(holder))
    assert "stale lock of run run_dead" in ed.acquire_lock(root, "run_c")
    assert json.load(open(tmp_path / ".lock"))["run_id"] == "run_c"

    (tmp_path / ".lock").write_text(json.dumps(dict(holder, host="elsewhere")))  # cannot tell: refused
    with pytest.raises(ed.ExportDirError, match="in use by run run_dead"):
        ed.acquire_lock(root, "run_d")
    os.remove(tmp_path / ".lock")
    os.mkfifo(tmp_path / ".lock")  # never opened
    with pytest.raises(ed.ExportDirError, match="cannot be read"):
        ed.acquire_lock(root, "run_e")


def test_root_check_names_each_conflict(tmp_path):
    root = str(tmp_path / "hf")
    (tmp_path / "hf").write_text("a file")
    with pytest.raises(ed.ExportDirError, match="is not a directory"):
        ed.check_root(root, ())
    os.remove(root)
    _export(root, 4, run_id="earlier")
    ed.check_root(root, {2, 6})
    with pytest.raises(ed.ExportDirError, match=r"step_4 already exists \(written by run earlier\) and this run would"):
        ed.check_root(root, {2, 4})
    os.makedirs(os.path.join(root, "latest"))
    with pytest.raises(ed.ExportDirError, match="latest: expected the text file"):
        ed.check_root(root, ())
