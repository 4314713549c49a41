"""Sharded Lightning checkpoints through Megatron-Core `dist_checkpointing` (the `torch_dist` backend).

A checkpoint is a directory. Every rank writes its own shards of the model (TP / EP / PP pieces) and of
the distributed optimizer's state (its range of fp32 master weights and Adam moments, in model space:
`fully_sharded_model_space`), plus its RNG states; rank 0 writes the Lightning state (loops, global step,
callbacks, data position), the LR scheduler and a record of the run (architecture, parameter dtype,
layout). Loading reshards: a checkpoint resumes under the same layout bit for bit and under another
TP / PP / EP / DP layout of the same model. Nothing read from the directory is unpickled beyond tensors,
plain containers and the checkpoint library's own metadata classes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint

LIGHTNING_STATE = "lightning_state.pt"  # rank 0's Lightning state (tensors and plain values only)
RUN_RECORD = "run.json"  # architecture, parameter dtype and layout of the run that wrote the checkpoint
# Model-space optimizer state (reshardable across layouts); keys independent of how optimizers are chained.
SHARDING = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
MODEL_METADATA = {"non_homogeneous_layers": True}  # one key per layer (dense and MoE layers differ)


class CheckpointRefused(ValueError):
    """A checkpoint that this run cannot resume (another architecture, another parameter dtype, not ours)."""


def run_record(module, layout, world_size: int) -> dict[str, Any]:
    arch = module.arch
    return {
        "architecture": json.loads(json.dumps(
            {"transformer": arch.transformer, "vocab_size": arch.vocab_size, "mtp_num_layers": arch.mtp_num_layers,
             "tie_word_embeddings": arch.tie_word_embeddings}, default=_stable_name)),
        "params_dtype": str(module.params_dtype).replace("torch.", ""),
        "layout": {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "etp": layout.expert_tp,
                   "world_size": world_size},
    }


def _stable_name(value) -> str:
    """A JSON stand-in for a config value that is not plain data (an activation function: its name)."""
    return getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or type(value).__qualname__


def _sharded_state(module, optimizer, is_loading: bool, with_rng: bool) -> dict:
    """Only sharded tensors: the model's weights and each optimizer's per-parameter state (fp32 master, Adam
    moments) in model space, keyed by parameter name, so the same keys exist under every layout and however
    the optimizers are split (dense / expert). Megatron's pickled extras (`_extra_state` objects, optimizer
    hyper-parameters) are left out; the Adam step count travels in the Lightning state."""
    # Fresh metadata dicts: Megatron records the run's process groups in them.
    model_state = _tensors_only(module.model.sharded_state_dict(metadata=dict(MODEL_METADATA)))
    optimizer_state = {
        i: _tensors_only(opt.sharded_state_dict(model_state, is_loading=is_loading, metadata=dict(SHARDING))["param_state"])
        for i, opt in enumerate(optimizer.distributed_optimizers())
    }
    state = {"model": model_state, "optimizer": optimizer_state}
    if with_rng:
        state["rng"] = _rng_sharded(_rng_bytes())
    return state


def _tensors_only(state: dict) -> dict:
    """Sharded tensors (and factories that make them, e.g. a fused gate/up weight split in two); no objects."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    tensors, _ = extract_matching_values(state, lambda v: isinstance(v, (ShardedTensor, ShardedTensorFactory)))
    return tensors


def save(directory: str, module, optimizer, lightning_state: dict, record: dict) -> None:
    """Every rank calls this; the directory is complete when it returns on every rank."""
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(module, optimizer, is_loading=False, with_rng=True), directory,
                            sharded_strategy=_in_process_torch_dist())
    if dist.get_rank() == 0:
        state = {**lightning_state, "scheduler": optimizer.scheduler.state_dict(), "adam_step": optimizer.adam_step()}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with open(os.path.join(directory, LIGHTNING_STATE), "wb") as f:
            f.write(buffer.getvalue())
        with open(os.path.join(directory, RUN_RECORD), "w") as f:
            json.dump(record, f, indent=1)
    dist.barrier()


def _in_process_torch_dist():
    """Megatron's `torch_dist` format, written by this process (Megatron's writer forks a process per file
    bucket, which a daemonic process, e.g. a test worker, may not do)."""
    from megatron.core.dist_checkpointing.strategies import torch as mtorch

    class InProcessTorchDistSave(mtorch.TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            sharded_state_dict, _, _ = mtorch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            pyt_state_dict = mtorch.mcore_to_pyt_state_dict(sharded_state_dict, False)
            torch.distributed.checkpoint.save(
                pyt_state_dict,
                storage_writer=torch.distributed.checkpoint.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                planner=mtorch.MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                                flatten_state_dict=False),
            )

    return InProcessTorchDistSave("torch_dist", 1)


def read_lightning_state(directory: str, record: dict) -> dict:
    """Rank-0 Lightning state of a checkpoint, after checking it can resume this run (same architecture and
    parameter dtype; any layout)."""
    saved = _read_record(directory)
    if saved["architecture"] != record["architecture"]:
        differing = sorted(k for k in set(saved["architecture"]["transformer"]) | set(record["architecture"]["transformer"])
                           if saved["architecture"]["transformer"].get(k) != record["architecture"]["transformer"].get(k))
        what = ", ".join(differing[:4]) or "vocabulary / MTP / tied embeddings"
        raise CheckpointRefused(f"checkpoint {directory} holds another model architecture ({what} differ)")
    if saved["params_dtype"] != record["params_dtype"]:
        raise CheckpointRefused(
            f"checkpoint {directory} was trained with {saved['params_dtype']} parameters, this run uses "
            f"{record['params_dtype']} (trainer.precision): its master weights and moments do not carry over")
    path = os.path.join(directory, LIGHTNING_STATE)
    if not os.path.isfile(path) or os.path.islink(path):
        raise CheckpointRefused(f"checkpoint {directory} has no {LIGHTNING_STATE}")
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    state["saved_layout"] = saved["layout"]
    return state


