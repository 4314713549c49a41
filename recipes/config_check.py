"""One validation pass over the composed Hydra config before any process starts: types, ranges, enums
and divisibility, reported as `<key>: <what is wrong>`. Checks that need files or the model (layout
against the expert count, token files) run right after, in train.py's build_run."""

from __future__ import annotations

from collections.abc import Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
MODES = ("fit", "validate")
DATA_KINDS = ("synthetic", "tokens")
EXPORT_MODES = ("owner", "gather")
ON_ERROR = ("raise", "warn")

_ABSENT = object()


class ConfigError(ValueError):
    """A config value of the wrong type, range or choice; the message starts with its key."""

    def __init__(self, key: str, what: str):
        super().__init__(f"{key}: {what}")
        self.key = key


def check_config(cfg: DictConfig, precisions: Iterable[str], export_dtypes: Iterable[str]) -> None:
    """Raise `ConfigError` for the first bad value. `precisions`: the names `trainer.precision` takes
    (train.py's table); `export_dtypes`: those `hf_export.dtype` takes (the export callback's table)."""
    c = _Checker(cfg)
    c.integer("seed", minimum=0)
    c.choice("mode", MODES)
    c.optional_string("ckpt_path")

    for key in ("parallel.tp", "parallel.pp", "parallel.ep"):
        c.integer(key, minimum=1)
    c.integer("parallel.etp", minimum=1, none=True)
    for key in ("parallel.first_stage_layers", "parallel.last_stage_layers", "parallel.virtual_stages"):
        c.integer(key, minimum=1, none=True)  # their fit to the model: ParallelLayout.check in build_run
    if c.get("ddp", None) is not None:  # the rest of model.* / ddp.*: knobs.check and DDPKnobs in build_run
        c.boolean("ddp.overlap_grad_reduce")
        c.boolean("ddp.overlap_param_gather")
        c.integer("ddp.bucket_size", minimum=1, none=True)

    devices = c.get("trainer.devices")
    if devices != "auto":
        c.integer("trainer.devices", minimum=1)
    c.integer("trainer.num_nodes", minimum=1)
    c.choice("trainer.accelerator", ACCELERATORS)
    c.choice("trainer.precision", [str(p) for p in precisions], none=True, convert=str)  # null: by device
    c.integer("trainer.max_steps", minimum=1)
    interval = c.get("trainer.val_check_interval")
    if isinstance(interval, float):
        c.number("trainer.val_check_interval", minimum=0.0, maximum=1.0, above_minimum=True)
    else:
        c.integer("trainer.val_check_interval", minimum=1, none=True)

    c.boolean("trainer.enable_checkpointing")
    if c.get("trainer.logger", _ABSENT) is not _ABSENT:
        raise ConfigError("trainer.logger", "loggers come from the logger group: logger=csv, logger=tensorboard, "
                                            "logger=[csv,tensorboard], logger=wandb or ~logger")
    c.targets("logger")
    c.targets("callbacks")
    if c.get("callbacks.checkpoint", None) is not None:
        c.integer("callbacks.checkpoint.every_n_train_steps", minimum=1, none=True)
        c.integer("callbacks.checkpoint.save_top_k", minimum=-1)

    c.choice("data.kind", DATA_KINDS)
    if c.get("data.kind") == "tokens":
        path = OmegaConf.select(cfg, "data.path", default=None)  # `???` (unset) reads as None
        if not isinstance(path, str) or not path:
            raise ConfigError("data.path", "data=tokens needs a token file (data.path=FILE.npy)")
    c.integer("data.seq_length", minimum=1)
    micro = c.integer("data.micro_batch_size", minimum=1)
    global_batch = c.integer("data.global_batch_size", minimum=1)
    if global_batch % micro:
        raise ConfigError("data.global_batch_size", f"{global_batch} is not a multiple of data.micro_batch_size={micro}")
    if c.get("data.num_samples", _ABSENT) is not _ABSENT:
        c.integer("data.num_samples", minimum=1)
    c.integer("data.val_samples", minimum=0)

    lr = c.number("optim.lr", minimum=0.0, above_minimum=True)
    min_lr = c.number("optim.min_lr", minimum=0.0)
    if min_lr > lr:
        raise ConfigError("optim.min_lr", f"{min_lr} is above optim.lr={lr}")
    c.integer("optim.warmup_steps", minimum=0)
    c.number("optim.weight_decay", minimum=0.0)
    c.number("optim.beta1", minimum=0.0, maximum=1.0, below_maximum=True)
    c.number("optim.beta2", minimum=0.0, maximum=1.0, below_maximum=True)
    c.number("optim.clip_grad", minimum=0.0, none=True)

    c.boolean("mtp.enabled")
    c.number("mtp.loss_factor", minimum=0.0)

    if c.get("hf_import", None) is not None:
        c.optional_string("hf_import.path")
        c.boolean("hf_import.restore_progress")
    if c.get("hf_export", None) is not None:
        c.integer("hf_export.every_n_train_steps", minimum=0, none=True)
        c.boolean("hf_export.save_last")
        c.integer("hf_export.keep_last_k", minimum=1, none=True)
        c.choice("hf_export.dtype", list(export_dtypes), none=True)
        c.boolean("hf_export.async_write")
        c.boolean("hf_export.mtp_passthrough")
        c.choice("hf_export.mode", EXPORT_MODES)
        c.choice("hf_export.on_error", ON_ERROR)
        c.number("hf_export.group_timeout_minutes", minimum=0.0, above_minimum=True)


