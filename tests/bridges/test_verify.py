"""`bridges.verify` runs as a module with one process and under torchrun, and prints its report
(the torchrun case also covers tied embeddings split over pipeline stages)."""

import os
import subprocess
import sys

import pytest
import torch

from bridges.verify import _coverage_problems
from tests.bridges.glm45_tiny import make_checkpoint
from tests.launcher import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("glm45") / "ckpt")
    make_checkpoint(path, fused=True)
    return path


@pytest.fixture(scope="module")
def tied_directory(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("glm45") / "tied")
    make_checkpoint(path, tie_word_embeddings=True)
    return path


def _run(args):
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_world_1(directory):
    out = _run(["-m", "bridges.verify", directory])
    assert "0 not bit-identical, 0 not covered once" in out and "verify: OK" in out
    assert "logits vs transformers: max abs diff" in out


def test_world_2_torchrun_tied_embeddings(tied_directory):
    out = _run(["-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={free_port()}",
                "-m", "bridges.verify", tied_directory, "--pp", "2"])
    assert "layout: tp=1 pp=2 ep=1" in out and "verify: OK" in out


def test_coverage_problems_name_gaps_overlaps_and_strangers():
    expected = {"a": (4,), "b": (2,)}
    specs = [("a", (slice(0, 3, 1),)), ("a", (slice(2, 4, 1),)), ("c", (slice(0, 1, 1),))]
    assert _coverage_problems(specs, expected) == ["a", "b", "c (not in the source)"]
