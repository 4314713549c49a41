"""Every Hydra key is checked before any process starts: a wrong type, range or choice is one
`<key>: <what is wrong>` line (in-process, on composed configs; one end-to-end run checks the exit status)."""

import os

import pytest
from hydra import compose, initialize_config_dir

import train
from recipes.config_check import ConfigError
from tests.train_runs import train as run_train

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _error(*overrides) -> str:
    with pytest.raises(ConfigError) as info:
        train.validate_config(_compose(*overrides))
    return str(info.value)


@pytest.mark.parametrize("recipe", sorted(name[:-5] for name in os.listdir(os.path.join(CONF, "recipe"))))
def test_every_recipe_passes(recipe):
    train.validate_config(_compose(f"recipe={recipe}"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.micro_batch_size=-2", "data.micro_batch_size: must be >= 1, got -2"),
        ("data.micro_batch_size=0", "data.micro_batch_size: must be >= 1, got 0"),
        ("data.global_batch_size=0", "data.global_batch_size: must be >= 1, got 0"),
        ("data.global_batch_size=6", "data.global_batch_size: 6 is not a multiple of data.micro_batch_size=4"),
        ("data.seq_length=0", "data.seq_length: must be >= 1, got 0"),
        ("data.seq_length=-1", "data.seq_length: must be >= 1, got -1"),
        ("data.num_samples=0", "data.num_samples: must be >= 1, got 0"),
        ("data.val_samples=-1", "data.val_samples: must be >= 0, got -1"),
        ("parallel.ep=abc", "parallel.ep: expected an integer, got 'abc'"),
        ("parallel.etp=0", "parallel.etp: must be >= 1, got 0"),
        ("trainer.devices=0", "trainer.devices: must be >= 1, got 0"),
        ("trainer.num_nodes=0", "trainer.num_nodes: must be >= 1, got 0"),
        ("trainer.max_steps=abc", "trainer.max_steps: expected an integer, got 'abc'"),
        ("trainer.max_steps=-2", "trainer.max_steps: must be >= 1, got -2"),
        ("trainer.accelerator=tpu", "trainer.accelerator: expected one of cpu, gpu, cuda, auto; got 'tpu'"),
        ("trainer.precision=fp8", "trainer.precision: expected one of"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval: must be >= 1, got 0"),
        ("optim.lr=abc", "optim.lr: expected a number, got 'abc'"),
        ("optim.lr=-1", "optim.lr: must be > 0.0, got -1"),
        ("optim.min_lr=1.0", "optim.min_lr: 1.0 is above optim.lr=0.003"),
        ("optim.beta1=2", "optim.beta1: must be < 1.0, got 2"),
        ("optim.warmup_steps=-1", "optim.warmup_steps: must be >= 0, got -1"),
        ("mtp.enabled=maybe", "mtp.enabled: expected true or false, got 'maybe'"),
        ("mode=train", "mode: expected one of fit, validate; got 'train'"),
        ("hf_export.every_n_train_steps=-1", "hf_export.every_n_train_steps: must be >= 0, got -1"),
        ("hf_export.every_n_train_steps=1.5", "hf_export.every_n_train_steps: expected an integer or null, got 1.5"),
        ("hf_export.every_n_train_steps=abc", "hf_export.every_n_train_steps: expected an integer or null, got 'abc'"),
        ("hf_export.keep_last_k=abc", "hf_export.keep_last_k: expected an integer or null, got 'abc'"),
        ("hf_export.keep_last_k=0", "hf_export.keep_last_k: must be >= 1, got 0"),
        ("hf_export.dtype=int8", "hf_export.dtype: expected one of"),
        ("hf_export.mode=foo", "hf_export.mode: expected one of owner, gather; got 'foo'"),
        ("hf_export.on_error=ignore", "hf_export.on_error: expected one of raise, warn; got 'ignore'"),
        ("hf_export.async_write=maybe", "hf_export.async_write: expected true or false, got 'maybe'"),
        ("data=tokens", "data.path: data=tokens needs a token file"),
        ("+trainer.logger=false", "trainer.logger: loggers come from the logger group"),
        ("trainer.enable_checkpointing=maybe", "trainer.enable_checkpointing: expected true or false, got 'maybe'"),
        ("+logger.mine.name=x", "logger.mine: expected a node with a `_target_`"),
        ("+callbacks.mine=3", "callbacks.mine: expected a node with a `_target_`"),
        ("callbacks=checkpoint callbacks.checkpoint.every_n_train_steps=0",
         "callbacks.checkpoint.every_n_train_steps: must be >= 1, got 0"),
        ("callbacks=checkpoint callbacks.checkpoint.save_top_k=-2", "callbacks.checkpoint.save_top_k: must be >= -1, got -2"),
    ],
)
def test_bad_value_names_the_key(override, message):
    extra = ["data.micro_batch_size=4"] if override.startswith("data.global_batch_size=6") else []
    assert message in _error(*override.split(" "), *extra)


@pytest.mark.parametrize("overrides", [["logger=[csv,tensorboard]", "callbacks=checkpoint"], ["logger=wandb"],
                                       ["~logger", "trainer.enable_checkpointing=true", "ckpt_path=last"]])
def test_logger_and_checkpoint_choices_pass(overrides):
    train.validate_config(_compose(*overrides))


def test_precision_names_come_from_the_one_table(monkeypatch):
    import torch

    from bridges import dtypes

    monkeypatch.setitem(dtypes.PRECISIONS, "bf16-new", torch.bfloat16)
    train.validate_config(_compose("trainer.precision=bf16-new"))
    train.validate_config(_compose("trainer.precision=null"))  # chosen by the device


def test_end_to_end_one_line_and_exit_status_2(tmp_path):
    done = run_train(tmp_path, "data.micro_batch_size=-2", timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and lines == ["error: data.micro_batch_size: must be >= 1, got -2"], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_mtp_requested_but_absent_from_the_config_is_said_in_one_line(tmp_path, monkeypatch, capsys):
    import json

    config = json.load(open(os.path.join(CONF, "model", "glm45_tiny", "config.json")))
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_nextn_predict_layers=0)))
    monkeypatch.setattr(train, "_run_dir", lambda: str(tmp_path))
    cfg = _compose("recipe=glm45", f"model.hf_config={tmp_path}", "~hf_export", "~logger",
                   f"callbacks.metrics_file.path={tmp_path}/metrics.json")
    _, module, _ = train.build_run(cfg)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mtp: off")]
    assert not module.mtp_enabled and len(lines) == 1 and "num_nextn_predict_layers: 0" in lines[0], lines


