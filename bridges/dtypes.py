"""One vocabulary for training dtypes: Lightning precision names and short dtype names -> torch dtype.

`trainer.precision` maps onto Megatron's parameter dtype (what the model stores and computes in); the
optimizer always keeps fp32 master weights and Adam moments, and gradients are accumulated and reduced in
fp32, whatever the parameter dtype. Used by train.py and the Lightning module; knows nothing of Lightning.
"""

from __future__ import annotations

import torch

# name -> Megatron parameter dtype
PRECISIONS: dict[str, torch.dtype] = {
    # bf16 weights and activations; fp32 master weights, Adam moments and gradient accumulation
    "bf16": torch.bfloat16,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    # everything fp32
    "fp32": torch.float32,
    "32": torch.float32,
    "32-true": torch.float32,
}


def params_dtype(precision) -> torch.dtype:
    """The Megatron parameter dtype for a precision name (`trainer.precision`); ValueError names the choices."""
    name = str(precision)
    if name not in PRECISIONS:
        raise ValueError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def default_precision(device_type: str) -> str:
    """bf16 on GPUs (tensor cores), fp32 on the CPU (bf16 matmuls there are slow and gain nothing)."""
    return "bf16" if device_type == "cuda" else "fp32"


def short_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
