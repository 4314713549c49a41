"""Lightning strategy for Megatron-Core parallelism (TP, PP, EP, expert-TP) on top of DDPStrategy.

After the default process group exists it creates Megatron's parallel groups; the model is wrapped in
Megatron-Core `DistributedDataParallel` (gradients reduced over data-parallel and expert-data-parallel
groups) instead of torch DDP. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

from bridges import rank_status
from bridges.export.snapshot import wait_for_snapshots
from bridges.megatron import cpu_runtime, parallel
from bridges.megatron.layout import ParallelLayout
from recipes import checkpoint as ckpt


@dataclass(frozen=True)
class DDPKnobs:
    """Megatron DDP settings (Hydra `ddp.`): overlap gradient reduce-scatter / all-reduce with the backward
    pass, and parameter all-gather with the next forward (the distributed optimizer's)."""

    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    bucket_size: int | None = None  # elements per communication bucket (None: Megatron's default)

    def __post_init__(self):
        if self.bucket_size is not None and self.bucket_size < 1:
            raise ValueError(f"ddp.bucket_size must be >= 1 or null, got {self.bucket_size}")
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            raise ValueError("ddp.overlap_param_gather=true needs ddp.overlap_grad_reduce=true (Megatron-Core)")


class MegatronStrategy(DDPStrategy):
    strategy_name = "megatron"

    def __init__(self, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, seed: int = 1234,
                 first_stage_layers: int | None = None, last_stage_layers: int | None = None,
                 virtual_stages: int | None = None, ddp: DDPKnobs | None = None, layout: ParallelLayout | None = None,
                 **kwargs: Any):
        """`layout`: the parallel layout (train.py passes the one it checked); without it, made from tp ... virtual_stages."""
        # The process group backend follows the root device (gloo on CPU, NCCL on GPU): Lightning's default.
        super().__init__(**kwargs)
        self.layout = layout or ParallelLayout(tp=tp, pp=pp, ep=ep, etp=etp, first_stage_layers=first_stage_layers,
                                               last_stage_layers=last_stage_layers, virtual_stages=virtual_stages)
        self.ddp_knobs = ddp or DDPKnobs()
        self.seed = seed
        self._resume_from: tuple[str, dict, bool] | None = None

    @property
    def device_type(self) -> str:
        """The run's device, decided once by the accelerator: "cpu" (Megatron-Core through the CPU runtime)
        or "cuda"."""
        return self.root_device.type

    def setup_distributed(self) -> None:
        if self.device_type == "cpu":
            cpu_runtime.enable()
        super().setup_distributed()
        parallel.initialize(self.layout, seed=self.seed, device=self.device_type)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        from megatron.core import parallel_state

        return {
            "num_replicas": parallel_state.get_data_parallel_world_size(),
            "rank": parallel_state.get_data_parallel_rank(),
        }

    def setup(self, trainer) -> None:
        # DDPStrategy.setup would broadcast rank 0's weights to every rank when not fitting, which
        # overwrites TP/EP shards of equal shape: Megatron models are consistent by construction.
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self._wrap_in_megatron_ddp(self.model, self.ddp_knobs)
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def configure_ddp(self) -> None:  # replaced by _wrap_in_megatron_ddp (see setup)
        pass

    @staticmethod
    def _wrap_in_megatron_ddp(module, knobs: DDPKnobs) -> None:
        """Wrap `module.model` (the rank's GPTModel) in Megatron DDP and hand the wrapper back as
        `module.ddp_model`. Held outside the module's registered children, so Lightning checkpoints
        keep one copy of each weight under `model.`."""
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        model = module.model
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=knobs.overlap_grad_reduce,
            overlap_param_gather=knobs.overlap_param_gather,
            bucket_size=knobs.bucket_size,
            use_distributed_optimizer=True,
        )
        ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        model.config.no_sync_func = ddp.no_sync
        model.config.finalize_model_grads_func = _after_snapshots(finalize_model_grads)
        object.__setattr__(module, "ddp_model", ddp)

    # Lightning checkpoints: a directory written through Megatron-Core dist_checkpointing by every rank
    # (model and optimizer shards), with rank 0's Lightning state beside it (recipes/checkpoint.py).
    def lightning_module_state_dict(self) -> dict:
        return {}  # the weights are saved sharded, with the optimizer

    def optimizer_state(self, optimizer) -> dict:
        return {}  # saved sharded, with the model

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        ckpt.save(str(filepath), self.lightning_module, self.optimizers[0], state, self._run_record())

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        state, error = None, None
        try:
            state = ckpt.read_lightning_state(str(checkpoint_path), self._run_record())
        except (ckpt.CheckpointRefused, OSError, RuntimeError) as e:
            error = e
        # Every rank reads the same files; agree anyway, so no rank waits alone in the next collective.
        refused = [m for m in rank_status.exchange(None if error is None else str(error), None, "checkpoint check") if m]
        if refused:
            raise ckpt.CheckpointRefused(refused[0])
        self._resume_from = (str(checkpoint_path), state, state.pop("saved_layout") == self._run_record()["layout"])
        return {**state, "state_dict": {}, "optimizer_states": [{}]}

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        pass  # loaded with the optimizer state, once the optimizer exists (load_optimizer_state_dict)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        path, state, same_layout = self._resume_from
        wait_for_snapshots()  # the load overwrites the weights in place
        ckpt.load(path, self.lightning_module, self.optimizers[0], state, same_layout)

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero and os.path.isdir(filepath):
            shutil.rmtree(filepath)

    def _run_record(self) -> dict:
        return ckpt.run_record(self.lightning_module, self.layout, self.world_size)

    def teardown(self) -> None:
        wait_for_snapshots()
        super().teardown()
        parallel.destroy()


def _after_snapshots(finalize_model_grads):
    """Megatron's `finalize_model_grads`, which also updates the router's expert bias in place (Megatron-Core
    0.16: `_update_router_expert_bias`), run once no export snapshot still reads the weights."""

    def finalize(*args, **kwargs):
        wait_for_snapshots()
        return finalize_model_grads(*args, **kwargs)

    return finalize