class _Checker:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def get(self, key: str, default=None):
        try:
            value = OmegaConf.select(self.cfg, key, default=default, throw_on_missing=True)
        except MissingMandatoryValue:
            raise ConfigError(key, "is required (no value given)") from None
        except InterpolationResolutionError as e:
            raise ConfigError(key, f"cannot be resolved ({e})") from None
        return value

    def integer(self, key: str, minimum: int | None = None, none: bool = False) -> int | None:
        value = self.get(key)
        if value is None and none:
            return None
        if not _is_int(value):
            raise ConfigError(key, f"expected an integer{' or null' if none else ''}, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(key, f"must be >= {minimum}, got {value}")
        return value

    def number(self, key: str, minimum: float | None = None, maximum: float | None = None, none: bool = False,
               above_minimum: bool = False, below_maximum: bool = False) -> float | None:
        value = self.get(key)
        if value is None and none:
            return None
        if not (_is_int(value) or isinstance(value, float)) or value != value:  # NaN is no number here
            raise ConfigError(key, f"expected a number{' or null' if none else ''}, got {value!r}")
        if minimum is not None and (value < minimum or (above_minimum and value == minimum)):
            raise ConfigError(key, f"must be {'>' if above_minimum else '>='} {minimum}, got {value}")
        if maximum is not None and (value > maximum or (below_maximum and value == maximum)):
            raise ConfigError(key, f"must be {'<' if below_maximum else '<='} {maximum}, got {value}")
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value

    def choice(self, key: str, choices, none: bool = False, convert=None):
        value = self.get(key)
        if value is None and none:
            return None
        shown = convert(value) if convert and value is not None else value
        if shown not in choices:
            options = ", ".join(map(str, choices)) + (" or null" if none else "")
            raise ConfigError(key, f"expected one of {options}; got {value!r}")
        return shown

    def targets(self, key: str) -> None:
        """`key` is null or a mapping of named nodes, each naming the class to build in `_target_`."""
        nodes = self.get(key)
        if nodes is None:
            return
        if not isinstance(nodes, DictConfig):
            raise ConfigError(key, f"expected named entries (name: {{_target_: ...}}), got {nodes!r}")
        for name in nodes:
            node = self.get(f"{key}.{name}")
            if node is None:
                continue
            if not isinstance(node, DictConfig) or not isinstance(node.get("_target_"), str):
                raise ConfigError(f"{key}.{name}", "expected a node with a `_target_` (the class to build)")

    def optional_string(self, key: str) -> str | None:
        value = self.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(key, f"expected a path or null, got {value!r}")
        return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
