"""A tiny random GPT-OSS checkpoint for tests (transformers' `save_pretrained` output), and a test-side MXFP4
quantizer that writes the same model with its experts as `*_blocks` / `*_scales`.

The expert weights are drawn as E2M1 values times a power of two per block of 32 inputs, so MXFP4 holds
them exactly and the quantized checkpoint dequantizes to the very same numbers.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # [E, in, out], quantized in blocks of 32 along `in`


def tiny_config(**overrides):
    from transformers import GptOssConfig

    kwargs = dict(
        vocab_size=101,  # odd: TP2 pads it to 102
        hidden_size=64,
        intermediate_size=32,  # != hidden_size, so orientation errors cannot hide; both multiples of 32 (MXFP4)
        num_hidden_layers=4,  # sliding, full, sliding, full; PP2 divides
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=6,
        num_experts_per_tok=2,
        sliding_window=5,  # shorter than the test sequences
        max_position_embeddings=64,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16},
        swiglu_alpha=1.5,  # not the default 1.702: the config value must reach Megatron
        swiglu_limit=0.6,  # small enough that the clamp acts on these random weights
    )
    kwargs.update(overrides)
    return GptOssConfig(**kwargs)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            elif name.endswith("sinks"):
                tensor.copy_(0.5 * noise)
            elif name.endswith(EXPERT_WEIGHTS):
                tensor.copy_(_mxfp4_exact(tensor.shape, gen))
            else:
                tensor.copy_(0.08 * noise)


def _mxfp4_exact(shape, gen) -> torch.Tensor:
    """[E, in, out] values that MXFP4 holds exactly: E2M1 codes (no -0) times 2^-5 or 2^-6 per block."""
    experts, cols, rows = shape
    codes = torch.randint(0, 15, (experts, rows, cols), generator=gen)
    codes = codes + (codes >= 8).long()  # skip code 8 (-0.0): its bytes differ from +0.0
    exponents = torch.randint(-6, -4, (experts, rows, cols // 32, 1), generator=gen).float()
    values = FP4[codes].reshape(experts, rows, cols // 32, 32) * torch.exp2(exponents)
    return values.reshape(experts, rows, cols).transpose(1, 2).contiguous()


def make_checkpoint(directory: str, seed: int = 0, **overrides) -> dict:
    """Write the checkpoint into `directory`; return its config dict."""
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM(tiny_config(**overrides))
    _randomise(model, seed)
    model.save_pretrained(directory)
    return json.load(open(os.path.join(directory, "config.json")))


def quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, in, out] -> transformers' MXFP4 blocks [E, out, in/32, 16] and scales [E, out, in/32] (uint8),
    exactly; refuses values MXFP4 cannot hold."""
    experts, cols, rows = tensor.shape
    blocks = tensor.transpose(1, 2).reshape(experts, rows, cols // 32, 32).float()
    peak = blocks.abs().amax(dim=-1)
    exponent = torch.where(peak > 0, torch.ceil(torch.log2(peak / 6.0)), torch.zeros_like(peak))
    scaled = blocks / torch.exp2(exponent).unsqueeze(-1)
    codes = (scaled.abs().unsqueeze(-1) == FP4[:8]).float().argmax(-1) + 8 * (scaled < 0).long()
    if not torch.equal(FP4[codes] * torch.exp2(exponent).unsqueeze(-1), blocks):
        raise ValueError("values not exactly representable in MXFP4")
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)  # even element in the low nibble
    return packed, (exponent + 127).to(torch.uint8)


def write_mxfp4(source: str, directory: str) -> None:
    """`source`'s checkpoint with every expert weight as MXFP4 blocks / scales, and an MXFP4 config."""
    tensors = load_file(os.path.join(source, "model.safetensors"))
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(tuple(".mlp.experts." + w for w in EXPERT_WEIGHTS)):
            out[name + "_blocks"], out[name + "_scales"] = quantize(tensor)
        else:
            out[name] = tensor
    os.makedirs(directory, exist_ok=True)
    save_file(out, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(source, "config.json")))
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
