"""HFImportCallback: load an HF checkpoint into the sharded Megatron model before the first step.

Runs after the model is built and before the first optimizer step (or before validation in an eval
run). Each rank reads only the slices it needs; everything is validated on every rank first, so a bad
checkpoint changes no parameter. Skipped when Lightning resumes from its own checkpoint.
"""

from __future__ import annotations

import json
import os
import time

import lightning.pytorch as pl
import torch

from bridges import hf_config
from bridges.load import import_weights
from bridges.safetensors_io import SafetensorsCheckpoint
from callbacks.progress import say
from callbacks.hf_source import ImportedSource, mtp_tensor_names

TRAINER_STATE = "trainer_state.json"


class HFImportCallback(pl.Callback):
    def __init__(self, path: str | None = None, restore_progress: bool = True):
        self.path = path
        self.restore_progress = restore_progress
        self._done = False

    def on_fit_start(self, trainer, pl_module):
        if trainer.ckpt_path:
            say(f"hf_import: resuming from Lightning checkpoint {trainer.ckpt_path}; HF import skipped")
            self._done = True
            return
        self._load(trainer, pl_module, restore_progress=self.restore_progress)

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "validate":
            self._load(trainer, pl_module, restore_progress=False)

    def _load(self, trainer, pl_module, restore_progress: bool) -> None:
        if self._done or not self.path:
            return
        self._done = True
        start = time.monotonic()
        source = SafetensorsCheckpoint(self.path)
        config = hf_config.load_config(self.path)
        report = import_weights([pl_module.model], pl_module.family, pl_module.arch, source, config=config)
        dtype = hf_config.dtype(config, default=_usual_dtype(source))
        pl_module.hf_source = ImportedSource(
            path=os.path.abspath(self.path),
            config=config,
            dtype=dtype,
            expert_layout=report.expert_layout,
            mtp_tensors=mtp_tensor_names(source.keys(), pl_module.arch.num_layers),
        )
        for warning in report.warnings:
            say(f"hf_import: warning: {warning}")
        say(
            f"hf_import: loaded {self.path} ({report.expert_layout} experts) in {time.monotonic() - start:.2f}s"
            + (f"; {len(report.ignored)} tensors not used ({_reasons(report.ignored)})" if report.ignored else "")
        )
        if restore_progress:
            _restore_progress(trainer, self.path)


def _usual_dtype(source) -> torch.dtype:
    dtypes = [source.dtype(n) for n in source.keys()]
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32


def _reasons(ignored: dict[str, str]) -> str:
    return "; ".join(sorted(set(ignored.values())))


def _restore_progress(trainer, path: str) -> None:
    """Continue counting from an export of ours: global step and consumed samples."""
    state_file = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state_file):
        return
    with open(state_file) as f:
        state = json.load(f)
    step = int(state.get("global_step", 0))
    loop = trainer.fit_loop.epoch_loop
    loop.manual_optimization.optim_step_progress.total.completed = step
    loop.automatic_optimization.optim_progress.optimizer.step.total.completed = step
    loop._batches_that_stepped = step
    if trainer.datamodule is not None and hasattr(trainer.datamodule, "consumed_samples"):
        trainer.datamodule.consumed_samples = int(state.get("consumed_samples", 0))
    say(f"hf_import: continuing from global step {step} ({state.get('consumed_samples', 0)} samples consumed)")
