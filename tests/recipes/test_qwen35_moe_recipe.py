"""`python train.py recipe=qwen35_moe` as a user runs it: the tiny Qwen3.5-MoE (Gated DeltaNet and gated-attention
layers, MTP on, vision tower) trains on image + text samples under EP=2 with falling loss; its HF exports carry the
MTP tensors and load in transformers with no missing or unexpected keys; an export re-imports into a run with MTP
off, whose export carries the MTP tensors through unchanged (`hf_export.mtp_passthrough`), and `qwen35_moe_eval`
validates it."""

import json
import os

import torch
from safetensors.torch import load_file

from tests.train_runs import logged_losses, train


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
    # re-import the export with MTP off: the next export carries its MTP tensors through unchanged
    done = train(tmp_path / "again", "recipe=qwen35_moe", f"hf_import.path={step_4}",
                 "hf_import.restore_progress=false", "mtp.enabled=false", "hf_export.mtp_passthrough=true",
                 "trainer.max_steps=1", "hf_export.every_n_train_steps=1", "trainer.val_check_interval=1",
                 "trainer.limit_val_batches=1")
    assert done.returncode == 0, done.stderr[-3000:]
    again = tmp_path / "again" / "run" / "hf" / "step_1"
    assert json.load(open(again / "config.json"))["text_config"]["mtp_num_hidden_layers"] == 1
    before, after = (load_file(str(d / "model.safetensors")) for d in (step_4, again))
    mtp = sorted(n for n in before if n.startswith("mtp."))
    assert mtp and sorted(n for n in after if n.startswith("mtp.")) == mtp
    assert all(torch.equal(before[n], after[n]) for n in mtp)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])  # trained on without MTP
    # the eval recipe validates an export, MTP off
    done = train(tmp_path / "eval", "recipe=qwen35_moe_eval", f"hf_import.path={step_4}", "trainer.limit_val_batches=1")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.load(open(tmp_path / "eval" / "run" / "metrics.json"))
    assert "val/lm_loss" in metrics and "train/mtp_loss" not in metrics
