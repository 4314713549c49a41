"""Megatron-Core without Transformer Engine (on GPU as on CPU): what its local layer spec still needs.

Keyed on Megatron-Core's own `HAVE_TE`, never on the device (CPU-only steps live in cpu_runtime.py):
- without TE, `moe_utils` names TE's GEMM in the router without importing it: defined as None, so the
  router takes its torch path;
- the torch norm of the local spec accepts sequence parallelism (MoE with TP > 1) and marks its weights
  `sequence_parallel`, so their gradients are summed over the TP group (TE's norms do this themselves).
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
    _torch_norm_for_sequence_parallel()
    _ENABLED = True


def _define_missing_te_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _torch_norm_for_sequence_parallel() -> None:
    # One implementation of the SP-capable torch norm (zero-centred gamma included), shared with the CPU runtime.
    from bridges.megatron.cpu_runtime import _patch_torch_norm_for_sequence_parallel

    _patch_torch_norm_for_sequence_parallel()
