"""This rank's Megatron tensors under canonical global names, and this rank's place in the parallel groups.

Canonical names make rules independent of where a tensor lives: global layer numbers (pipeline
offset applied), global expert numbers (expert-parallel offset applied), one expert naming scheme
(`experts.local_experts.{e}.linear_fc1.weight`, also for TEGroupedMLP's `experts.linear_fc1.weight{k}`),
one MTP inner name (`transformer_layer`, also for later releases' `mtp_model_layer`) and unfused norms
(Transformer Engine's `linear_qkv.layer_norm_weight` is `input_layernorm.weight`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

MTP_INNER = "transformer_layer"  # canonical MTP inner layer name (Megatron-Core 0.16)
MTP_INNER_NAMES = ("transformer_layer", "mtp_model_layer")  # 0.16, later releases
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"


@dataclass(frozen=True)
class Ranks:
    """This rank's coordinates in the groups that decide which shard it holds and what it writes."""

    tp_rank: int = 0
    tp_size: int = 1
    etp_rank: int = 0  # expert tensor parallel
    etp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    dp_rank: int = 0  # data parallel (with context parallel): replica of the dense params
    edp_rank: int = 0  # expert data parallel: replica of the expert params
    dp_size: int = 1
    edp_size: int = 1

    @staticmethod
    def current() -> "Ranks":
        """Read from Megatron's parallel state (which must be initialised)."""
        from megatron.core import parallel_state as ps

        return Ranks(
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            ep_size=ps.get_expert_model_parallel_world_size(),
            dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
            edp_rank=ps.get_expert_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(with_context_parallel=True),
            edp_size=ps.get_expert_data_parallel_world_size(),
        )

    def tensor_parallel(self, expert: bool) -> tuple[int, int]:
        """(rank, size) of the group a parameter is split over."""
        return (self.etp_rank, self.etp_size) if expert else (self.tp_rank, self.tp_size)

    def replica(self, expert: bool) -> tuple[int, int]:
        """(index, count) of the copies of a parameter: data-parallel replicas (expert params: expert-DP)."""
        return (self.edp_rank, self.edp_size) if expert else (self.dp_rank, self.dp_size)


@dataclass
class LocalParam:
    name: str  # canonical global name, the key of the rules
    local_name: str  # name in the model chunk's state dict
    tensor: torch.Tensor  # the parameter or buffer itself (its data is this rank's shard)
    exported: bool = True  # False for a copy that another pipeline stage writes (tied / MTP embedding)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def local_params(model_chunks, ranks: Ranks | None = None) -> list[LocalParam]:
    """Every parameter and persistent buffer of this rank's model chunks, canonically named."""
    ranks = ranks or Ranks.current()
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    out: list[LocalParam] = []
    for chunk in map(unwrap, chunks):
        naming = Naming.of(chunk, ranks)
        for local_name, tensor in chunk.state_dict(keep_vars=True).items():
            if local_name.endswith("_extra_state") or tensor is None:
                continue  # Transformer Engine / fp8 metadata, not weights
            name = naming.canonical(local_name)
            exported = True
            if name == OUTPUT and getattr(chunk, "share_embeddings_and_output_weights", False):
                name, exported = EMBEDDING, False  # tied: the first stage writes the embedding
            elif name == EMBEDDING and not getattr(chunk, "pre_process", True):
                exported = False  # the MTP stage's copy of the embedding
            out.append(LocalParam(name, local_name, tensor, exported))
    return out


@dataclass(frozen=True)
class Naming:
    """Local -> canonical global names for one model chunk."""

    layer_numbers: dict[int, int]  # local decoder layer index -> global (0-based)
    mtp_numbers: dict[int, int]  # local MTP layer index -> global MTP index (0-based)
    expert_offset: int  # global index of local expert 0

    @staticmethod
    def of(chunk, ranks: Ranks) -> "Naming":
        layers = getattr(getattr(chunk, "decoder", None), "layers", [])
        mtp_layers = getattr(getattr(chunk, "mtp", None), "layers", [])
        experts = getattr(chunk.config, "num_moe_experts", None) or 0
        return Naming(
            layer_numbers={i: layer.layer_number - 1 for i, layer in enumerate(layers)},
            mtp_numbers={i: layer.layer_number - 1 for i, layer in enumerate(mtp_layers)},
            expert_offset=ranks.ep_rank * (experts // ranks.ep_size),
        )

    def canonical(self, name: str) -> str:
        for pattern, replace in _RENAMES:
            name = re.sub(pattern, replace, name)
        name = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{self.layer_numbers[int(m[1])]}.", name)
        name = re.sub(r"^mtp\.layers\.(\d+)\.", lambda m: f"mtp.layers.{self.mtp_numbers[int(m[1])]}.", name)
        expert = lambda m: f"{m['pre']}local_experts.{self.expert_offset + int(m['k'])}.{m['rest']}"  # noqa: E731
        name = re.sub(r"^(?P<pre>.*\.mlp\.experts\.)local_experts\.(?P<k>\d+)\.(?P<rest>.+)$", expert, name)
        grouped = r"^(?P<pre>.*\.mlp\.experts\.)(?P<fc>linear_fc[12])\.(?P<kind>weight|bias)(?P<k>\d+)$"
        return re.sub(grouped, lambda m: expert({"pre": m["pre"], "k": m["k"], "rest": f"{m['fc']}.{m['kind']}"}), name)


_RENAMES = [
    (r"^(mtp\.layers\.\d+\.)mtp_model_layer\.", rf"\g<1>{MTP_INNER}."),
    # Transformer Engine fuses the pre-attention / pre-MLP norm into the following linear layer.
    (r"\.self_attention\.linear_qkv\.layer_norm_weight$", ".input_layernorm.weight"),
    (r"\.mlp\.linear_fc1\.layer_norm_weight$", ".pre_mlp_layernorm.weight"),
]
