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

from bridges.checkpoint import hf_config
from bridges.checkpoint.files import CheckpointFileError, check_regular_file
from bridges.export.snapshot import wait_for_snapshots
from bridges.imported import import_checkpoint, open_checkpoint
from bridges.rank_status import first_failure
from callbacks.progress import say

TRAINER_STATE = "trainer_state.json"


class HFImportError(ValueError):
    """The import source, its companion files or its trainer state cannot be used (agreed by every rank)."""


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
        opened, error = None, None
        try:  # every check that reads files, before any collective of the import
            opened = open_checkpoint(self.path, pl_module.family, _source_config(self.path, pl_module))
            state = read_trainer_state(self.path, trainer.max_steps) if restore_progress else None
        except Exception as e:  # noqa: BLE001 - agreed below, so no rank waits in a collective alone
            error = e
        _agree_on_opening(self.path, error)
        wait_for_snapshots()  # an export's snapshot may still be reading the weights the import replaces
        pl_module.hf_source, report = import_checkpoint([pl_module.model], pl_module.family, pl_module.arch, opened)
        if hasattr(pl_module, "reload_optimizer_weights"):
            pl_module.reload_optimizer_weights()  # the fp32 masters start from the imported weights
        for warning in report.warnings:
            say(f"hf_import: warning: {warning}")
        say(
            f"hf_import: loaded {self.path} ({report.expert_layout} experts) in {time.monotonic() - start:.2f}s"
            + (f"; {len(report.ignored)} tensors not used ({_reasons(report.ignored)})" if report.ignored else "")
        )
        if state is not None:
            _restore_progress(trainer, state)


def _source_config(path: str, pl_module) -> dict:
    """The import source's HF config: the one the module was built from when it is the same file (read once)."""
    built_from = getattr(pl_module, "hf_config_path", None)
    if built_from and os.path.realpath(hf_config.config_path(built_from)) == os.path.realpath(hf_config.config_path(path)):
        return pl_module.source_hf_config
    return hf_config.load_config(path)


def _reasons(ignored: dict[str, str]) -> str:
    return "; ".join(sorted(set(ignored.values())))


def _agree_on_opening(path: str, error: BaseException | None) -> None:
    """Raise `HFImportError` on every rank if any rank could not open the source: this rank's reason, else
    the first failing rank's, in one line."""
    failure = first_failure(error)
    if error is not None:
        raise HFImportError(f"HF import of {path}: {error}") from error
    if failure is not None:
        raise HFImportError(f"HF import of {path} failed on rank {failure[0]}: {failure[1]}")


def read_trainer_state(path: str, max_steps: int | None) -> dict | None:
    """The validated `trainer_state.json` of an export of ours (None when there is none): `global_step` and
    `consumed_samples` non-negative integers, and steps left before `max_steps`. Raises `HFImportError`."""
    state_file = os.path.join(path, TRAINER_STATE)
    if not os.path.lexists(state_file):
        return None
    try:
        check_regular_file(state_file)
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    except CheckpointFileError as e:
        raise HFImportError(str(e)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise HFImportError(f"{state_file}: not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise HFImportError(f"{state_file}: expected a JSON object, found a {type(state).__name__}")
    for key in ("global_step", "consumed_samples"):
        value = state.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise HFImportError(f"{state_file}: {key} must be a non-negative integer, found {value!r}")
    step = state.get("global_step", 0)
    if max_steps is not None and max_steps > 0 and step >= max_steps:
        raise HFImportError(
            f"{state_file}: global_step {step} is not below trainer.max_steps={max_steps}, nothing would be "
            f"trained (raise trainer.max_steps, or hf_import.restore_progress=false to start counting at 0)"
        )
    return state


def _restore_progress(trainer, state: dict) -> None:
    """Continue counting from an export of ours: global step and consumed samples."""
    step = state.get("global_step", 0)
    loop = trainer.fit_loop.epoch_loop
    loop.manual_optimization.optim_step_progress.total.completed = step
    loop.automatic_optimization.optim_progress.optimizer.step.total.completed = step
    loop._batches_that_stepped = step
    if trainer.datamodule is not None and hasattr(trainer.datamodule, "consumed_samples"):
        trainer.datamodule.consumed_samples = state.get("consumed_samples", 0)
    say(f"hf_import: continuing from global step {step} ({state.get('consumed_samples', 0)} samples consumed)")
