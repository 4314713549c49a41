"""`python train.py recipe=qwen3_moe` as a user runs it: trains the tiny Qwen3-MoE under EP=2 with falling
loss, and its periodic HF exports load in transformers."""

import csv
import glob
import json

import torch

from tests.recipes.test_train_cli import train


def test_recipe_trains_and_its_exports_load_in_transformers(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    done = train(tmp_path, "recipe=qwen3_moe", "trainer.max_steps=4", "hf_export.every_n_train_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    rows = list(csv.DictReader(open(glob.glob(str(run / "logs" / "**" / "metrics.csv"), recursive=True)[0])))
    losses = [float(r["train/lm_loss"]) for r in rows if r.get("train/lm_loss")]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses
    assert "train/mtp_loss" not in json.load(open(run / "metrics.json"))  # the family has no MTP

    hf = run / "hf"
    assert (hf / "latest").read_text().strip() == "step_4" and (hf / "step_2").is_dir()
    assert json.load(open(hf / "step_4" / "trainer_state.json"))["global_step"] == 4
    model, info = AutoModelForCausalLM.from_pretrained(str(hf / "step_4"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.model_type == "qwen3_moe" and model.config.mlp_only_layers == [0]
    with torch.no_grad():
        logits = model(torch.arange(12).reshape(2, 6)).logits
    assert logits.shape == (2, 6, 256) and torch.isfinite(logits).all()
    # the weights moved between the exports
    step_2, step_4 = (load_file(str(hf / s / "model.safetensors")) for s in ("step_2", "step_4"))
    assert not torch.equal(step_2["model.layers.1.mlp.experts.7.down_proj.weight"],
                           step_4["model.layers.1.mlp.experts.7.down_proj.weight"])
