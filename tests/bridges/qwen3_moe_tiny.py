"""Tiny random Qwen3-MoE checkpoints for tests, written by transformers' own `save_pretrained`
(per-expert tensors), with weights large enough that every block moves the logits."""

from __future__ import annotations

import torch

# 4 layers, 8 experts, renormalised top-2, layer 1 dense (mlp_only_layers); vocab 101 is odd: TP2 pads it.
MAIN = dict(
    vocab_size=101, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
    norm_topk_prob=True, mlp_only_layers=[1], max_position_embeddings=64, rope_theta=1e6,
)
# Plain top-3 probabilities, 6 experts, MoE on every second layer, tied embeddings.
VARIANT = dict(MAIN, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[],
               decoder_sparse_step=2, tie_word_embeddings=True)


def make_checkpoint(directory: str, seed: int = 0, **fields) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**fields))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.08 * noise)
    model.save_pretrained(directory)
