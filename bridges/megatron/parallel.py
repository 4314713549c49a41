"""Megatron parallel state: initialise it for a layout once torch.distributed exists, and tear it down."""

from __future__ import annotations

import torch
import torch.distributed as dist

from bridges.megatron import cpu_runtime
from bridges.megatron.layout import ParallelLayout


def initialize(layout: ParallelLayout, seed: int = 1234, device: str | None = None) -> None:
    """Create TP/PP/EP/expert-TP/DP groups and seed the model-parallel RNG streams.

    `device` is the run's device ("cpu" or "cuda"), decided by the caller (the Lightning strategy's root
    device, verify's `--device`); None: the one the default process group was made for (gloo: cpu).
    On "cpu" Megatron-Core runs through the CPU runtime.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    assert dist.is_initialized(), "torch.distributed must be initialised first"
    if device is None:
        device = "cpu" if dist.get_backend() == "gloo" else "cuda"
    if device == "cpu":
        cpu_runtime.enable()
    layout.check(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        # The optimizer runs on the default groups (use_gloo_process_groups=False in recipes/optim.py):
        # extra gloo groups would only cost start-up time.
        create_gloo_process_groups=False,
    )
    # As Megatron's training does: one default-generator seed per pipeline stage, so data-parallel
    # replicas initialise identically; named streams for TP / EP randomness.
    torch.manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
