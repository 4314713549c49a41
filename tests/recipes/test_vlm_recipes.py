"""`python train.py recipe=qwen3_vl_moe` / `recipe=glm45v` as a user runs them: the bundled tiny models train on
image + text samples under EP2 and export every step; the exports load in transformers with no missing or
unexpected keys, and the vision tower's weights change from export to export (images reach the loss)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.train_runs import train

MODEL_CLASSES = {"qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration", "glm45v": "Glm4vMoeForConditionalGeneration"}


@pytest.mark.parametrize("recipe", sorted(MODEL_CLASSES))
def test_recipe_trains_on_images_and_exports_every_step(tmp_path, recipe):
    import transformers

    done = train(tmp_path, f"recipe={recipe}", "trainer.max_steps=2", "hf_export.every_n_train_steps=1",
                 "trainer.val_check_interval=2", "data.seq_length=32")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["global_step"] == 2 and "val/lm_loss" in metrics
    exports = tmp_path / "run" / "hf"
    assert sorted(os.listdir(exports)) == ["latest", "step_1", "step_2"]
    step1, step2 = (load_file(str(exports / f"step_{n}" / "model.safetensors")) for n in (1, 2))
    vision = [name for name in step1 if name.startswith("model.visual.")]
    assert vision and any(not torch.equal(step1[n], step2[n]) for n in vision), "the vision tower was not trained"
    model, info = getattr(transformers, MODEL_CLASSES[recipe]).from_pretrained(
        str(exports / "step_2"), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
