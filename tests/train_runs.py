"""Running `python train.py ...` from tests, as a user does, and reading what the run left behind."""

import csv
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(tmp_path, *overrides, timeout=300):
    """train.py with its outputs under `<tmp_path>/run`."""
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path}/run", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def logged_losses(run_dir) -> list[float]:
    """Every logged train/lm_loss of a run, in step order (from logs/metrics.csv)."""
    (path,) = glob.glob(os.path.join(str(run_dir), "logs", "**", "metrics.csv"), recursive=True)
    return [float(row["train/lm_loss"]) for row in csv.DictReader(open(path)) if row.get("train/lm_loss")]


def check_recipe_exports(tmp_path, recipe: str):
    """Train `recipe` 4 steps with an HF export every 2 (no MTP family); check the loss falls and step_4
    loads in transformers with no missing or unexpected keys. Returns (export root, loaded model)."""
    from transformers import AutoModelForCausalLM

    done = train(tmp_path, f"recipe={recipe}", "trainer.max_steps=4", "hf_export.every_n_train_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    losses = logged_losses(run)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses
    assert "train/mtp_loss" not in json.load(open(run / "metrics.json"))  # the family has no MTP
    hf = run / "hf"
    assert (hf / "latest").read_text().strip() == "step_4" and (hf / "step_2").is_dir()
    assert json.load(open(hf / "step_4" / "trainer_state.json"))["global_step"] == 4
    model, info = AutoModelForCausalLM.from_pretrained(str(hf / "step_4"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf, model
