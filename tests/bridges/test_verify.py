"""`bridges.verify` runs as a module with one process and under torchrun, and prints its report
(the torchrun case also covers tied embeddings split over pipeline stages)."""

import os
import subprocess
import sys

import pytest
import torch

from bridges.verify import _coverage_problems
from tests.bridges.glm45_tiny import make_checkpoint
from tests.launcher import free_port, run_distributed

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
    env = dict(os.environ, PYTHONPATH=ROOT)
    for name in ("MASTER_PORT", "RANK", "WORLD_SIZE"):  # one process picks a free port itself
        env.pop(name, None)
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


MIRRORS = ("model.layers.4.embed_tokens.weight", "model.layers.4.shared_head.head.weight")


def _without_mirrors(path):
    """The checkpoint re-saved as one file without the MTP copies of embedding and head (optional)."""
    import glob

    from safetensors.torch import load_file, save_file

    tensors = {}
    for file in glob.glob(os.path.join(path, "*.safetensors")):
        tensors.update(load_file(file))
        os.remove(file)
    for index in glob.glob(os.path.join(path, "*.index.json")):
        os.remove(index)
    save_file({n: t for n, t in tensors.items() if n not in MIRRORS}, os.path.join(path, "model.safetensors"))


def _verify_cases(no_mirrors, fifo_dir):
    """bridges.verify's main in this process: exit codes and stderr of each case."""
    import contextlib
    import io

    import torch.distributed as dist

    from bridges import verify

    out = {}
    for case, path in (("fifo", fifo_dir), ("no_mirrors", no_mirrors)):
        if not dist.is_initialized():  # main() tears the group down at the end
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        err, stdout = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
            code = verify.main([path])
        out[case] = (code, err.getvalue(), stdout.getvalue())
    return out


def test_refusals_are_one_line_and_optional_mtp_copies_compared_only_when_present(tmp_path):
    no_mirrors = str(tmp_path / "no_mirrors")
    make_checkpoint(no_mirrors)
    _without_mirrors(no_mirrors)
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    (fifo_dir / "config.json").write_text(open(os.path.join(no_mirrors, "config.json")).read())
    os.mkfifo(fifo_dir / "model.safetensors")
    out = run_distributed(1, _verify_cases, no_mirrors, str(fifo_dir), timeout=300)[0]
    code, err, _ = out["fifo"]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "not a regular file (a FIFO)" in errors[0], err
    assert "Traceback" not in err
    code, err, stdout = out["no_mirrors"]
    assert code == 0 and "verify: OK" in stdout, stdout + err
    assert "0 not bit-identical, 0 not covered once" in stdout
