"""Tiny random Mixtral checkpoints for tests, written by transformers' own `save_pretrained` (per-expert
`block_sparse_moe.experts.{e}.w1/w3/w2`), with weights large enough that every block moves the logits."""

from __future__ import annotations

from tests.bridges.glm45_tiny import _randomise

# 4 layers, 8 experts, top-2; vocab 101 is odd: TP2 pads it.
MAIN = dict(
    vocab_size=101, hidden_size=48, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
)
# Top-3 of 6 experts, tied embeddings, head_dim from hidden / heads, rope_theta 1e4 (not the family default).
VARIANT = dict(MAIN, num_local_experts=6, num_experts_per_tok=3, tie_word_embeddings=True, head_dim=None,
               rope_theta=1e4)


def make_checkpoint(directory: str, seed: int = 0, **fields) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    model = MixtralForCausalLM(MixtralConfig(**fields))
    _randomise(model, seed)
    model.save_pretrained(directory)
