"""Tiny random vision-language MoE checkpoints for tests: Qwen3-VL-MoE and GLM-4.5V as transformers'
`save_pretrained` writes them, and re-laid-out the other way each family is found on the hub
(Qwen3-VL-MoE: released `[E, in, out]` experts; GLM-4.5V: fused `[E, out, in]` experts), plus model inputs
with and without images."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from tests.bridges.glm45_tiny import _randomise, fuse_experts

VOCAB = 126  # even: no padded vocab rows, so TP2 losses equal TP1's (tests/bridges/glm45_tiny.py pads)
IMAGE, VIDEO, START, END = 120, 121, 122, 123
PATCH, TEMPORAL, MERGE = 4, 2, 2
GRID = (1, 4, 4)  # one image: 16 patches, 4 image tokens after the 2 x 2 merge
PIXELS_PER_PATCH = 3 * TEMPORAL * PATCH * PATCH

TEXT = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts_per_tok=2,
            max_position_embeddings=256)
VISION = dict(depth=3, hidden_size=32, intermediate_size=40, num_heads=2, patch_size=PATCH,
              spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, out_hidden_size=48)

# family -> (transformers class, on-disk expert layouts: save_pretrained's first)
FAMILIES = {
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", ("fused", "fused_in_out")),
    "glm4v_moe": ("Glm4vMoeForConditionalGeneration", ("per_expert", "fused")),
}


def hf_config(family: str, **text_overrides):
    import transformers

    if family == "qwen3_vl_moe":
        text = dict(TEXT, num_experts=8, mlp_only_layers=[0], decoder_sparse_step=1, router_aux_loss_coef=0.001,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                     "mrope_interleaved": True})
        vision = dict(VISION, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
        return transformers.Qwen3VLMoeConfig(
            text_config={**text, **text_overrides}, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
            vision_start_token_id=START, vision_end_token_id=END)
    text = dict(TEXT, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "partial_rotary_factor": 0.5})
    return transformers.Glm4vMoeConfig(
        text_config={**text, **text_overrides}, vision_config=dict(VISION, image_size=16), image_token_id=IMAGE,
        video_token_id=VIDEO, image_start_token_id=START, image_end_token_id=END, video_start_token_id=124,
        video_end_token_id=124)


def make_checkpoint(directory: str, family: str, expert_layout: str, seed: int = 0, **text_overrides) -> dict:
    """A random checkpoint of `family` with experts in `expert_layout`; returns its config dict."""
    import transformers

    class_name, layouts = FAMILIES[family]
    model = getattr(transformers, class_name)(hf_config(family, **text_overrides))
    _randomise(model, seed)
    model.save_pretrained(directory)
    path = os.path.join(directory, "model.safetensors")
    config_path = os.path.join(directory, "config.json")
    config = json.load(open(config_path))
    if expert_layout != layouts[0]:
        tensors = load_file(path)
        if family == "qwen3_vl_moe":  # released layout: [E, in, out], and a transformers 4 config
            tensors = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in tensors.items()}
            config["transformers_version"] = "4.57.0"
        else:
            tensors = fuse_experts(tensors, config["text_config"]["n_routed_experts"])
        os.remove(path)
        save_file(tensors, path, metadata={"format": "pt"})
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
    return config


def inputs(seed: int = 7) -> dict[str, torch.Tensor]:
    """Two sequences of 16 tokens, each with one image (start, 4 image tokens, end) at a different place."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, IMAGE, (2, 16), generator=gen)
    for row, at in ((0, 2), (1, 9)):
        ids[row, at : at + 6] = torch.tensor([START, IMAGE, IMAGE, IMAGE, IMAGE, END])
    patches = GRID[0] * GRID[1] * GRID[2]
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(2 * patches, PIXELS_PER_PATCH, generator=gen),
        "image_grid_thw": torch.tensor([GRID, GRID]),
    }


def transformers_logits(directory: str, family: str, images: bool) -> torch.Tensor:
    """Reference logits of the checkpoint in `directory` (fp32), text-only or with the images."""
    import transformers

    model = getattr(transformers, FAMILIES[family][0]).from_pretrained(directory, dtype=torch.float32).eval()
    x = inputs()
    kwargs = {"input_ids": x["input_ids"]}
    if images:
        kwargs.update(pixel_values=x["pixel_values"], image_grid_thw=x["image_grid_thw"],
                      mm_token_type_ids=(x["input_ids"] == IMAGE).int())
    with torch.no_grad():
        return model(**kwargs).logits
