"""Rank 0 writes `metrics.json` (last train/lm_loss, val/lm_loss, global step) at the end of fit or validate."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl


class MetricsFile(pl.Callback):
    def __init__(self, path: str):
        self.path = path

    def _write(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        metrics = dict(getattr(pl_module, "last_metrics", {}))
        metrics["global_step"] = trainer.global_step
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
        os.replace(tmp, self.path)

    def on_fit_end(self, trainer, pl_module):
        self._write(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module)
