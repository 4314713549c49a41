"""Lets Megatron-Core 0.16 run on CPU with gloo (development, CI, the embedded default).

Every CPU compatibility step for Megatron-Core lives here and nowhere else; `enable()` does nothing
when CUDA is available, so GPU runs use Megatron-Core unchanged. Steps:
- `torch.cuda.current_device()` answers "cpu" (Megatron allocates buffers on it) and
  `Tensor.cuda()` leaves a tensor on the CPU;
- a CPU RNG tracker replaces the CUDA one (model-parallel / expert-parallel RNG streams);
- Transformer Engine's GEMM name, absent without TE, is defined as None for the MoE router;
- the torch norm wrapper accepts sequence parallelism (needed for MoE with TP > 1) and marks
  its weights `sequence_parallel` so their gradients are reduced over the TP group; with
  `layernorm_zero_centered_gamma` it builds an RMSNorm that scales by (1 + weight);
- Gated DeltaNet runs on torch alone: Megatron-Core's `torch_chunk_gated_delta_rule` and a torch L2 norm stand
  in for flash-linear-attention's kernels (its convolution already falls back to torch without causal-conv1d);
- the pipeline schedules' hard-coded `device="cuda"` allocations land on the CPU, and
  `torch.cuda.synchronize()` (used around p2p) is a no-op;
- the local attention's sliding-window mask (built with `device="cuda"`) is built on the CPU;
- `adapt_config` picks settings that have CPU implementations (allgather token dispatcher, no fusions).
"""

from __future__ import annotations

import contextlib

import torch

_ENABLED = False


def cuda_present() -> bool:
    return torch.cuda.is_available()


def enable() -> bool:
    """Apply the CPU compatibility steps once; return True when they are active."""
    global _ENABLED
    if cuda_present():
        return False
    if _ENABLED:
        return True
    _patch_current_device()
    _patch_rng_tracker()
    _patch_missing_kernel_names()
    _patch_torch_norm_for_sequence_parallel()
    _patch_pipeline_schedules()
    _patch_sliding_window_mask()
    _patch_gated_delta_net()
    _ENABLED = True
    return True


def _patch_current_device() -> None:
    # Megatron allocates buffers with device=torch.cuda.current_device(); on CPU that is "cpu".
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # e.g. the tied-embedding all-reduce between pipeline stages moves weights with `.cuda()`.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


class CpuRNGStatesTracker:
    """Named RNG streams on the CPU generator, with the interface of Megatron's CUDA tracker."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mrandom.initialize_rng_tracker(force_reset=True)


def _patch_missing_kernel_names() -> None:
    # moe_utils refers to Transformer Engine's GEMM by name even when TE is absent.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_torch_norm_for_sequence_parallel() -> None:
    from megatron.core.transformer import torch_norm

    def new(cls, config, hidden_size, eps=1e-5, **_unused):
        if config.normalization == "RMSNorm" and config.layernorm_zero_centered_gamma:
            norm = ZeroCenteredRMSNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"CPU runtime: unsupported normalization {config.normalization!r}")
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


def _patch_gated_delta_net() -> None:
    """Replaces flash-linear-attention's chunked gated delta rule and L2 norm with torch code (Megatron-Core's own
    `torch_chunk_gated_delta_rule`), so Megatron-Core's GatedDeltaNet builds and runs without `fla`."""
    from megatron.core.ssm import gated_delta_net

    if gated_delta_net.HAVE_FLA:
        return
    gated_delta_net.HAVE_FLA = True
    gated_delta_net.l2norm = l2norm
    gated_delta_net.chunk_gated_delta_rule = gated_delta_net.torch_chunk_gated_delta_rule


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """flash-linear-attention's `l2norm` (x / sqrt(sum x^2 + eps)), in fp32."""
    y = x.float()
    return (y * torch.rsqrt(y.pow(2).sum(dim=dim, keepdim=True) + eps)).to(x.dtype)


def adapt_config(kwargs: dict) -> dict:
    """TransformerConfig settings that have CPU implementations (a copy; unchanged with CUDA)."""
    if cuda_present():
        return dict(kwargs)
    out = dict(kwargs)
    # The alltoall dispatcher creates CUDA streams; allgather is plain collectives.
    if out.get("num_moe_experts"):
        out["moe_token_dispatcher_type"] = "allgather"
    for fused in (
        "bias_activation_fusion",
        "bias_dropout_fusion",
        "apply_rope_fusion",
        "masked_softmax_fusion",
        "gradient_accumulation_fusion",
        "persist_layer_norm",
    ):
        out[fused] = False
    return out


class _TorchOnCpu:
    """`torch` as seen by a module that allocates with device="cuda": those allocations go to the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def _patch_pipeline_schedules() -> None:
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchOnCpu()


def sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    """Megatron's `get_sliding_window_causal_mask` on the CPU: True = masked; query i (aligned to the end
    of the keys) sees keys j with i - window_size[0] <= j <= i + window_size[1]."""
    allowed = torch.ones(sq, skv, dtype=torch.bool)
    allowed = torch.triu(allowed, diagonal=skv - sq - window_size[0])
    return ~torch.tril(allowed, diagonal=skv - sq + window_size[1])


def _patch_sliding_window_mask() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    utils.get_sliding_window_causal_mask = sliding_window_causal_mask
    fused_softmax.get_sliding_window_causal_mask = sliding_window_causal_mask  # imported there by name
