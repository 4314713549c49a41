"""`python train.py recipe=qwen35_moe` as a user runs it: the tiny Qwen3.5-MoE (Gated DeltaNet and gated-attention
layers, MTP on, vision tower) trains on image + text samples under EP=2 with falling loss; its HF exports carry the
MTP tensors, load in transformers with no missing or unexpected keys, and re-import (`bridges.verify`: bit-exact
round trip, logits vs transformers)."""

import json
import os
import subprocess
import sys

import torch

from tests.launcher import free_port
from tests.train_runs import ROOT, logged_losses, train


def test_recipe_trains_with_mtp_and_its_exports_reimport(tmp_path):
    import transformers

    done = train(tmp_path, "recipe=qwen35_moe", "trainer.max_steps=4", "hf_export.every_n_train_steps=2",
                 "trainer.val_check_interval=4")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    losses = logged_losses(run)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses
    metrics = json.load(open(run / "metrics.json"))
    assert metrics["global_step"] == 4 and "train/mtp_loss" in metrics and "val/lm_loss" in metrics
    hf = run / "hf"
    assert sorted(os.listdir(hf)) == ["latest", "step_2", "step_4"]
    step_4 = hf / "step_4"
    config = json.load(open(step_4 / "config.json"))
    index = json.load(open(step_4 / "model.safetensors.index.json"))["weight_map"]
    assert config["text_config"]["mtp_num_hidden_layers"] == 1 and "mtp.fc.weight" in index
    model, info = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(
        str(step_4), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONPATH=ROOT)
    verify = subprocess.run([sys.executable, "-m", "bridges.verify", str(step_4), "--atol", "1e-4"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=env)
    assert verify.returncode == 0 and "0 not bit-identical" in verify.stdout, verify.stdout[-3000:] + verify.stderr[-2000:]
