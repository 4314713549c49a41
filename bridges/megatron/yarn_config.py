"""Megatron-Core's TransformerConfig with the YaRN fields its GPTModel reads.

Megatron-Core 0.16 reads `config.yarn_*` with getattr (GPTModel for the rotary embedding, attention for
the mscale factor) but declares them only on its MLA config; this subclass declares them for GPT models.
Imported only when a YaRN model is built (importing Megatron-Core costs seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer import TransformerConfig


@dataclass
class YarnTransformerConfig(TransformerConfig):
    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float | None = None
    yarn_mscale_all_dim: float | None = None
    yarn_correction_range_round_to_int: bool = True