def load(directory: str, module, optimizer, lightning_state: dict, same_layout: bool) -> None:
    """Load the model, the fp32 masters and Adam moments (resharded to this layout), the Adam step and the
    scheduler and, under the same layout, each rank's RNG states. Every rank calls this once the optimizer
    exists."""
    from megatron.core import dist_checkpointing

    optimizer.prepare_state_for_loading()
    sharded = _sharded_state(module, optimizer, is_loading=True, with_rng=same_layout)
    with _restricted_metadata_unpickling():
        loaded = dist_checkpointing.load(sharded, directory)
    missing, unexpected = module.model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointRefused(f"checkpoint {directory} does not fit the model: missing {missing[:3]}, "
                                f"unexpected {list(unexpected)[:3]}")
    for i, opt in enumerate(optimizer.distributed_optimizers()):
        state = opt.state_dict()  # this run's parameter groups, with the checkpoint's step count
        for group in state["optimizer"]["param_groups"]:
            group["step"] = lightning_state["adam_step"]
        state["param_state"] = loaded["optimizer"][i]
        state["param_state_sharding_type"] = SHARDING["distrib_optim_sharding_type"]
        with torch.no_grad():
            opt.load_state_dict(state)
    optimizer.unshare_adam_steps()
    optimizer.scheduler.load_state_dict(lightning_state["scheduler"])
    if same_layout:
        _set_rng_bytes(loaded["rng"].reshape(-1))


def newest_checkpoint(run_dir: str) -> str | None:
    """The most recently completed checkpoint directory under `run_dir` (any depth), or None. Complete: its
    run record, the last file `save` writes, is there."""
    found = []
    for directory, _, files in os.walk(run_dir):
        if RUN_RECORD in files and LIGHTNING_STATE in files:
            found.append((os.path.getmtime(os.path.join(directory, RUN_RECORD)), directory))
    return max(found)[1] if found else None


def _read_record(directory: str) -> dict:
    path = os.path.join(directory, RUN_RECORD)
    if not os.path.isfile(path):
        raise CheckpointRefused(f"{directory} is not a checkpoint of this trainer (no {RUN_RECORD})")
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------- RNG states, one row per rank
def _rng_bytes() -> torch.Tensor:
    """This rank's RNG states as one uint8 vector: the default generator, Megatron's named streams, CUDA's."""
    from megatron.core.tensor_parallel import random as mrandom

    parts = [torch.get_rng_state()]
    tracker = mrandom.get_cuda_rng_tracker()
    for name in sorted(tracker.get_states()):
        parts.append(_as_bytes(tracker.get_states()[name]))
    if torch.cuda.is_initialized():
        parts.append(torch.cuda.get_rng_state().cpu())
    return torch.cat([p.reshape(-1).to(torch.uint8) for p in parts])


def _as_bytes(state) -> torch.Tensor:
    return state if isinstance(state, torch.Tensor) else torch.tensor(list(state), dtype=torch.uint8)


def _set_rng_bytes(data: torch.Tensor) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    size = torch.get_rng_state().numel()
    torch.set_rng_state(data[:size].clone())
    offset = size
    tracker = mrandom.get_cuda_rng_tracker()
    states = tracker.get_states()
    for name in sorted(states):
        n = _as_bytes(states[name]).numel()
        states[name] = data[offset:offset + n].clone()
        offset += n
    tracker.set_states(states)
    if torch.cuda.is_initialized():
        torch.cuda.set_rng_state(data[offset:].clone())


def _rng_sharded(data: torch.Tensor):
    from megatron.core.dist_checkpointing import ShardedTensor

    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedTensor.from_rank_offsets("rng_state", data[None].contiguous(), (0, rank, world), replica_id=0)


# ----------------------------------------------------------------- no arbitrary pickle on load
_METADATA_MODULES = ("torch.distributed.checkpoint.", "megatron.core.dist_checkpointing.")
_METADATA_NAMES = {
    ("torch", "Size"), ("torch", "float32"), ("torch", "bfloat16"), ("torch", "float16"), ("torch", "uint8"),
    ("torch", "int64"), ("torch", "int32"), ("torch", "strided"), ("torch", "contiguous_format"),
    ("torch", "preserve_format"), ("torch", "float64"), ("torch", "bool"), ("torch", "int8"),
    ("builtins", "set"), ("builtins", "frozenset"), ("collections", "OrderedDict"), ("builtins", "getattr"),
    ("torch", "device"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint's `.metadata` file, with only its own record classes allowed."""

    def find_class(self, module, name):
        if module.startswith(_METADATA_MODULES) or (module, name) in _METADATA_NAMES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}: refused (not checkpoint metadata)")


class _RestrictedPickle:
    """`pickle` as torch.distributed.checkpoint's file reader sees it while we load."""

    def __getattr__(self, name):
        return getattr(pickle, name)

    @staticmethod
    def load(file, **kwargs):
        return _MetadataUnpickler(file, **kwargs).load()


@contextlib.contextmanager
def _restricted_metadata_unpickling():
    from torch.distributed.checkpoint import filesystem

    original = filesystem.pickle
    filesystem.pickle = _RestrictedPickle()
    try:
        yield
    finally:
        filesystem.pickle = original
