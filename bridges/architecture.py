"""What a model is, independent of any checkpoint format or framework: the facts that fix a Megatron GPT
model's shapes and maths. Model families (bridges/models/) translate HF configs into a `GPTArchitecture`;
bridges/megatron/ builds it; the rules (bridges/rules/) shard by it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rotary scaling (Megatron-Core's `yarn` position embedding, HF `rope_type: yarn`)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None  # with mscale_all_dim: attention factor mscale(f, mscale) / mscale(f, all_dim)
    mscale_all_dim: float | None = None  # either None: attention factor 0.1 ln(factor) + 1
    truncate: bool = True  # round the correction range to whole dims

    def megatron_fields(self) -> dict[str, Any]:
        """The `yarn_*` config attributes Megatron-Core's GPTModel and attention read."""
        return dict(
            yarn_rotary_scaling_factor=self.factor,
            yarn_original_max_position_embeddings=self.original_max_position_embeddings,
            yarn_beta_fast=self.beta_fast,
            yarn_beta_slow=self.beta_slow,
            yarn_mscale=self.mscale,
            yarn_mscale_all_dim=self.mscale_all_dim,
            yarn_correction_range_round_to_int=self.truncate,
        )


@dataclass(frozen=True)
class MRoPE:
    """Multimodal rotary embedding: the rotary channels split between temporal, height and width positions
    (position ids [3, batch, seq]); Megatron-Core's `mrope` position embedding."""

    section: tuple[int, ...]  # rotary frequencies per axis (T, H, W); they sum to the rotary dim / 2
    interleaved: bool = False  # Qwen3-VL: channels cycle T, H, W, T, H, W, ...; else contiguous sections

    def megatron_fields(self) -> dict[str, Any]:
        return dict(mrope_section=list(self.section))


@dataclass(frozen=True)
class GPTArchitecture:
    """Everything that fixes the shapes and the maths of a Megatron GPT model."""

    transformer: dict[str, Any]  # architecture kwargs of megatron.core TransformerConfig
    vocab_size: int
    max_position_embeddings: int
    rotary_percent: float = 1.0
    rotary_base: float = 10000.0
    tie_word_embeddings: bool = False
    mtp_num_layers: int = 0
    yarn: YarnScaling | None = None  # YaRN rotary scaling; None: plain RoPE
    mrope: MRoPE | None = None  # multimodal rotary (3-D position ids); None: 1-D positions
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific facts (not for Megatron)

    @property
    def num_layers(self) -> int:
        return int(self.transformer["num_layers"])

    @property
    def num_experts(self) -> int | None:
        return self.transformer.get("num_moe_experts")

    @property
    def expert_biases(self) -> bool:
        """Experts carry biases (Megatron's one switch, add_bias_linear, covers them)."""
        return bool(self.num_experts and self.transformer.get("add_bias_linear"))

    @property
    def tensor_parallel_heads(self) -> dict[str, int]:
        """Head counts that tensor parallelism must divide beyond Megatron's usual ones: gated attention's KV groups
        (its projection is split by whole groups) and Gated DeltaNet's key and value heads."""
        t = self.transformer
        names = (("num_query_groups",) if t.get("attention_output_gate") else ()) + (
            ("linear_num_key_heads", "linear_num_value_heads")
            if t.get("experimental_attention_variant") == "gated_delta_net" else ())
        return {name: int(t[name]) for name in names}

    def without_mtp(self) -> "GPTArchitecture":
        return replace(self, mtp_num_layers=0)


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Megatron splits the vocabulary evenly over TP ranks: pad to a multiple of tp (no more,
    so the padded logits, zero after import, stay as few as possible)."""
    return -(-vocab_size // tp) * tp
