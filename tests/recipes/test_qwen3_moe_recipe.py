"""`python train.py recipe=qwen3_moe` as a user runs it: trains the tiny Qwen3-MoE under EP=2 with falling
loss, and its periodic HF exports load in transformers."""

import torch

from tests.train_runs import check_recipe_exports


def test_recipe_trains_and_its_exports_load_in_transformers(tmp_path):
    from safetensors.torch import load_file

    hf, model = check_recipe_exports(tmp_path, "qwen3_moe")
    assert model.config.model_type == "qwen3_moe" and model.config.mlp_only_layers == [0]
    with torch.no_grad():
        logits = model(torch.arange(12).reshape(2, 6)).logits
    assert logits.shape == (2, 6, 256) and torch.isfinite(logits).all()
    # the weights moved between the exports
    step_2, step_4 = (load_file(str(hf / s / "model.safetensors")) for s in ("step_2", "step_4"))
    assert not torch.equal(step_2["model.layers.1.mlp.experts.7.down_proj.weight"],
                           step_4["model.layers.1.mlp.experts.7.down_proj.weight"])
