"""LightningModule for a Megatron-Core GPT model (MoE, MTP) defined by an HF `config.json`.

The model is built in `configure_model` for this rank's parallel position; a training step runs
Megatron's forward/backward schedule over the step's micro-batches (LM loss plus the MTP loss
scaled by the recipe factor when MTP is on); validation reports the LM loss only.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from bridges import dtypes
from bridges.checkpoint import hf_config
from bridges.imported import ImportedCheckpoint
from bridges.megatron import build
from bridges.megatron.knobs import ModelKnobs
from bridges.models import family_for
from recipes.flops import training_flops_per_token
from recipes.optim import MegatronOptimizer, OptimConfig


class MegatronGPTModule(pl.LightningModule):
    model_input_keys: tuple[str, ...] = ()  # batch entries passed to the model as keyword inputs
    def __init__(
        self,
        hf_config_path: str,
        mtp_enabled: bool = True,
        mtp_loss_factor: float = 0.1,
        params_dtype: str = "fp32",  # a trainer.precision name (bridges.dtypes)
        micro_batch_size: int = 2,
        optim: dict[str, Any] | None = None,
        knobs: ModelKnobs | None = None,
        source_hf_config: dict[str, Any] | None = None,  # the contents of hf_config_path, when already read
    ):
        super().__init__()
        self.automatic_optimization = False
        self.hf_config_path = hf_config_path
        self.source_hf_config = source_hf_config if source_hf_config is not None else hf_config.load_config(hf_config_path)
        self.family = family_for(self.source_hf_config)
        arch = self.family.architecture(self.source_hf_config)
        # MTP off: no MTP block is built and the layer count is cleared so nothing re-enables it.
        self.arch = arch if mtp_enabled else arch.without_mtp()
        self.mtp_loss_factor = mtp_loss_factor
        self.params_dtype = dtypes.params_dtype(params_dtype)
        self.micro_batch_size = micro_batch_size
        self.optim_cfg = OptimConfig(**(optim or {}))
        self.knobs = knobs or ModelKnobs()
        self.model = None
        self.ddp_model = None
        self.hf_source: ImportedCheckpoint | None = None  # the HF checkpoint imported, once the import callback ran
        self._val_sums = None
        self.last_metrics: dict[str, float] = {}

    # ----------------------------------------------------------------- construction
    @property
    def mtp_enabled(self) -> bool:
        return self.arch.mtp_num_layers > 0

    @property
    def layout(self):
        return self.trainer.strategy.layout

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.layout.check_model(dist.get_world_size(), self.arch)
        self.model = self.build_model()

    def build_model(self):
        """This rank's Megatron model (subclasses build other GPTModel kinds)."""
        return build.build_gpt_model(
            self.arch, self.layout, self.params_dtype, mtp_loss_scaling_factor=self.mtp_loss_factor, knobs=self.knobs
        )

    def configure_optimizers(self):
        return MegatronOptimizer(self.ddp_model, self.optim_cfg, self.params_dtype, self.trainer.max_steps)

    def reload_optimizer_weights(self) -> None:
        """The model's weights changed outside the optimizer (an import): copy them into its fp32 masters,
        or its next step would write the old weights back."""
        if self.trainer.optimizers:
            self.trainer.optimizers[0].reload_model_params()

    def gather_updated_params(self) -> None:
        """Make this rank's parameters current before something reads them between steps (an HF export).
        With `ddp.overlap_param_gather`, Megatron's DDP all-gathers the shards the distributed optimizer updated
        only at the next forward, so until then a rank holds last step's values of its peers' shards. Collective
        over the data-parallel groups (every rank exports at the same step); the next forward skips its gather."""
        if self.ddp_model is not None and self.ddp_model.ddp_config.overlap_param_gather:
            self.ddp_model.start_param_sync(force_sync=True)

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["consumed_samples"] = self.global_step * self.trainer.datamodule.global_batch_size

    def on_load_checkpoint(self, checkpoint) -> None:
        # The data continues where the checkpointed run stopped (Lightning does not skip map-style rows).
        if self.trainer.datamodule is not None:
            self.trainer.datamodule.consumed_samples = int(checkpoint.get("consumed_samples", 0))

    # ----------------------------------------------------------------- steps
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"]
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        seq = inputs.shape[1]
        loss_mask = batch["weight"].to(torch.float32)[:, None].expand(-1, seq).contiguous()
        if "loss_mask" in batch:  # per-token weights from the data (e.g. no loss on image placeholders)
            loss_mask = loss_mask * batch["loss_mask"].to(torch.float32)
        position_ids = torch.arange(seq, device=inputs.device).expand_as(inputs)
        mask = build.causal_attention_mask(seq, device=inputs.device)
        extra = {key: batch[key] for key in self.model_input_keys if key in batch}
        output = model(inputs, position_ids, mask, labels=labels, loss_mask=loss_mask, **extra)
        return output, partial(_masked_loss, loss_mask)

    def _run_schedule(self, batch, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        tokens = batch["tokens"]
        micro = self.micro_batch_size
        n_micro = tokens.shape[0] // micro
        # Every batch entry holds one row per sample (tokens, weight, and e.g. each sample's image).
        microbatches = [{k: v[i * micro : (i + 1) * micro] for k, v in batch.items()} for i in range(n_micro)]
        model = self.ddp_model if (self.ddp_model is not None and not forward_only) else self.model
        return get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=n_micro,
            seq_length=tokens.shape[1] - 1,
            micro_batch_size=micro,
            forward_only=forward_only,
        )

    def training_step(self, batch, batch_idx):
        started = time.perf_counter()
        optimizer = self.optimizers()
        megatron_optimizer = optimizer.optimizer
        megatron_optimizer.set_step(self.global_step)
        self.ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        outputs = self._run_schedule(batch, forward_only=False)  # grads reduced by finalize_model_grads
        optimizer.step()  # clips by the global grad norm, steps the fp32 masters, copies them to the model
        loss_sum, tokens = _sum_outputs(outputs)
        lm_loss = self._on_all_ranks(self._data_parallel_mean(loss_sum, tokens))
        metrics = {"train/lm_loss": lm_loss, "lr": megatron_optimizer.lr}
        if megatron_optimizer.grad_norm is not None:
            metrics["train/grad_norm"] = megatron_optimizer.grad_norm
        if self.mtp_enabled:
            metrics["train/mtp_loss"] = self._on_all_ranks(self._mtp_loss(len(outputs) or 1))
        metrics.update(self._throughput(batch["tokens"], time.perf_counter() - started))
        self.log_dict(metrics, prog_bar=True, on_step=True, batch_size=batch["tokens"].shape[0])
        self.last_metrics.update({k: float(v) for k, v in metrics.items() if k.startswith("train/")})

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64)

    def validation_step(self, batch, batch_idx):
        loss_sum, tokens = _sum_outputs(self._run_schedule(batch, forward_only=True))
        self._val_sums += torch.tensor([loss_sum, tokens], dtype=torch.float64)

    def on_validation_epoch_end(self) -> None:
        # Mean next-token NLL over every validation token of every data-parallel rank.
        val = self._on_all_ranks(self._data_parallel_mean(*self._val_sums.tolist()))
        self.log("val/lm_loss", val, prog_bar=True, sync_dist=False)
        self.last_metrics["val/lm_loss"] = float(val)

    def _throughput(self, tokens: torch.Tensor, seconds: float) -> dict[str, float]:
        """Step time, trained tokens per second over all data-parallel ranks, model TFLOP/s (families with a
        FLOPs formula: recipes/flops.py) and this rank's peak memory."""
        from megatron.core import parallel_state

        rows, seq = tokens.shape[0], tokens.shape[1] - 1  # inputs are tokens[:, :-1]
        step_tokens = rows * seq * parallel_state.get_data_parallel_world_size()
        out = {"perf/step_seconds": seconds, "perf/tokens_per_second": step_tokens / seconds,
               "perf/peak_memory_gib": peak_memory_gib(self.device)}
        flops = training_flops_per_token(self.arch, seq)
        if flops is not None:
            out["perf/tflops_per_second"] = flops * step_tokens / seconds / 1e12
        return out

    # ----------------------------------------------------------------- reductions
    def _data_parallel_mean(self, loss_sum: float, tokens: float) -> float:
        from megatron.core import parallel_state

        if not parallel_state.is_pipeline_last_stage():
            return 0.0
        sums = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        return float(sums[0] / sums[1].clamp(min=1))

    def _on_all_ranks(self, value: float) -> float:
        """The last pipeline stage's value, on every stage (so any rank can log it)."""
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(
            t,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        return float(t[0])

    def _mtp_loss(self, num_microbatches: int) -> float:
        from megatron.core import parallel_state
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        tracker = MTPLossLoggingHelper.tracker
        if not parallel_state.is_pipeline_last_stage() or "values" not in tracker:
            return 0.0
        MTPLossLoggingHelper.reduce_loss_in_tracker()  # averages over data-parallel ranks
        value = float(tracker["values"].mean()) / num_microbatches
        MTPLossLoggingHelper.clean_loss_in_tracker()
        return value


def peak_memory_gib(device: torch.device) -> float:
    """The most memory this rank has held: allocated on the GPU, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _masked_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron loss contract: (summed loss, token count, values to report)."""
    losses = per_token_loss.float() * loss_mask
    total = losses.sum()
    tokens = loss_mask.sum().to(torch.int)
    return total, tokens, {"lm_loss": torch.stack([total.detach(), tokens.detach().float()])}


def _sum_outputs(outputs) -> tuple[float, float]:
    """Sum of per-token losses and token count over the step's micro-batches (last stage only)."""
    loss_sum = sum(float(o["lm_loss"][0]) for o in outputs)
    tokens = sum(float(o["lm_loss"][1]) for o in outputs)
    return loss_sum, tokens
