"""`python train.py recipe=mixtral` as a user runs it: trains the tiny Mixtral under EP=2 with falling loss, and its
periodic HF exports load in transformers (per-expert `block_sparse_moe.experts.{e}.w1/w3/w2`)."""

import torch

from tests.train_runs import check_recipe_exports


def test_recipe_trains_and_its_exports_load_in_transformers(tmp_path):
    from safetensors.torch import load_file

    hf, model = check_recipe_exports(tmp_path, "mixtral")
    assert model.config.model_type == "mixtral" and model.config.num_local_experts == 8
    with torch.no_grad():
        logits = model(torch.arange(12).reshape(2, 6)).logits
    assert logits.shape == (2, 6, 256) and torch.isfinite(logits).all()
    # the experts and the router moved between the exports
    step_2, step_4 = (load_file(str(hf / s / "model.safetensors")) for s in ("step_2", "step_4"))
    for name in ("model.layers.3.block_sparse_moe.experts.7.w2.weight", "model.layers.0.block_sparse_moe.gate.weight"):
        assert not torch.equal(step_2[name], step_4[name]), f"{name} did not train"
