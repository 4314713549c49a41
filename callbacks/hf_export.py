"""HFExportCallback: write HF checkpoints every N steps and at the end, while training goes on.

At an export step every rank records which of its tensors hold the HF pieces it owns (its experts, its
pipeline stage's layers, its TP shard; one data-parallel replica) and returns to training at once: a
background thread copies them to host memory while the next step's forward and backward run (parameters
do not change there; the optimizer step, the router's expert-bias update, an import and a checkpoint load
wait for the copy, see bridges/export/snapshot.py), then writes them straight into the final safetensors
files over a process group of its own, and rank 0 adds config, tokenizer files and trainer state. The
directory is written under a staging name and renamed into place only when complete. The export plan is
made at the first export and reused while the model, layout and dtype stay the same. Decisions use step
counts only, so every rank agrees.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace

import lightning.pytorch as pl
import torch.distributed as dist

from bridges import dtypes
from bridges.checkpoint.hf_config import with_legacy_spellings
from bridges.checkpoint.pieces import Piece, PieceSpec
from bridges.export import directory as export_dir
from bridges.export.snapshot import HostBuffers, LazySnapshot
from bridges.export.specs import OwnedParam, hf_tensor_specs, owned_params, pieces_of
from bridges.export.writer import DEFAULT_MAX_SHARD_BYTES, PlanCache, write_checkpoint
from bridges.rank_status import agree, first_failure
from callbacks.progress import say



class HFExportError(RuntimeError):
    """An export failed on some rank (all ranks agree on it); the previous complete export is untouched."""


@dataclass
class _Job:
    step: int
    final: str
    owned: list[OwnedParam]  # this rank's pieces, made one at a time while writing
    carried: Iterable[Piece]  # and after them these (rank 0: the source's MTP tensors, read while writing)
    piece_specs: list[PieceSpec]  # announced beforehand
    specs: dict
    config: dict
    trainer_state: dict
    companions: list[tuple[str, str]]  # (name, resolved path) in the import source
    snapshot_seconds: float
    started: float
    snapshot: LazySnapshot | None = None  # async: host copies of the owned tensors, made by the writer thread
    error: BaseException | None = None
    seconds: float = 0.0
    nbytes: int = 0


class HFExportCallback(pl.Callback):
    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int | None = None,
        save_last: bool = True,
        keep_last_k: int | None = None,
        dtype: str | None = None,
        async_write: bool = True,
        mtp_passthrough: bool = False,
        mode: str = "owner",
        on_error: str = "raise",
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        recipe: str | None = None,
        group_timeout_minutes: float = 120.0,
    ):
        if on_error not in ("raise", "warn"):
            raise ValueError(f"hf_export.on_error must be 'raise' or 'warn', got {on_error!r}")
        if mode not in ("owner", "gather"):
            raise ValueError(f"hf_export.mode must be 'owner' or 'gather', got {mode!r}")
        if dtype is not None and dtype not in dtypes.DTYPE_NAMES:
            raise ValueError(f"hf_export.dtype must be one of {sorted(dtypes.DTYPE_NAMES)} or null, got {dtype!r}")
        if not group_timeout_minutes or group_timeout_minutes <= 0:
            raise ValueError(f"hf_export.group_timeout_minutes must be > 0, got {group_timeout_minutes}")
        if keep_last_k is not None and keep_last_k < 1:
            raise ValueError(f"hf_export.keep_last_k must be >= 1 or null, got {keep_last_k}")
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps or 0
        self.save_last = save_last
        self.keep_last_k = keep_last_k
        self.dtype = dtypes.DTYPE_NAMES[dtype] if dtype else None
        self.async_write = async_write
        self.mtp_passthrough = mtp_passthrough
        self.mode = mode
        self.on_error = on_error
        self.max_shard_bytes = max_shard_bytes
        self.recipe = recipe
        self.group_timeout = datetime.timedelta(minutes=group_timeout_minutes)
        self._group = None
        self._thread: threading.Thread | None = None
        self._job: _Job | None = None
        self._exported_steps: set[int] = set()
        self._owned: tuple[tuple, tuple] | None = None  # (what they depend on, (owned parameters, tensor specs))
        self._plan_cache = PlanCache()  # the agreed file plan, reused while the pieces stay the same
        self._host_buffers = HostBuffers()  # snapshot buffers, reused from one export to the next
        self.history: list[dict] = []  # one entry per finished export (rank-local timings)
        self.failures = 0  # exports that failed under on_error=warn
        self.run_id: str | None = None  # this run's id: in the lock, the staging names and every trainer_state
        self._locked = False

    # ----------------------------------------------------------------- Lightning hooks
    def on_fit_start(self, trainer, pl_module):
        self.dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "hf")
        # Writing collectives run beside training: a group of their own, created by every rank.
        # Its timeout bounds how long a rank waits for the slowest writer of a large export.
        self._group = dist.new_group(backend="gloo", timeout=self.group_timeout) if dist.is_initialized() else None
        self.run_id = self._rank0_value(trainer, uuid.uuid4().hex[:12])  # staging names agree on every rank
        error = None
        if trainer.global_rank == 0:
            try:  # this run owns the root from here on: a second live run is refused
                export_dir.check_root(self.dirpath, ())
                os.makedirs(self.dirpath, exist_ok=True)
                note = export_dir.acquire_lock(self.dirpath, self.run_id)
                self._locked = True
                if note:
                    say(f"hf_export: {self.dirpath}: {note}")
                leftovers = export_dir.leftover_staging(self.dirpath)
                if leftovers:
                    say(f"hf_export: {self.dirpath} holds {len(leftovers)} unfinished export directories of "
                        f"earlier runs ({', '.join(leftovers)}); left in place, remove them if unused")
            except (OSError, export_dir.ExportDirError) as e:
                error = e
        self._raise_if_any_failed(error)

    def on_train_start(self, trainer, pl_module):
        """Now that the start step is known (an import or a resumed checkpoint): refuse before training
        if an export name this run will write is taken, rather than skip that export later."""
        error = None
        if trainer.global_rank == 0:
            try:
                export_dir.check_root(self.dirpath, self._planned_steps(trainer.global_step, trainer.max_steps))
            except export_dir.ExportDirError as e:
                error = e
        self._raise_if_any_failed(error)

    def _planned_steps(self, start: int, max_steps: int) -> set[int]:
        if max_steps is None or max_steps < 0:  # no known end: the periodic steps cannot be listed
            return set()
        steps = set(range(start + 1, max_steps + 1))
        planned = {s for s in steps if self.every_n_train_steps and s % self.every_n_train_steps == 0}
        return planned | ({max_steps} if self.save_last and max_steps > start else set())

    def _raise_if_any_failed(self, error: BaseException | None) -> None:
        failure = first_failure(error, self._group)
        if failure is not None:
            self._release_lock()
            raise export_dir.ExportDirError(failure[1] if error is not None else
                                            f"HF export set-up failed on rank {failure[0]}: {failure[1]}")

    def on_fit_end(self, trainer, pl_module):
        self._release_lock()

    def _release_lock(self) -> None:
        if self._locked:
            self._locked = False
            export_dir.release_lock(self.dirpath, self.run_id)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.save_last and trainer.global_step > 0:
            self.export(trainer, pl_module)
        self._finish_pending(trainer)

    def on_exception(self, trainer, pl_module, exception):
        if self._thread is not None:
            self._thread.join(timeout=300)
        if self._thread is None or not self._thread.is_alive():
            self._release_lock()  # a writer still running keeps it: the process's exit makes it stale

    # ----------------------------------------------------------------- export
    def export(self, trainer, pl_module) -> None:
        """Export the current weights as `<dirpath>/step_<global_step>` (collective: every rank calls it)."""
        step = trainer.global_step
        if step in self._exported_steps:
            return
        self._exported_steps.add(step)
        blocked_from = time.monotonic()
        self._finish_pending(trainer)
        final = os.path.join(self.dirpath, export_dir.export_name(step))
        if self._rank0_says(trainer, os.path.lexists(final)):  # appeared since the start-up check
            self._fail(trainer, step, HFExportError(f"HF export of step {step}: {final} already exists and was "
                                                    f"not written by this run; not replaced"), None)
            return
        job, error = None, None
        pl_module.gather_updated_params()  # the weights after step N on every rank, not only its own shard
        try:
            job = self._prepare(trainer, pl_module, step, final)
        except Exception as e:  # agreed by every rank before anyone writes or raises
            error = e
        try:
            agree(error, "export: preparing", self._group)
        except Exception as e:
            self._fail(trainer, step, HFExportError(f"HF export of step {step} to {final} failed: {e}"), e)
            return
        if self.async_write:
            # The lazy snapshot: recorded now, copied by the writer thread while the next step computes.
            job.snapshot = LazySnapshot([o.param.tensor for o in job.owned], self._host_buffers)
            self._job = job
            self._thread = threading.Thread(target=self._write, args=(job, trainer.global_rank), daemon=True)
            self._thread.start()
        else:
            self._write(job, trainer.global_rank)
            self._job = job
        stall = time.monotonic() - blocked_from
        self._log(trainer, {"hf_export/stall_seconds": stall}, step)
        if not self.async_write:
            self._finish_pending(trainer)

    def _prepare(self, trainer, pl_module, step: int, final: str) -> _Job:
        """What this rank writes, plus what rank 0 adds."""
        start = time.monotonic()
        source = pl_module.hf_source
        dtype = self.dtype or (source.dtype if source else pl_module.params_dtype)
        layout = source.expert_layout if source else None
        arch = pl_module.arch
        owned, specs = self._owned_params(pl_module, dtype, layout)
        piece_specs, carried = [spec for o in owned for _, spec in o.pieces], ()
        config_arch = arch
        if self.mtp_passthrough and not pl_module.mtp_enabled and source and source.mtp_tensors:
            # MTP off in this run: carry the source's MTP tensors through unchanged, keep its count.
            config_arch = replace(arch, mtp_num_layers=source.mtp_layers)
            carried = source.mtp_specs()
            specs = {**specs, **{c.hf_name: (c.hf_shape, c.dtype) for c in carried}}
            if trainer.global_rank == 0:  # rank 0 writes them, read from the source while writing
                piece_specs = piece_specs + carried
                carried = source.read_pieces(carried)
            else:
                carried = ()
        # Spelled for transformers 4.x and 5.x alike (servers still run 4.x).
        config = with_legacy_spellings(pl_module.family.hf_config(config_arch, source.config if source else None, dtype))
        datamodule = trainer.datamodule
        gbs = getattr(datamodule, "global_batch_size", None)
        layout_info = trainer.strategy.layout
        trainer_state = {
            "global_step": step,
            "consumed_samples": step * gbs if gbs else None,
            "recipe": self.recipe,
            "parallel": {"tp": layout_info.tp, "pp": layout_info.pp, "ep": layout_info.ep, "etp": layout_info.expert_tp,
                         "world_size": trainer.world_size},
            "dtype": dtypes.hf_name(dtype),
            "mtp_enabled": pl_module.mtp_enabled,
            "import_source": source.path if source else None,
            "run_id": self.run_id,
        }
        companions = list(source.companions) if source else []
        now = time.monotonic()
        return _Job(step, final, owned, carried, piece_specs, specs, config, trainer_state, companions, now - start, now)

    def _owned_params(self, pl_module, dtype, layout) -> tuple[list[OwnedParam], dict]:
        """This rank's owned parameters and pieces, and the tensor specs of the whole export: computed at the
        first export and kept while the model, the layout and the dtype stay the same."""
        family, arch = pl_module.family, pl_module.arch
        key = (id(pl_module.model), family, arch, dtype, layout)
        if self._owned is None or self._owned[0] != key:
            owned = owned_params([pl_module.model], family, arch, dtype, layout)
            self._owned = (key, (owned, hf_tensor_specs(family, arch, dtype, layout)))
        return self._owned[1]

    def _write(self, job: _Job, global_rank: int) -> None:
        """Collective over the export group; records the outcome in the job (agreed by all ranks)."""
        staging = export_dir.staging_dir(job.final, self.run_id)
        try:
            # First the snapshot's copy (the next optimizer step waits for it); sync: the parameters themselves.
            tensors = job.snapshot.copy() if job.snapshot is not None else None
            if global_rank == 0 and os.path.exists(staging):
                shutil.rmtree(staging)
            pieces = itertools.chain(pieces_of(job.owned, tensors, copy=False), job.carried)
            write_checkpoint(pieces, job.specs, staging, group=self._group, max_shard_bytes=self.max_shard_bytes,
                             mode=self.mode, piece_specs=job.piece_specs, plan_cache=self._plan_cache)
            job.nbytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in job.specs.values())
            self._release(job)  # the host copies serve the next snapshot
            job.seconds = time.monotonic() - job.started + job.snapshot_seconds
            error = None
            if global_rank == 0:
                try:
                    self._finalize(job, staging)
                except Exception as e:  # agreed below, so no rank waits for rank 0
                    error = e
            agree(error, "export: writing config and publishing", self._group)
        except BaseException as e:
            job.error = e
            self._release(job)
            if global_rank == 0 and os.path.exists(staging):
                shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _release(job: _Job) -> None:
        if job.snapshot is not None:  # copied first if it was not (a failure): no parameter write is left waiting
            job.snapshot.release()
            job.snapshot = None

    def _finalize(self, job: _Job, staging: str) -> None:
        _write_json(os.path.join(staging, "config.json"), job.config)
        for name, path in job.companions:  # resolved paths, checked to lie inside the source at import
            shutil.copyfile(path, os.path.join(staging, name))
        _write_json(os.path.join(staging, "trainer_state.json"), {**job.trainer_state, "export_seconds": job.seconds})
        export_dir.publish(staging, job.final)
        root, name = os.path.split(job.final)
        export_dir.update_latest(root, name)
        if self.keep_last_k:  # this run's exports only, never the import source
            export_dir.prune(root, self.keep_last_k, self.run_id, protect=[job.trainer_state["import_source"]])

    def _finish_pending(self, trainer) -> None:
        """Wait for the previous export; report it, and fail (or warn) if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        job, self._job = self._job, None
        if job is None:
            return
        if job.error is not None:
            self._fail(trainer, job.step,
                       HFExportError(f"HF export of step {job.step} to {job.final} failed: {job.error}"), job.error)
            return
        self.history.append({"step": job.step, "seconds": job.seconds, "bytes": job.nbytes, "path": job.final})
        self._log(trainer, {"hf_export/seconds": job.seconds, "hf_export/bytes": float(job.nbytes)}, job.step)
        rate = job.nbytes / max(job.seconds, 1e-9) / 2**20
        say(f"hf_export: step {job.step} -> {job.final} ({job.nbytes / 2**20:.1f} MiB in {job.seconds:.2f}s, {rate:.0f} MiB/s)")

    def _rank0_says(self, trainer, answer: bool) -> bool:
        """Rank 0's answer on every rank: a filesystem check must not split ranks at a collective."""
        return bool(self._rank0_value(trainer, answer))

    def _rank0_value(self, trainer, value):
        if self._group is None:
            return value
        box = [value if trainer.global_rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def _fail(self, trainer, step: int, error: HFExportError, cause: BaseException | None) -> None:
        if self.on_error == "warn":  # a line the user sees (stderr, rank 0) and a metric, per failed export
            self.failures += 1
            if trainer.global_rank == 0:
                print(f"warning: {error} (training continues: hf_export.on_error=warn)", file=sys.stderr, flush=True)
            self._log(trainer, {"hf_export/failures": float(self.failures)}, step)
            return
        raise error from cause

    def _log(self, trainer, metrics: dict, step: int) -> None:
        if trainer.global_rank == 0:
            for logger in trainer.loggers:  # every configured logger (logger=[csv,tensorboard])
                logger.log_metrics(metrics, step=step)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
