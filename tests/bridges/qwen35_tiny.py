"""Tiny random Qwen3.5-MoE checkpoints for tests: transformers' `save_pretrained` output (experts per expert)
plus the `mtp.*` tensors released checkpoints carry (transformers does not model them), optionally with fused
experts; and model inputs with and without images."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from tests.bridges.glm45_tiny import _randomise, fuse_experts

# The vocabulary, image token ids, patch sizes and model inputs of the other vision-language tiny models.
from tests.bridges.vlm_tiny import END, IMAGE, MERGE, PATCH, START, TEMPORAL, VIDEO, VOCAB, inputs

EXPERTS = 4

# two Gated DeltaNet layers, then gated attention, twice: both layer kinds on each of two pipeline stages
TEXT = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, num_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=256,
            layer_types=["linear_attention", "full_attention"] * 2, router_aux_loss_coef=0.001,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                             "mrope_section": [2, 1, 1], "mrope_interleaved": True})
VISION = dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
              temporal_patch_size=TEMPORAL, out_hidden_size=48, num_position_embeddings=16)


def hf_config(mtp: int = 1, **text_overrides):
    import transformers

    text = {**TEXT, **text_overrides}
    if mtp:
        text.update(mtp_num_hidden_layers=mtp, mtp_use_dedicated_embeddings=False)
    return transformers.Qwen3_5MoeConfig(
        text_config=text, vision_config=dict(VISION, deepstack_visual_indexes=[]), image_token_id=IMAGE,
        video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def make_checkpoint(directory: str, expert_layout: str = "per_expert", mtp: int = 1, seed: int = 0,
                    **text_overrides) -> dict:
    """A random checkpoint (experts in `expert_layout`: per_expert, fused [E, out, in] or fused_in_out [E, in, out])
    with `mtp` MTP layers; returns its config dict."""
    import transformers

    config = hf_config(mtp, **text_overrides)
    model = transformers.Qwen3_5MoeForConditionalGeneration(config)
    _randomise(model, seed)
    model.save_pretrained(directory)
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    if mtp:
        tensors.update(_mtp_tensors(config, seed + 1))
    if expert_layout != "per_expert":
        tensors = fuse_experts(tensors, EXPERTS)
        if expert_layout == "fused_in_out":
            tensors = {k: v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj"))
                       else v for k, v in tensors.items()}
    os.remove(path)
    save_file(tensors, path, metadata={"format": "pt"})
    return json.load(open(os.path.join(directory, "config.json")))


def make_text_checkpoint(directory: str, mtp: int = 1, seed: int = 0) -> dict:
    """A random `qwen3_5_moe_text` checkpoint (transformers' Qwen3_5MoeForCausalLM) with `mtp` MTP layers."""
    import transformers

    config = hf_config(mtp)
    model = transformers.Qwen3_5MoeForCausalLM(config.text_config)
    _randomise(model, seed)
    model.save_pretrained(directory)
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    if mtp:
        tensors.update(_mtp_tensors(config, seed + 1))
    os.remove(path)
    save_file(tensors, path, metadata={"format": "pt"})
    return json.load(open(os.path.join(directory, "config.json")))


def _mtp_tensors(config, seed: int) -> dict[str, torch.Tensor]:
    """Random `mtp.*` tensors: the norms, fc, and a full-attention MoE layer (taken from a random text model)."""
    import transformers

    text = config.text_config
    layer_config = transformers.Qwen3_5MoeTextConfig(**{**text.to_dict(), "num_hidden_layers": 1,
                                                        "layer_types": ["full_attention"]})
    layer = transformers.Qwen3_5MoeTextModel(layer_config)
    _randomise(layer, seed)
    h = text.hidden_size
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in layer.state_dict().items():
        if not k.startswith("layers.0."):
            continue
        if k.endswith("mlp.experts.gate_up_proj"):  # transformers keeps experts fused in memory [E, 2I, H]
            for e, (gate, up) in enumerate(v.chunk(2, dim=1) and zip(*v.chunk(2, dim=1))):
                out[f"mtp.{k[:-len('gate_up_proj')]}{e}.gate_proj.weight"] = gate.clone()
                out[f"mtp.{k[:-len('gate_up_proj')]}{e}.up_proj.weight"] = up.clone()
        elif k.endswith("mlp.experts.down_proj"):  # [E, H, I]
            for e, down in enumerate(v):
                out[f"mtp.{k[:-len('down_proj')]}{e}.down_proj.weight"] = down.clone()
        else:
            out[f"mtp.{k}"] = v.clone()
    out.update({
        "mtp.fc.weight": 0.08 * torch.randn(h, 2 * h, generator=gen),
        "mtp.pre_fc_norm_embedding.weight": 0.1 * torch.randn(h, generator=gen),
        "mtp.pre_fc_norm_hidden.weight": 0.1 * torch.randn(h, generator=gen),
        "mtp.norm.weight": 0.1 * torch.randn(h, generator=gen),
    })
    return out


def transformers_logits(directory: str, images: bool) -> torch.Tensor:
    """Reference logits of the checkpoint in `directory` (fp32), text-only or with the images."""
    import transformers

    model = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    x = inputs()
    kwargs = {"input_ids": x["input_ids"]}
    if images:
        kwargs.update(pixel_values=x["pixel_values"], image_grid_thw=x["image_grid_thw"],
                      mm_token_type_ids=(x["input_ids"] == IMAGE).int())
    with torch.no_grad():
        return model(**kwargs).logits
