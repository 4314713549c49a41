"""Lets Megatron-Core 0.16 run on CPU with gloo (development, CI, the embedded default).

Every CPU compatibility step for Megatron-Core lives here and nowhere else (what Transformer Engine's absence
needs, on GPU as on CPU, is in no_te.py). The run's accelerator decides:
`enable()` is called when the run's device is the CPU (the Lightning strategy's root device, or verify's
`--device`), never because CUDA is absent, so GPU runs use Megatron-Core unchanged. Steps:
- `torch.cuda.current_device()` answers "cpu" (Megatron allocates buffers on it) and
  `Tensor.cuda()` leaves a tensor on the CPU;
- a CPU RNG tracker replaces the CUDA one (model-parallel / expert-parallel RNG streams);
- Gated DeltaNet runs on torch alone: Megatron-Core's `torch_chunk_gated_delta_rule` and a torch L2 norm stand
  in for flash-linear-attention's kernels (its convolution already falls back to torch without causal-conv1d);
- the pipeline schedules' hard-coded `device="cuda"` allocations land on the CPU, and
  `torch.cuda.synchronize()` (used around p2p) is a no-op;
- the local attention's sliding-window mask (built with `device="cuda"`) is built on the CPU;
- the optimizer (distributed optimizer, fp32 masters, grad clipping): its `device="cuda"` allocations land on
  the CPU, its `param.type() == "torch.cuda.*Tensor"` checks accept CPU tensors, and the grad-norm fallback
  (`local_multi_tensor_l2_norm`) returns a CPU tensor;
- `adapt_config` picks settings that have CPU implementations (allgather token dispatcher, no fusions).
"""

from __future__ import annotations

import contextlib
import functools

import torch

_ENABLED = False


def default_device() -> str:
    """The device a run uses when nobody chose one ("auto"): the one place that asks whether CUDA is there."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def active() -> bool:
    """Whether this process runs Megatron-Core on the CPU (`enable()` was called)."""
    return _ENABLED


def enable() -> None:
    """Apply the CPU compatibility steps once (the run's device is the CPU)."""
    global _ENABLED
    if _ENABLED:
        return
    _patch_current_device()
    _patch_rng_tracker()
    _patch_pipeline_schedules()
    _patch_sliding_window_mask()
    _patch_gated_delta_net()
    _patch_optimizer()
    _ENABLED = True


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
    """TransformerConfig settings that have CPU implementations (a copy; unchanged when not enabled)."""
    if not _ENABLED:
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
        return torch.zeros(*args, device=_on_cpu(device), **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device=_on_cpu(device), **kwargs)


def _on_cpu(device):
    return "cpu" if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda") else device


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


@contextlib.contextmanager
def _cuda_type_names():
    """`tensor.type()` answers "torch.cuda.<X>Tensor" for CPU tensors while Megatron checks it."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        name = original(self, dtype, non_blocking, **kwargs)
        if dtype is None and isinstance(name, str) and not name.startswith("torch.cuda."):
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapped


def _l2_norm_on_cpu(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Megatron's `local_multi_tensor_l2_norm` (no TE / apex) with its result on the CPU, not device="cuda"."""
    l2 = [[torch.norm(tensor) for tensor in tensor_list] for tensor_list in tensor_lists]
    return torch.norm(torch.tensor(l2)).reshape(1).float(), None


def _patch_optimizer() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler, optimizer

    # device="cuda" scalars (found-inf flag, unit loss scale, grad-norm buffers) are made on the CPU.
    for module in (optimizer, distrib_optimizer, clip_grads, grad_scaler):
        module.torch = _TorchOnCpu()
    # Replaces the param.type() == "torch.cuda.*Tensor" checks that sort params into fp32 / bf16 groups.
    distrib_optimizer.DistributedOptimizer.__init__ = _with_cuda_type_names(distrib_optimizer.DistributedOptimizer.__init__)
    # Replaces the param.grad.type() == "torch.cuda.FloatTensor" assertion before clipping.
    clip_grads.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
    # Replaces the grad-norm fallback's device="cuda" result (used without TE or apex).
    if getattr(clip_grads.l2_norm_impl, "__name__", "") == "local_multi_tensor_l2_norm":
        clip_grads.l2_norm_impl = _l2_norm_on_cpu
