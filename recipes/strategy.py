"""Lightning strategy for Megatron-Core parallelism (TP, PP, EP, expert-TP) on top of DDPStrategy.

After the default process group exists it creates Megatron's parallel groups; the model is wrapped in
Megatron-Core `DistributedDataParallel` (gradients reduced over data-parallel and expert-data-parallel
groups) instead of torch DDP. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

from bridges.megatron import cpu_runtime, parallel
from bridges.megatron.layout import ParallelLayout


class MegatronStrategy(DDPStrategy):
    strategy_name = "megatron"

    def __init__(self, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, seed: int = 1234, **kwargs: Any):
        kwargs.setdefault("process_group_backend", "nccl" if torch.cuda.is_available() else "gloo")
        super().__init__(**kwargs)
        self.layout = ParallelLayout(tp=tp, pp=pp, ep=ep, etp=etp)
        self.seed = seed

    def setup_distributed(self) -> None:
        cpu_runtime.enable()
        super().setup_distributed()
        parallel.initialize(self.layout, seed=self.seed)

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
            self._wrap_in_megatron_ddp(self.model)
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def configure_ddp(self) -> None:  # replaced by _wrap_in_megatron_ddp (see setup)
        pass

    @staticmethod
    def _wrap_in_megatron_ddp(module) -> None:
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
            overlap_grad_reduce=False,
            use_distributed_optimizer=module.uses_megatron_optimizer,
        )
        ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        model.config.no_sync_func = ddp.no_sync
        model.config.finalize_model_grads_func = finalize_model_grads
        object.__setattr__(module, "ddp_model", ddp)

    # Lightning checkpoints: every rank holds different shards, so a checkpoint is a directory with
    # one file per rank (written by that rank), and only resumes under the same layout.
    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        checkpoint = {**checkpoint, "parallel_layout": self._layout_record()}
        os.makedirs(filepath, exist_ok=True)
        self.checkpoint_io.save_checkpoint(checkpoint, self._rank_file(filepath), storage_options=storage_options)
        self.barrier("save_checkpoint")

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        path = self._rank_file(checkpoint_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint_path} has no {os.path.basename(path)}: not a checkpoint of this strategy "
                f"(a directory with one file per rank) or written by a smaller world"
            )
        # Our own per-rank files (optimizer state included): trusted, unlike imported HF checkpoints.
        checkpoint = self.checkpoint_io.load_checkpoint(path, weights_only=False)
        saved = checkpoint.get("parallel_layout")
        if saved != self._layout_record():
            raise ValueError(f"checkpoint {checkpoint_path} was written with layout {saved}, this run has {self._layout_record()}")
        return checkpoint

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero and os.path.isdir(filepath):
            shutil.rmtree(filepath)

    def _rank_file(self, directory) -> str:
        return os.path.join(directory, f"rank_{self.global_rank:05d}.ckpt")

    def _layout_record(self) -> dict:
        return {"tp": self.layout.tp, "pp": self.layout.pp, "ep": self.layout.ep, "etp": self.layout.expert_tp,
                "world_size": self.world_size}

    def teardown(self) -> None:
        super().teardown()
        parallel.destroy()
