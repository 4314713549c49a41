"""Export directory protocol: atomic publish that never overwrites, `latest`, pruning that keeps what matters."""

import os

import pytest

from bridges import export_dir as ed


def _export(root, step, publish=True):
    final = os.path.join(root, ed.export_name(step))
    staging = ed.staging_dir(final)
    os.makedirs(staging)
    with open(os.path.join(staging, "model.safetensors.index.json"), "w") as f:
        f.write("{}")
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
        _export(root, step)
    _export(root, 30, publish=False)  # being written
    os.makedirs(tmp_path / "step_3")  # incomplete, not ours to judge
    (tmp_path / "notes").mkdir()
    ed.update_latest(root, "step_2")
    assert ed.complete_exports(root) == ["step_1", "step_2", "step_10", "step_20"]
    assert ed.prune(root, keep_last_k=1) == ["step_1", "step_10"]
    assert sorted(os.listdir(root)) == [".step_30.staging", "latest", "notes", "step_2", "step_20", "step_3"]
    with pytest.raises(ValueError, match="at least 1"):
        ed.prune(root, keep_last_k=0)
    assert ed.clean_stale_staging(root) == [".step_30.staging"]
    assert ed.complete_exports(root) == ["step_2", "step_20"]
