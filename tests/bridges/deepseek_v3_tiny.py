"""Tiny random DeepSeek-V3 checkpoints for tests: transformers' `save_pretrained` output plus the MTP layer
tensors the way DeepSeek-V3 stores them (layer index num_hidden_layers + i, named as GLM-4.5's).

MAIN: query rank, plain RoPE, one expert group; VARIANT: no query rank (`q_proj`), YaRN with both mscales,
grouped top-k (4 groups, top-2 groups, 4 experts), two shared experts, tied embeddings."""

from __future__ import annotations

from tests.bridges.glm45_tiny import MTP, save_with_mtp

LAYERS = 3  # 1 dense + 2 MoE

MAIN = dict(
    vocab_size=101,  # odd: TP2 pads it to 102
    hidden_size=48,
    intermediate_size=80,
    moe_intermediate_size=24,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=4,  # transformers' MLA expands keys to every head: its default (128) would not run
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.5,
    max_position_embeddings=64,
    num_nextn_predict_layers=MTP,  # one MTP layer, at index LAYERS
)
VARIANT = dict(
    MAIN,
    q_lora_rank=None,
    n_shared_experts=2,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0, "original_max_position_embeddings": 8,
                     "mscale": 0.707, "mscale_all_dim": 0.5, "beta_fast": 32.0, "beta_slow": 1.0},
)


def make_checkpoint(directory: str, fused: bool = False, seed: int = 0, **fields) -> dict:
    """Write the checkpoint of `fields` (MAIN when none) into `directory`; return its config dict."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    f = fields or MAIN
    model = lambda layers: DeepseekV3ForCausalLM(DeepseekV3Config(**{**f, "num_hidden_layers": layers}))  # noqa: E731
    return save_with_mtp(directory, model, f["num_hidden_layers"], f["hidden_size"], f["n_routed_experts"], fused, seed)
