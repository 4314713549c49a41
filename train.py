"""Entry point: compose the Hydra config, build strategy + module + data + callbacks, then fit or validate.

    python train.py recipe=glm45 trainer.max_steps=50 parallel.ep=2
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))
# Megatron-Core orders tensor-parallel communication and compute on one CUDA queue (before CUDA starts).
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

# `${if_null:a,b}`: a unless it is null, else b (recipes default model.hf_config to the import source).
OmegaConf.register_new_resolver("if_null", lambda value, default: default if value is None else value, replace=True)
# `${run_stamp:FORMAT}`: the run's start time as global rank 0 saw it (one run directory for all ranks).
OmegaConf.register_new_resolver("run_stamp", lambda fmt=None: _run_stamp(fmt), replace=True)


def _run_stamp(fmt: str | None) -> str:
    from recipes import run_dir

    return run_dir.run_stamp(fmt or run_dir.DEFAULT_FORMAT)


def devices_per_node(devices, accelerator: str) -> int:
    """`trainer.devices` as a process count: an int, a list of device ids, or `auto` / -1 (every GPU of
    the node on GPU, the launcher's processes per node under torchrun / srun, else 1)."""
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    if str(devices) not in ("auto", "-1"):
        try:
            count = int(devices)
        except ValueError:
            raise ValueError(f"trainer.devices must be a positive int, a list of device ids or 'auto', got {devices!r}")
        if count < 1:
            raise ValueError(f"trainer.devices must be >= 1 (or 'auto' / -1), got {count}")
        return count
    if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if "SLURM_NTASKS_PER_NODE" in os.environ and os.environ["SLURM_NTASKS_PER_NODE"].isdigit():
        return int(os.environ["SLURM_NTASKS_PER_NODE"])
    import torch

    from bridges.megatron.cpu_runtime import default_device

    if accelerator in ("gpu", "cuda", "auto") and default_device() == "cuda":
        return torch.cuda.device_count()
    return 1


def resolve_path(path: str) -> str:
    """Paths in recipes are relative to the working directory, else to the project."""
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    return os.path.join(PROJECT_DIR, path)


def validate_config(cfg: DictConfig) -> None:
    """Every key's type, range and choice, before anything is built (raises recipes.config_check.ConfigError)."""
    from bridges.dtypes import DTYPE_NAMES, PRECISIONS
    from recipes.config_check import check_config

    check_config(cfg, precisions=PRECISIONS, export_dtypes=DTYPE_NAMES)


def build_run(cfg: DictConfig):
    """Everything a run needs, validated before any process is started."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from bridges.megatron import no_te
    from bridges.megatron.knobs import ModelKnobs
    from bridges.megatron.layout import ParallelLayout
    from recipes.strategy import DDPKnobs

    from bridges import dtypes
    from bridges.checkpoint import hf_config

    precision = cfg.trainer.precision
    if precision is None:
        precision = dtypes.default_precision(_device_type(cfg.trainer.accelerator))
    dtypes.params_dtype(precision)  # raises on an unknown name

    on_gpu = _device_type(cfg.trainer.accelerator) == "cuda"
    knobs = ModelKnobs.from_config(OmegaConf.to_container(cfg.model))  # raises KnobError (a ValueError)
    knobs.megatron_fields(on_gpu, no_te.use_te_layer_specs(on_gpu))  # settings that need TE, before launch
    ddp = DDPKnobs(**OmegaConf.to_container(cfg.ddp))
    hf_config_path = resolve_path(cfg.model.hf_config)
    # The `module` node, given what was checked here (Hydra would turn dataclass arguments into configs:
    # hence a partial, called with them). The HF config is read here, once.
    module = instantiate(cfg.module, _partial_=True)(
        hf_config_path=hf_config_path, source_hf_config=hf_config.load_config(hf_config_path),
        params_dtype=str(precision), knobs=knobs)
    if cfg.mtp.enabled and not module.mtp_enabled and os.environ.get("LOCAL_RANK", "0") == "0":
        family = module.family
        counted = f" ({family.mtp.count_field}: {family.mtp_layers(module.source_hf_config)})" if family.mtp else ""
        print(f"mtp: off: {hf_config_path} gives no MTP layer to build{counted}, "
              f"so mtp.enabled=true builds no MTP block and trains without the MTP loss", flush=True)
    layout = ParallelLayout(**OmegaConf.to_container(cfg.parallel))
    devices = devices_per_node(cfg.trainer.devices, str(cfg.trainer.accelerator))
    world_size = devices * int(cfg.trainer.num_nodes)
    layout.check_model(world_size, module.arch)
    check_model_settings(module, layout)

    data = instantiate(cfg.data)
    if data.path:
        data.path = resolve_path(data.path)
    data.vocab_size = module.arch.vocab_size
    per_rank = data.step_batch_size(layout.data_parallel_size(world_size))  # raises on sizes that do not divide
    warn_pipeline_bubble(per_rank // data.micro_batch_size, layout.pp)
    rows = data.num_samples
    if data.kind == "tokens":
        from recipes.data import load_token_file

        rows = len(load_token_file(data.path, data.seq_length, data.vocab_size)) - data.val_samples
    _check_epoch_length(cfg, rows, data.global_batch_size)

    strategy = instantiate(cfg.strategy, _partial_=True)(layout=layout, ddp=ddp)
    nodes = [cfg.get("hf_import"), cfg.get("hf_export"), *(cfg.get("callbacks") or {}).values()]
    callbacks = [instantiate(node) for node in nodes if node]
    callbacks += _default_checkpointing(cfg, callbacks)
    trainer = instantiate(
        cfg.trainer,
        # Megatron owns the dtypes (bf16 parameters, fp32 buffers and masters): Lightning casts nothing.
        precision="32-true",
        strategy=strategy,
        callbacks=callbacks,
        logger=_loggers(cfg),
        # On with any ModelCheckpoint (callbacks=checkpoint), whatever trainer.enable_checkpointing says.
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=_run_dir(),
        devices=devices,
    )
    return trainer, module, data


def _check_epoch_length(cfg: DictConfig, rows: int, global_batch_size: int) -> None:
    """Training rows must fill at least one step, and the steps between validations one epoch."""
    from recipes.data import DataConfigError

    if cfg.mode != "fit":
        return
    source = "data.path" if cfg.data.kind == "tokens" else "data.num_samples"
    steps = max(rows, 0) // global_batch_size
    if steps == 0:
        raise DataConfigError(f"{source}: {max(rows, 0)} training rows do not fill one step of "
                              f"data.global_batch_size={global_batch_size}")
    interval = cfg.trainer.val_check_interval
    if isinstance(interval, int) and interval > steps:
        raise DataConfigError(f"trainer.val_check_interval: {interval} steps between validations, but an epoch "
                              f"of {source} has only {steps} steps")


def _default_checkpointing(cfg: DictConfig, callbacks: list) -> list:
    """`trainer.enable_checkpointing=true` without a ModelCheckpoint callback: sharded Lightning checkpoints
    into `<run dir>/checkpoints`, named as `callbacks=checkpoint` names them (Lightning's default would put
    them under the logger's directory, named `epoch=E-step=S`)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    if not cfg.trainer.get("enable_checkpointing") or any(isinstance(c, ModelCheckpoint) for c in callbacks):
        return []
    return [ModelCheckpoint(dirpath=os.path.join(_run_dir(), "checkpoints"), filename="step_{step}",
                            auto_insert_metric_name=False)]


def _device_type(accelerator) -> str:
    """The device the run will use ("cpu" or "cuda"), as Lightning will pick it for `trainer.accelerator`."""
    from bridges.megatron import cpu_runtime

    name = str(accelerator)
    if name == "cpu":
        return "cpu"
    if name in ("gpu", "cuda"):
        return "cuda"
    return cpu_runtime.default_device()


def check_model_settings(module, layout) -> None:
    """Megatron-Core's own checks of the model settings (knobs, overrides, layout), before any process starts."""
    from bridges.megatron import build
    from bridges.megatron.knobs import KnobError

    try:
        build.transformer_config(module.arch, layout, module.params_dtype, knobs=module.knobs)
    except (ValueError, AssertionError, TypeError) as e:
        raise KnobError(f"model settings (model.*, parallel.*): Megatron-Core refuses them: {e}") from None


def warn_pipeline_bubble(micro_batches: int, pp: int) -> None:
    """Fewer micro-batches per step than pipeline stages leaves most stages idle most of the time."""
    if pp > 1 and micro_batches < pp:
        print(f"warning: {micro_batches} micro-batch(es) per step with parallel.pp={pp}: the pipeline is mostly "
              f"idle; raise data.global_batch_size (or lower data.micro_batch_size) to >= {pp} micro-batches "
              f"per data-parallel rank", file=sys.stderr, flush=True)


def _run_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can act on (a bad checkpoint, a failed export): one message, no traceback."""
    from bridges.errors import user_errors
    from callbacks.hf_export import HFExportError
    from callbacks.hf_import import HFImportError
    from recipes.checkpoint import CheckpointRefused

    return (*user_errors(), HFExportError, HFImportError, CheckpointRefused)


def _run_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def _loggers(cfg: DictConfig) -> list:
    """One Lightning logger per node of the `logger` group (none: `~logger` on the command line)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        try:
            loggers.append(instantiate(node))
        except InstantiationException as e:  # e.g. logger=tensorboard without the tensorboard package
            cause = str(e.__cause__ or e).strip().splitlines()[0]
            raise ValueError(f"logger.{name}: {cause}") from None
    return loggers


def resume_path(ckpt_path: str | None) -> str | None:
    """`ckpt_path=last`: the newest Lightning checkpoint of the run directory (None, said in one line, when
    there is none yet: a requeued job's first start); any other value as given."""
    from recipes.checkpoint import newest_checkpoint

    if ckpt_path != "last":
        return ckpt_path
    found = newest_checkpoint(_run_dir())
    if found is None and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"ckpt_path=last: no checkpoint in {_run_dir()} yet; training starts from the beginning", flush=True)
    return found


def quiet_libraries() -> None:
    """Keep the console to our progress lines: library deprecation chatter and Megatron's
    per-bucket parameter listings say nothing a user can act on."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Our own warnings are meant for the user (a later filter takes precedence).
    warnings.filterwarnings("default", category=UserWarning, module=r"(bridges|callbacks|recipes)(\.|$)")
    for name in ("megatron", "megatron.core", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from lightning.pytorch import seed_everything

    quiet_libraries()

    from bridges.errors import debug
    from bridges.checkpoint.hf_config import HFConfigError
    from bridges.megatron.layout import LayoutError
    from recipes.data import DataConfigError

    try:
        validate_config(cfg)
        seed_everything(int(cfg.seed), verbose=False)
        trainer, module, data = build_run(cfg)
    except (HFConfigError, LayoutError, DataConfigError, ValueError) as e:
        if debug():
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    try:
        if cfg.mode == "fit":
            trainer.fit(module, datamodule=data, ckpt_path=resume_path(cfg.ckpt_path))
        else:
            trainer.validate(module, datamodule=data)
    except _run_errors() as e:  # every rank prints it: the ranks agreed on the failure
        if debug():
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if trainer.global_rank == 0:
        print(f"outputs: {_run_dir()}", flush=True)
        exports = os.path.join(_run_dir(), "hf")
        if os.path.isdir(exports):
            print(f"hf exports: {exports}", flush=True)


if __name__ == "__main__":
    from recipes.run_dir import rank_overrides

    sys.argv += rank_overrides(sys.argv[1:])  # under torchrun / srun, only rank 0 writes `.hydra/`
    main()
