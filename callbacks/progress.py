"""Rank 0 prints one line per logged training step and each validation result (no progress bar)."""

from __future__ import annotations

import time

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only


@rank_zero_only
def say(message: str) -> None:
    """One console line from rank 0 (library loggers are kept quiet by train.py)."""
    print(message, flush=True)


# (logged metric, name on the line, format); a metric not logged this step is left out.
_STEP_FIELDS = (
    ("train/lm_loss", "lm_loss", ".4g"),
    ("train/mtp_loss", "mtp_loss", ".4g"),
    ("lr", "lr", ".4g"),
    ("train/grad_norm", "grad_norm", ".3g"),
    ("perf/tokens_per_second", "tokens/s", ".0f"),
    ("perf/tflops_per_second", "TFLOP/s", ".3g"),
    ("perf/peak_memory_gib", "peak_mem_GiB", ".2f"),
)


class PrintProgress(pl.Callback):
    def __init__(self, every_n_steps: int = 1):
        self.every_n_steps = max(int(every_n_steps), 1)
        self._start = None

    def on_train_start(self, trainer, pl_module):
        self._start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if trainer.global_rank != 0 or (step % self.every_n_steps and step != trainer.max_steps):
            return
        m = trainer.callback_metrics
        parts = [f"step {step}/{trainer.max_steps}"]
        for key, shown, fmt in _STEP_FIELDS:
            if key in m:
                parts.append(f"{shown}={float(m[key]):{fmt}}")
        parts.append(f"{time.monotonic() - self._start:.1f}s")
        print("  ".join(parts), flush=True)

    def on_validation_end(self, trainer, pl_module):
        if trainer.global_rank == 0 and "val/lm_loss" in trainer.callback_metrics:
            print(f"validation at step {trainer.global_step}: val/lm_loss={float(trainer.callback_metrics['val/lm_loss']):.6g}", flush=True)