def test_token_file_shorter_than_the_validation_interval_is_refused(tmp_path, monkeypatch):
    import numpy as np

    from recipes.data import DataConfigError

    np.save(tmp_path / "tokens.npy", np.zeros((8 * 3 + 32, 65), dtype=np.int64))  # 3 steps after validation rows
    monkeypatch.setattr(train, "_run_dir", lambda: str(tmp_path))
    cfg = _compose("recipe=glm45", "data=tokens", f"data.path={tmp_path}/tokens.npy", "trainer.val_check_interval=5",
                   "~hf_export", f"callbacks.metrics_file.path={tmp_path}/metrics.json")
    with pytest.raises(DataConfigError, match="trainer.val_check_interval: 5 steps between validations, but an "
                                              "epoch of data.path has only 3 steps"):
        train.build_run(cfg)


def test_wandb_node_builds_an_offline_logger_when_wandb_is_installed(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = _compose("logger=wandb", "recipe=gpt_oss").logger.wandb
    assert node._target_ == "lightning.pytorch.loggers.WandbLogger" and node.offline is False
    assert OmegaConf.to_container(node)["save_dir"] == "${hydra:runtime.output_dir}"  # the run directory
    pytest.importorskip("wandb")  # not a test dependency: the `loggers` extra
    logger = instantiate(node, save_dir=str(tmp_path), name="gpt_oss", offline=True)
    assert type(logger).__name__ == "WandbLogger" and logger.name == "moe-hf-bridge"  # the project
    logger.log_metrics({"train/lm_loss": 5.0}, step=1)
    logger.experiment.finish()
    assert [p.name for p in (tmp_path / "wandb").glob("offline-run-*")], "no offline run written"
