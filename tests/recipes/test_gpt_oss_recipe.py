"""`python train.py recipe=gpt_oss` trains the tiny GPT-OSS under EP=2 with falling loss and its periodic HF
exports load in transformers; a run imported from an MXFP4 checkpoint exports the dequantized layout (no
`quantization_config`) whose transformers logits equal the Megatron model's."""

import json

import torch

from tests.bridges.gpt_oss_tiny import make_checkpoint, write_mxfp4
from tests.callbacks.test_hf_callbacks import PROBE_IDS, _fit
from tests.launcher import run_distributed
from tests.train_runs import check_recipe_exports


def test_recipe_trains_and_its_exports_load_in_transformers(tmp_path):
    from safetensors.torch import load_file

    hf, model = check_recipe_exports(tmp_path, "gpt_oss")
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.sliding_window == 16
    with torch.no_grad():
        logits = model(torch.arange(12).reshape(2, 6)).logits
    assert logits.shape == (2, 6, 256) and torch.isfinite(logits).all()
    step_2, step_4 = (load_file(str(hf / s / "model.safetensors")) for s in ("step_2", "step_4"))
    for name in ("model.layers.3.mlp.experts.gate_up_proj", "model.layers.0.self_attn.sinks"):
        assert not torch.equal(step_2[name], step_4[name]), f"{name} did not train"


def test_mxfp4_import_exports_dequantized_checkpoints_with_the_megatron_logits(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    plain, quantized = str(tmp_path / "fp32"), str(tmp_path / "mxfp4")
    make_checkpoint(plain, seed=5)
    write_mxfp4(plain, quantized)
    # One process, EP1: trains the experts' biases where Megatron-Core needed help (see bridges/megatron/build.py).
    results = run_distributed(1, _fit, quantized, str(tmp_path / "run"), 1, 1, 2, 2, 3e-3, quantized, None, (2,), False)
    export = tmp_path / "run" / "step_2"
    config = json.load(open(export / "config.json"))
    assert "quantization_config" not in config and config["model_type"] == "gpt_oss"
    tensors = load_file(str(export / "model.safetensors"))
    assert set(tensors) == set(load_file(f"{plain}/model.safetensors"))  # gate_up_proj / down_proj, no blocks
    model, info = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        logits = model.eval()(PROBE_IDS).logits
    assert (logits - results[0]["logits"][2]).abs().max().item() <= 1e-5
