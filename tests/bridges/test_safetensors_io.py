"""Reading safetensors checkpoints: hostile headers are refused with clear errors, regions read exactly."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridges.checkpoint import safetensors_io
from bridges.checkpoint.safetensors_format import SafetensorsFormatError, read_header
from bridges.checkpoint.safetensors_io import CheckpointError, PickleWeightsRefused, SafetensorsCheckpoint


def _raw_file(path, header, data_len):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
    return str(path)


def _error(path):
    with pytest.raises(SafetensorsFormatError) as info:
        read_header(path)
    return str(info.value)


def test_truncated_files_are_refused(tmp_path):
    path = str(tmp_path / "t.safetensors")
    save_file({"w": torch.ones(4, 4)}, path)
    size = os.path.getsize(path)
    os.truncate(path, size - 4)  # data cut short
    message = _error(path)
    assert path in message and "'w'" in message and "outside the data section" in message
    os.truncate(path, 20)  # header cut short
    assert "runs past the end of the file" in _error(path)
    os.truncate(path, 5)
    assert "too short" in _error(path)


def test_offsets_sizes_overlaps_json_and_dtypes_are_checked(tmp_path):
    def entry(dtype, shape, begin, end):
        return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}

    outside = _raw_file(tmp_path / "a.safetensors", {"w": entry("F32", [2], 8, 16)}, 8)
    assert "'w'" in _error(outside) and "outside the data section of 8 bytes" in _error(outside)
    mismatch = _raw_file(tmp_path / "b.safetensors", {"w": entry("F32", [2, 3], 0, 20)}, 24)
    assert "'w'" in _error(mismatch) and "span 20 bytes" in _error(mismatch) and "needs 24" in _error(mismatch)
    overlap = _raw_file(tmp_path / "c.safetensors", {"x": entry("F32", [6], 0, 24), "y": entry("F32", [6], 16, 40)}, 40)
    assert "'x' and 'y' overlap" in _error(overlap)
    bad_json = _raw_file(tmp_path / "d.safetensors", b'{"w": {"dtype": ', 0)
    assert "not valid UTF-8 JSON" in _error(bad_json) and bad_json in _error(bad_json)
    dtype = _raw_file(tmp_path / "e.safetensors", {"w": entry("F4", [2], 0, 1)}, 1)
    assert "'w'" in _error(dtype) and "unsupported dtype 'F4'" in _error(dtype)
    shape = _raw_file(tmp_path / "f.safetensors", {"w": entry("F32", [-1], 0, 4)}, 4)
    assert "non-negative integers" in _error(shape)


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not even read")
    with pytest.raises(PickleWeightsRefused, match="can execute code"):
        SafetensorsCheckpoint(str(tmp_path))
    os.remove(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no .safetensors weights"):
        SafetensorsCheckpoint(str(tmp_path))


def _sharded(tmp_path):
    gen = torch.Generator().manual_seed(0)
    first = {"a": torch.randn(6, 8, 10, generator=gen), "s": torch.tensor(2.5)}
    second = {
        "b": torch.randn(5, 7, generator=gen).bfloat16(),
        "h": torch.randn(3, 4, generator=gen).half(),
        "u": torch.randint(0, 256, (4, 6), dtype=torch.uint8, generator=gen),
        "m": torch.rand(5, 3, generator=gen) > 0.5,
        "f8": torch.randn(4, 4, generator=gen).to(torch.float8_e4m3fn),
        "e": torch.zeros(0, 3),
    }
    save_file(first, str(tmp_path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(second, str(tmp_path / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in second})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {**first, **second}, weight_map


def _bits(t):
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "copied"])
def test_regions_read_equal_slices_of_load_file(tmp_path, monkeypatch, mapped):
    monkeypatch.setattr(safetensors_io, "MIN_MAPPED_BYTES", 0 if mapped else 1 << 40)
    written, _ = _sharded(tmp_path)
    expected = {}
    for file in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        expected.update(load_file(str(tmp_path / file)))
    assert all(torch.equal(_bits(expected[n]), _bits(t)) for n, t in written.items())
    with SafetensorsCheckpoint(str(tmp_path)) as ckpt:
        assert ckpt.keys() == sorted(expected)
        assert len(ckpt.files()) == 2 and ckpt.file_metadata(ckpt.files()[0]) == {"format": "pt"}
        for name, tensor in expected.items():
            assert ckpt.shape(name) == tuple(tensor.shape) and ckpt.dtype(name) == tensor.dtype
            got = ckpt.read(name)
            assert got.dtype == tensor.dtype and torch.equal(_bits(got), _bits(tensor))
        a = expected["a"]
        for region in [
            (slice(1, 3, 1), slice(0, 8, 1), slice(0, 10, 1)),  # leading rows: one run
            (slice(0, 6, 1), slice(0, 8, 1), slice(3, 7, 1)),  # column block
            (slice(4, 5, 1), slice(2, 8, 3), slice(0, 10, 2)),  # strided
            (slice(0, 6, 2), slice(1, 2, 1), slice(9, 10, 1)),
        ]:
            assert torch.equal(ckpt.read("a", region), a[region]), region
        assert torch.equal(ckpt.read("b", (slice(0, 5, 2), slice(1, 7, 1))), expected["b"][0:5:2, 1:7])
        assert torch.equal(ckpt.read("m", (slice(1, 4, 1), slice(0, 3, 2))), expected["m"][1:4, 0:3:2])


def test_bytes_read_counts_the_region_only(tmp_path):
    _sharded(tmp_path)
    with SafetensorsCheckpoint(str(tmp_path)) as ckpt:
        ckpt.read("a", (slice(2, 4, 1), slice(0, 8, 1), slice(0, 10, 1)))
        assert ckpt.bytes_read == 2 * 8 * 10 * 4
        ckpt.read("a", (slice(0, 6, 1), slice(0, 8, 1), slice(0, 5, 1)))
        assert ckpt.bytes_read == 2 * 8 * 10 * 4 + 6 * 8 * 5 * 4


def test_bad_region_names_tensor_and_file(tmp_path):
    _sharded(tmp_path)
    with SafetensorsCheckpoint(str(tmp_path)) as ckpt:
        with pytest.raises(ValueError, match=r"model-00002-of-00002.safetensors: tensor 'b': dim 1"):
            ckpt.read("b", (slice(0, 5, 1), slice(0, 8, 1)))
        with pytest.raises(KeyError, match="'nope'"):
            ckpt.read("nope")


def test_index_must_agree_with_files(tmp_path):
    _, weight_map = _sharded(tmp_path)
    index = tmp_path / "model.safetensors.index.json"

    def refused(new_map, match):
        index.write_text(json.dumps({"weight_map": new_map}))
        with pytest.raises(CheckpointError, match=match):
            SafetensorsCheckpoint(str(tmp_path))

    refused({**weight_map, "a": "model-00003-of-00003.safetensors"}, "do not exist")
    refused({**weight_map, "a": "../model-00001-of-00002.safetensors"}, "expected a file name")
    refused({**weight_map, "ghost": "model-00001-of-00002.safetensors"}, "'ghost' is listed")
    refused({**weight_map, "a": "model-00002-of-00002.safetensors"}, "'a' is listed in model-00002")
    refused({k: v for k, v in weight_map.items() if k != "s"}, "not in the index, e.g. 's'")
    index.write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SafetensorsCheckpoint(str(tmp_path))


def test_without_index_reads_single_file_or_all_files(tmp_path):
    expected, _ = _sharded(tmp_path)
    os.remove(tmp_path / "model.safetensors.index.json")
    with SafetensorsCheckpoint(str(tmp_path)) as ckpt:
        assert ckpt.keys() == sorted(expected)
    save_file({"only": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with SafetensorsCheckpoint(str(tmp_path)) as ckpt:
        assert ckpt.keys() == ["only"]


def test_mapped_reads_are_private_and_outlive_close(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_io, "MIN_MAPPED_BYTES", 0)
    _sharded(tmp_path)
    file = tmp_path / "model-00001-of-00002.safetensors"
    before = file.read_bytes()
    with SafetensorsCheckpoint(str(tmp_path)) as ckpt:
        whole, rows = ckpt.read("a"), ckpt.read("a", (slice(1, 2, 1), slice(0, 8, 1), slice(0, 10, 1)))
    expected = load_file(str(file))["a"]
    whole.mul_(2)  # copy-on-write: the file and other readers never see it
    assert file.read_bytes() == before
    assert torch.equal(rows, expected[1:2]) and torch.equal(whole, expected * 2)


@pytest.mark.parametrize("layout", ["single", "glob", "index"])
def test_fifo_shard_is_refused_before_opening(tmp_path, layout):
    """A FIFO named like a shard would block the first read forever: refused from its mode alone."""
    names = {"single": "model.safetensors", "glob": "weights.safetensors", "index": "model-00001-of-00001.safetensors"}
    os.mkfifo(tmp_path / names[layout])
    if layout == "index":
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": names[layout]}}))
    with pytest.raises(CheckpointError, match="not a regular file \\(a FIFO\\)"):
        SafetensorsCheckpoint(str(tmp_path))


def test_fifo_index_is_refused(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors.index.json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a regular file"):
        SafetensorsCheckpoint(str(tmp_path))


def test_hub_cache_snapshot_with_symlinked_shards_reads(tmp_path):
    """Hub cache layout: snapshots/<rev>/model.safetensors -> ../../blobs/<hash>."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(blobs / "0123"))
    os.symlink("../../blobs/0123", snap / "model.safetensors")
    with SafetensorsCheckpoint(str(snap)) as ckpt:
        assert torch.equal(ckpt.read("w"), torch.arange(6.0).reshape(2, 3))


def test_deeply_nested_header_is_a_format_error(tmp_path):
    path = _raw_file(tmp_path / "n.safetensors", b"[" * 100_000 + b"]" * 100_000, 0)
    assert "nested too deeply" in _error(path)
