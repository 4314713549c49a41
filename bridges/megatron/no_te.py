"""Megatron-Core without Transformer Engine (on GPU as on CPU): what its local layer spec still needs.

Keyed on Megatron-Core's own `HAVE_TE`, never on the device (CPU-only steps live in cpu_runtime.py):
- without TE, `moe_utils` names TE's GEMM in the router without importing it: defined as None, so the
  router takes its torch path;
- multi-latent attention learns that TE is absent, and its core attention takes its head sizes;
- the torch norm of the local spec accepts sequence parallelism (MoE with TP > 1) and marks its weights
  `sequence_parallel`, so their gradients are summed over the TP group (TE's norms do this themselves), and
  builds an RMSNorm scaling by (1 + weight) for `layernorm_zero_centered_gamma` (Qwen3.5).
With TE, the TE layer specs are used on GPU (`use_te_layer_specs`) and grouped expert GEMMs go to
TEGroupedMLP; the legacy GroupedMLP (the `grouped_gemm` package, weights no rule maps) is never picked.
"""

from __future__ import annotations

import torch

_ENABLED = False


def have_te() -> bool:
    """Megatron-Core's own answer: Transformer Engine imports."""
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE)


def use_te_layer_specs(on_gpu: bool) -> bool:
    """TE's layers (fused norm + linear, TEGroupedMLP) where TE is installed and the run is on GPU."""
    return on_gpu and have_te()


def enable() -> None:
    """Apply the steps for the local (non-TE) layer spec once; harmless where TE layers are used."""
    global _ENABLED
    if _ENABLED:
        return
    if not have_te():
        _define_missing_te_gemm()
        _multi_latent_attention_without_te()
    _torch_norm_for_sequence_parallel()
    _ENABLED = True


def _define_missing_te_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _multi_latent_attention_without_te() -> None:
    # Its own TE import succeeds on the placeholders Megatron-Core defines without TE, so it believes TE is
    # there and calls isinstance() on a placeholder.
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False


def _torch_norm_for_sequence_parallel() -> None:
    from megatron.core.transformer import torch_norm

    def new(cls, config, hidden_size, eps=1e-5, **_unused):
        if config.normalization == "RMSNorm" and config.layernorm_zero_centered_gamma:
            norm = ZeroCenteredRMSNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"torch norm: unsupported normalization {config.normalization!r}")
        # Replicated weights applied to a TP-split sequence: grads must be summed over TP.
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm

    torch_norm.WrappedTorchNorm.__new__ = new


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm scaling by (1 + weight), weight initialised to zero (Megatron's `layernorm_zero_centered_gamma`,
    Transformer Engine's `zero_centered_gamma`); computed in fp32 like transformers' Qwen3.5 / Qwen3-Next norm."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        # contiguous like torch.nn.RMSNorm's output, whatever the input's strides (the MoE router views it)
        return (y * (1.0 + self.weight.float())).type_as(x).contiguous()


def local_mla_core_attention(block_spec) -> None:
    """Multi-latent attention on the local layer spec: Megatron-Core 0.16's MLA hands its core attention the
    query/key and value head sizes (`k_channels`, `v_channels`), which only TE's attention accepts; give the
    layers of `block_spec` a DotProductAttention that takes them (its maths is per head, any head size)."""
    for spec in block_spec.layer_specs:
        attention = spec.submodules.self_attention.submodules
        if hasattr(attention, "linear_kv_down_proj"):
            attention.core_attention = _mla_dot_product_attention()


def _mla_dot_product_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        """DotProductAttention whose output has `v_channels` per head (`k_channels`: the query/key size, read
        from the inputs). Megatron's Attention base builds it once without them (MLA then builds its own)."""

        def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return MLADotProductAttention
