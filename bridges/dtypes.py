"""One vocabulary for dtypes: every name a user or a checkpoint gives a dtype, and the names we write.

`trainer.precision` (Lightning precision names) maps onto Megatron's parameter dtype (what the model stores
and computes in); the optimizer always keeps fp32 master weights and Adam moments, and gradients are
accumulated and reduced in fp32, whatever the parameter dtype. `hf_export.dtype` takes a dtype name; HF
configs spell dtypes `float32` / `bfloat16` / `float16` (`torch.`-prefixed in old ones). Knows nothing of
Lightning.
"""

from __future__ import annotations

import torch

# dtype -> (short name, HF config name)
_NAMES: dict[torch.dtype, tuple[str, str]] = {
    torch.float32: ("fp32", "float32"),
    torch.bfloat16: ("bf16", "bfloat16"),
    torch.float16: ("fp16", "float16"),
}

# Every dtype name taken (hf_export.dtype, HF configs): short and HF spellings.
DTYPE_NAMES: dict[str, torch.dtype] = {name: dtype for dtype, names in _NAMES.items() for name in names}

# trainer.precision name -> Megatron parameter dtype
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


def from_name(name: str) -> torch.dtype | None:
    """The dtype a name stands for (`bf16`, `bfloat16`, `torch.bfloat16`, ...); None for a name not in the table."""
    return DTYPE_NAMES.get(str(name).removeprefix("torch."))


def short_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype][0]


def hf_name(dtype: torch.dtype) -> str:
    """The spelling HF configs use (`bfloat16`); KeyError for a dtype outside the table."""
    return _NAMES[dtype][1]
