"""`python train.py recipe=deepseek_v3` as a user runs it: trains the tiny DeepSeek-V3 (multi-latent attention,
grouped sigmoid router, MTP) under EP=2 with falling loss, and its periodic HF exports load in transformers."""

import json

import torch

from tests.train_runs import logged_losses, train


def test_recipe_trains_with_mtp_and_its_exports_load_in_transformers(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    done = train(tmp_path, "recipe=deepseek_v3", "trainer.max_steps=4", "hf_export.every_n_train_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    losses = logged_losses(run)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses
    assert "train/mtp_loss" in json.load(open(run / "metrics.json"))
    hf = run / "hf"
    assert (hf / "latest").read_text().strip() == "step_4"
    model, info = AutoModelForCausalLM.from_pretrained(str(hf / "step_4"), output_loading_info=True)
    # transformers builds no MTP layer: the exported one (layer 4) is all it leaves unread
    assert not info["missing_keys"] and info["unexpected_keys"], info
    assert all(k.startswith("model.layers.4.") for k in info["unexpected_keys"]), info["unexpected_keys"]
    assert model.config.model_type == "deepseek_v3" and model.config.num_nextn_predict_layers == 1
    assert (model.config.n_group, model.config.topk_group, model.config.q_lora_rank) == (2, 1, 32)
    with torch.no_grad():
        logits = model(torch.arange(12).reshape(2, 6)).logits
    assert logits.shape == (2, 6, 256) and torch.isfinite(logits).all()
    # the latent projections, the experts and the router's bias (updated by load, not by gradient) moved
    step_2, step_4 = (load_file(str(hf / s / "model.safetensors")) for s in ("step_2", "step_4"))
    for name in ("model.layers.1.self_attn.kv_b_proj.weight", "model.layers.2.self_attn.q_a_layernorm.weight",
                 "model.layers.3.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                 "model.layers.4.eh_proj.weight"):
        assert not torch.equal(step_2[name], step_4[name]), f"{name} did not train"
