"""The HF callbacks driven from the command line, as a user runs them."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bridges.export import directory as export_dir
from bridges.export.directory import is_complete
from tests.bridges.glm45_tiny import make_checkpoint

from tests.train_runs import ROOT, train


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("glm45_source"))
    make_checkpoint(d, seed=5)
    return d


@pytest.mark.parametrize("layout", [["parallel.ep=2"], ["parallel.tp=2", "parallel.ep=1"]], ids=["ep2", "tp2"])
def test_eval_recipe_reports_the_transformers_nll(source, tmp_path, layout):
    # vocab 101 is padded to 102 under TP2: the padded logit must not count in the loss
    from transformers import AutoModelForCausalLM

    tokens = np.random.default_rng(1).integers(0, 101, (10, 17))  # 10 rows: padded to whole steps on 2 ranks
    np.save(tmp_path / "tokens.npy", tokens)
    done = train(tmp_path, "recipe=glm45_eval", f"hf_import.path={source}", "data=tokens",
                 f"data.path={tmp_path}/tokens.npy", "data.seq_length=16", "data.global_batch_size=4", *layout)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    val = json.load(open(tmp_path / "run" / "metrics.json"))["val/lm_loss"]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = torch.from_numpy(tokens)
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(val - nll.item()) <= 1e-4, (val, nll.item())


def test_truncated_source_fails_before_training_with_the_file_named(source, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(source):
        data = open(os.path.join(source, name), "rb").read()
        if name.endswith(".safetensors"):
            data = data[: len(data) // 2]
        (broken / name).write_bytes(data)
    done = train(tmp_path, f"hf_import.path={broken}", "trainer.max_steps=2")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and "model.safetensors" in errors[0], done.stderr[-2000:]
    assert not (tmp_path / "run" / "hf" / "step_2").exists()


def test_mismatched_source_is_refused_naming_the_tensor(source, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(source):
        if not name.endswith(".safetensors"):
            (bad / name).write_bytes(open(os.path.join(source, name), "rb").read())
    tensors = load_file(os.path.join(source, "model.safetensors"))
    tensors["model.layers.1.self_attn.o_proj.weight"] = tensors["model.layers.1.self_attn.o_proj.weight"][:, :-1].contiguous()
    save_file(tensors, str(bad / "model.safetensors"))
    done = train(tmp_path, f"hf_import.path={bad}", "trainer.max_steps=2")
    assert done.returncode != 0
    assert "model.layers.1.self_attn.o_proj.weight" in done.stderr
    assert "no parameter was changed" in done.stderr


@pytest.mark.slow
def test_killed_run_never_leaves_a_complete_looking_export(tmp_path):
    # Export every step (synchronously, so exports are in flight most of the time), kill mid-run.
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "train.py", f"hydra.run.dir={run}", "trainer.max_steps=400",
         "hf_export.every_n_train_steps=1", "hf_export.async_write=false", "hf_export.keep_last_k=2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    hf = run / "hf"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (hf.exists() and any(n.startswith("step_") for n in os.listdir(hf))):
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    names = os.listdir(hf)
    finals = [n for n in names if n.startswith("step_")]
    assert finals, names
    for name in finals:
        assert is_complete(hf / name), f"{name} has a final name but is not complete"
        assert (hf / name / "config.json").exists() and (hf / name / "trainer_state.json").exists()
    latest = (hf / "latest").read_text().strip()
    assert latest in finals
    # The killed run's lock stays behind; the next run sees its process is gone and takes the root over.
    assert json.load(open(hf / ".lock"))["pid"] == proc.pid
    assert "stale lock of run " in export_dir.acquire_lock(str(hf), "next")
    export_dir.release_lock(str(hf), "next")
