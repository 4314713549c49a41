"""The TFLOP/s metric's FLOPs per training token against a count made from transformers' own models: 6 x the
matmul weights a token passes through (routed experts: top-k of E), plus causal attention scores."""

import os

import pytest
import torch

from bridges.checkpoint import hf_config
from bridges.models import family_for
from recipes.flops import training_flops_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 64


def _counted(name: str) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(os.path.join(ROOT, "conf/model", name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_local_experts", None) or config.num_experts
    weights = 0.0
    for param_name, p in model.named_parameters():
        if p.dim() < 2 or "bias" in param_name or "embed_tokens" in param_name:
            continue  # norms, biases, sinks: no matmul; the embedding is a lookup
        weights += p.numel() * (config.num_experts_per_tok / experts if ".experts." in param_name else 1)
    if getattr(config, "kv_lora_rank", None):  # multi-latent attention: QK^T over nope + rope dims, AV over v dims
        head_dims = (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) / 2
    else:
        head_dims = config.head_dim
    scores = 2 * SEQ * config.num_attention_heads * head_dims * config.num_hidden_layers  # QK^T and AV, causal
    return 3 * (2 * weights + scores)


@pytest.mark.parametrize("name", ["glm45_tiny", "gpt_oss_tiny", "qwen3_moe_tiny", "deepseek_v3_tiny"])
def test_flops_per_token_match_the_transformers_model(name):
    config = hf_config.load_config(os.path.join(ROOT, "conf/model", name))
    arch = family_for(config).architecture(config).without_mtp()  # transformers builds no MTP layer
    assert training_flops_per_token(arch, SEQ) == pytest.approx(_counted(name), rel=1e-9)


@pytest.mark.parametrize("name", ["qwen35_moe_tiny", "qwen3_vl_moe_tiny"])
def test_no_flops_where_the_formula_does_not_describe_the_model(name):
    config = hf_config.load_config(os.path.join(ROOT, "conf/model", name))
    assert training_flops_per_token(family_for(config).architecture(config), SEQ) is None
