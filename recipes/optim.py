"""Optimizers and the learning-rate schedule: a torch AdamW on CPU, Megatron's distributed optimizer on GPU.

Megatron DDP accumulates gradients in `param.main_grad`; the CPU path hands those to torch's AdamW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 2
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad: float = 1.0


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def global_grad_norm(params) -> float:
    """L2 norm of the whole model's gradient, identical on every rank.

    Each gradient element counts once: TP-duplicated weights (norms) only on TP rank 0, tied
    copies once; dense squares are summed over TP x PP, expert squares over expert-TP x EP x PP.
    Clipping with a per-rank norm would scale data-parallel replicas differently.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    dense = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None or not param_is_not_shared(p):
            continue
        is_expert = not getattr(p, "allreduce", True)
        if not is_expert and not param_is_not_tensor_parallel_duplicate(p):
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if is_expert:
            expert += sq
        else:
            dense += sq
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        dist.all_reduce(dense, group=parallel_state.get_model_parallel_group())
        dist.all_reduce(expert, group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
    return float((dense + expert).sqrt())


class MainGradAdamW(torch.optim.AdamW):
    """AdamW reading Megatron DDP's reduced gradients from `param.main_grad`, with clipping by the
    global gradient norm (the same factor on every rank)."""

    def __init__(self, params, cfg: OptimConfig):
        super().__init__(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        self.clip_grad = cfg.clip_grad

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            main_grad = getattr(p, "main_grad", None)
            if main_grad is not None:
                p.grad = main_grad.to(p.dtype)
        if self.clip_grad:
            norm = global_grad_norm(params)
            if norm > self.clip_grad:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(self.clip_grad / (norm + 1e-6))
        return super().step(closure)


class MegatronOptimizerAdapter(torch.optim.Optimizer):
    """Presents Megatron's (distributed) optimizer to Lightning as a torch optimizer (GPU path)."""

    def __init__(self, ddp_model, cfg: OptimConfig, bf16: bool):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.inner = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=cfg.lr,
                min_lr=cfg.min_lr,
                weight_decay=cfg.weight_decay,
                adam_beta1=cfg.beta1,
                adam_beta2=cfg.beta2,
                clip_grad=cfg.clip_grad,
                bf16=bf16,
                use_distributed_optimizer=True,
            ),
            [ddp_model],
        )
        self.defaults = {}
        self.state = {}

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True):
        self.inner.zero_grad(set_to_none)

    def step(self, closure=None):
        if closure is not None:
            closure()
        return self.inner.step()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict)
