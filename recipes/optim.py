"""The optimizer and its learning-rate schedule: Megatron-Core's distributed optimizer on every device.

Adam with fp32 master weights for bf16 parameters, its gradient clipping by the global norm, its
optimizer state sharded over data-parallel ranks; Megatron's `OptimizerParamScheduler` drives the
learning rate (linear warm-up, then cosine decay to `min_lr` at `max_steps`). The same code runs on CPU
(through bridges/megatron/cpu_runtime.py) and on GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from bridges.export.snapshot import wait_for_snapshots


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 2
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad: float = 1.0


class MegatronOptimizer(torch.optim.Optimizer):
    """Megatron's (distributed) optimizer and LR scheduler, presented to Lightning as a torch optimizer.

    `step()` sets the learning rate of the step about to run (from the number of steps done), clips and
    steps; `grad_norm` is the last step's global gradient norm (before clipping).
    """

    def __init__(self, ddp_model, cfg: OptimConfig, params_dtype: torch.dtype, max_steps: int):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.inner = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=cfg.lr,
                min_lr=cfg.min_lr,
                weight_decay=cfg.weight_decay,
                adam_beta1=cfg.beta1,
                adam_beta2=cfg.beta2,
                clip_grad=cfg.clip_grad,
                bf16=params_dtype == torch.bfloat16,
                fp16=params_dtype == torch.float16,
                params_dtype=params_dtype,
                use_distributed_optimizer=True,
            ),
            [ddp_model],
            # Gradients and optimizer state use the default (gloo on CPU, NCCL on GPU) groups.
            use_gloo_process_groups=False,
        )
        warmup = max(int(cfg.warmup_steps), 0)
        self.scheduler = OptimizerParamScheduler(
            self.inner,
            init_lr=0.0,
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=max(int(max_steps), warmup + 1),
            lr_decay_style="cosine",
            start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay,
            wd_incr_steps=max(int(max_steps), 1),
            wd_incr_style="constant",
        )
        for opt in self.distributed_optimizers():
            opt._set_main_param_and_optimizer_states = partial(_set_loaded_states, opt)
        self.grad_norm: float | None = None
        self.defaults = {}
        self.state = {}

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def lr(self) -> float:
        return float(self.inner.param_groups[0]["lr"])

    def set_step(self, steps_done: int) -> None:
        """Learning rate for the step after `steps_done` completed ones (warm-up reaches `lr` at step
        `warmup_steps`, counted from 1)."""
        self.scheduler.step(steps_done + 1 - self.scheduler.num_steps)

    def zero_grad(self, set_to_none: bool = True):
        self.inner.zero_grad(set_to_none)

    def step(self, closure=None):
        if closure is not None:
            closure()
        wait_for_snapshots()  # an export's lazy snapshot reads the weights this step is about to change
        ok, grad_norm, _ = self.inner.step()
        self.grad_norm = None if grad_norm is None else float(grad_norm)
        return ok

    def reload_model_params(self) -> None:
        """Copy the model's weights into the fp32 masters (after weights were loaded outside the optimizer)."""
        self.inner.reload_model_params()

    def distributed_optimizers(self) -> list:
        """Megatron's optimizers behind this one (dense and expert parameters are stepped apart)."""
        return list(getattr(self.inner, "chained_optimizers", [self.inner]))

    def adam_step(self) -> int:
        """Adam's step count (the same for every parameter)."""
        for opt in self.distributed_optimizers():
            for state in opt.optimizer.state.values():
                if "step" in state:
                    return int(state["step"])
        return 0

    def prepare_state_for_loading(self) -> None:
        """Give every parameter range Adam state before a checkpoint is loaded into it: Megatron-Core 0.16's
        distributed optimizer reads the step count from that state, which torch's Adam (used without
        Transformer Engine or apex) creates only at the first step. A step with zero gradients creates it;
        the checkpoint then overwrites masters, moments and step."""
        for opt in self.distributed_optimizers():
            if len(opt.optimizer.state) == 0:
                opt._init_optimizer_states_with_dummy_values()

    def unshare_adam_steps(self) -> None:
        """Megatron-Core 0.16 loads torch Adam's per-parameter `step` as one tensor shared by every
        parameter, which each parameter's update then increments: give each its own."""
        for opt in self.distributed_optimizers():
            for state in opt.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()

    def state_dict(self):
        raise NotImplementedError("the optimizer state is saved in sharded checkpoints (recipes/checkpoint.py)")

    def load_state_dict(self, state_dict):
        raise NotImplementedError("the optimizer state is loaded from sharded checkpoints (recipes/checkpoint.py)")


@torch.no_grad()
def _set_loaded_states(opt, model_param, tensors) -> None:
    """`DistributedOptimizer._set_main_param_and_optimizer_states` copying only the states the checkpoint
    holds: Megatron-Core 0.16's version also asks for torch Adam's `step`, which its own loader leaves out
    (the step comes back through the param groups)."""
    group_index, group_order = opt.model_param_group_index_map[model_param]
    main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
    targets = {"param": main_param, **opt.optimizer.state[main_param]}
    for key, value in tensors.items():
        targets[key].copy_(value)
