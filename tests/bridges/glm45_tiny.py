"""A tiny random GLM-4.5 checkpoint for tests: transformers' `save_pretrained` output plus the MTP layer
tensors the way GLM-4.5 stores them (layer index num_hidden_layers + i), per-expert or fused experts."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

LAYERS = 4  # 2 dense + 2 MoE
MTP = 1


def tiny_config(**overrides):
    from transformers import Glm4MoeConfig

    kwargs = dict(
        vocab_size=101,  # odd: TP2 pads it to 102
        hidden_size=48,
        intermediate_size=80,
        moe_intermediate_size=24,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=2,
        attention_bias=True,
        use_qk_norm=True,
        num_nextn_predict_layers=MTP,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return Glm4MoeConfig(**kwargs)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or "rotary" in name:
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            elif "e_score_correction_bias" in name:
                tensor.copy_(0.05 * noise)
            else:
                tensor.copy_(0.08 * noise)


def make_checkpoint(directory: str, fused: bool = False, seed: int = 0, **overrides) -> dict:
    """Write the checkpoint into `directory`; return its config dict."""
    from transformers import Glm4MoeForCausalLM

    config = tiny_config(**overrides)
    model = lambda layers: Glm4MoeForCausalLM(tiny_config(**{**overrides, "num_hidden_layers": layers}))  # noqa: E731
    return save_with_mtp(directory, model, config.num_hidden_layers, config.hidden_size, config.n_routed_experts,
                         fused, seed)


def save_with_mtp(directory: str, model, layers: int, hidden: int, experts: int, fused: bool, seed: int) -> dict:
    """`save_pretrained` of `model(layers + MTP)` (random weights), its last MTP layers turned into the MTP block
    the way GLM-4.5 and DeepSeek-V3 checkpoints store it: the decoder layer plus random `enorm`, `hnorm`, `eh_proj`,
    `shared_head.norm` and copies of the embedding and head; the config says `layers`. Returns the config dict."""
    # A model MTP layers deeper provides a full decoder layer for each MTP block (layer `layers` + i).
    deeper = model(layers + MTP)
    _randomise(deeper, seed)
    deeper.save_pretrained(directory)
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(MTP):
        p = f"model.layers.{layers + i}."
        tensors[p + "enorm.weight"] = 1.0 + 0.1 * torch.randn(hidden, generator=gen)
        tensors[p + "hnorm.weight"] = 1.0 + 0.1 * torch.randn(hidden, generator=gen)
        tensors[p + "eh_proj.weight"] = 0.08 * torch.randn(hidden, 2 * hidden, generator=gen)
        tensors[p + "shared_head.norm.weight"] = 1.0 + 0.1 * torch.randn(hidden, generator=gen)
        tensors[p + "shared_head.head.weight"] = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]).clone()
        tensors[p + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    if fused:
        tensors = fuse_experts(tensors, experts)
    os.remove(os.path.join(directory, "model.safetensors"))
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config_dict = json.load(open(os.path.join(directory, "config.json")))
    config_dict["num_hidden_layers"] = layers
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2)
    return config_dict


def fuse_experts(tensors: dict, experts: int) -> dict:
    """Per-expert -> transformers' in-memory layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    out = {}
    prefixes = sorted({k.split("mlp.experts.")[0] for k in tensors if ".mlp.experts.0.gate_proj" in k})
    for k, v in tensors.items():
        if ".mlp.experts." not in k:
            out[k] = v
    for p in prefixes:
        e = f"{p}mlp.experts."
        out[e + "gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{e}{i}.gate_proj.weight"], tensors[f"{e}{i}.up_proj.weight"]]) for i in range(experts)]
        )
        out[e + "down_proj"] = torch.stack([tensors[f"{e}{i}.down_proj.weight"] for i in range(experts)])
    return out
