"""Model FLOPs of one training token (forward + backward = 3x the forward matmuls), for the TFLOP/s metric.

Counts the matmuls of softmax-attention decoders (multi-latent attention included) with dense and MoE (routed top-k + shared expert) layers,
causal attention over the whole sequence, the output layer and MTP layers. Families whose cost this formula
does not describe (linear attention, a vision tower) get None: no TFLOP/s rather than a wrong one.
"""

from __future__ import annotations


def training_flops_per_token(arch, seq_length: int) -> float | None:
    t = arch.transformer
    if t.get("experimental_attention_variant") or t.get("linear_attention_freq") or "vision" in arch.extra:
        return None
    hidden, layers = t["hidden_size"], t["num_layers"]
    if t.get("multi_latent_attention"):
        attention = _multi_latent_attention(t, seq_length)
    else:
        q_width = t["num_attention_heads"] * t["kv_channels"]
        kv_width = 2 * t["num_query_groups"] * t["kv_channels"]
        attention = 2 * hidden * (q_width + kv_width) + 2 * q_width * hidden + 2 * seq_length * q_width  # causal: half
    matrices = 3 if t.get("gated_linear_unit") else 2  # gate, up, down
    experts = t.get("num_moe_experts") or 0
    freq = t.get("moe_layer_freq")
    moe_layers = [bool(f) for f in freq] if isinstance(freq, (list, tuple)) else \
        [bool(experts) and i % int(freq or 1) == 0 for i in range(layers)]
    dense_mlp = 2 * matrices * hidden * t["ffn_hidden_size"]
    moe_mlp = 0
    if experts:
        moe_mlp = 2 * matrices * hidden * t["moe_ffn_hidden_size"] * t["moe_router_topk"] + 2 * hidden * experts
        moe_mlp += 2 * matrices * hidden * (t.get("moe_shared_expert_intermediate_size") or 0)
    decoder_layer_mean = attention + sum(moe_mlp if m else dense_mlp for m in moe_layers) / layers
    logits = 2 * hidden * arch.vocab_size
    # An MTP layer: the projection of [embedding; hidden] back to hidden, one decoder layer, its own logits.
    mtp = arch.mtp_num_layers * (2 * 2 * hidden * hidden + attention + (moe_mlp or dense_mlp) + logits)
    forward = decoder_layer_mean * layers + logits + mtp
    return 3.0 * forward


def _multi_latent_attention(t: dict, seq_length: int) -> float:
    """Multi-latent attention: the low-rank query (or full) and key/value projections, the output projection, and
    causal scores over query/key heads of nope + rope dims and value heads of v dims."""
    hidden, heads = t["hidden_size"], t["num_attention_heads"]
    qk, v, q_rank = t["qk_head_dim"] + t["qk_pos_emb_head_dim"], t["v_head_dim"], t.get("q_lora_rank")
    query = 2 * hidden * heads * qk if not q_rank else 2 * hidden * q_rank + 2 * q_rank * heads * qk
    key_value = 2 * hidden * (t["kv_lora_rank"] + t["qk_pos_emb_head_dim"])
    key_value += 2 * t["kv_lora_rank"] * heads * (t["qk_head_dim"] + v)
    return query + key_value + 2 * heads * v * hidden + seq_length * heads * (qk + v)  # scores: causal half of 2 + 2
