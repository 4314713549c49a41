"""`python train.py recipe=gpt_oss` trains the tiny GPT-OSS under EP=2 with falling loss and its periodic HF
exports load in transformers; a run imported from an MXFP4 checkpoint exports the dequantized layout (no
`quantization_config`) whose transformers logits equal the Megatron model's."""

import csv
import glob
import json

import torch

from tests.bridges.gpt_oss_tiny import make_checkpoint, write_mxfp4
from tests.callbacks.test_hf_callbacks import PROBE_IDS, _fit
from tests.launcher import run_distributed
from tests.recipes.test_train_cli import train


def test_recipe_trains_and_its_exports_load_in_transformers(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    done = train(tmp_path, "recipe=gpt_oss", "trainer.max_steps=4", "hf_export.every_n_train_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    rows = list(csv.DictReader(open(glob.glob(str(run / "logs" / "**" / "metrics.csv"), recursive=True)[0])))
    losses = [float(r["train/lm_loss"]) for r in rows if r.get("train/lm_loss")]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses
    assert "train/mtp_loss" not in json.load(open(run / "metrics.json"))  # the family has no MTP

    hf = run / "hf"
    assert (hf / "latest").read_text().strip() == "step_4" and (hf / "step_2").is_dir()
    model, info = AutoModelForCausalLM.from_pretrained(str(hf / "step_4"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
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
