"""`python train.py ...` as a user runs it: the embedded default trains, bad values fail fast."""

import json
import os

import numpy as np
import pytest

from tests.train_runs import logged_losses, train


def test_default_recipe_trains_with_expert_parallelism_and_falling_loss(tmp_path):
    done = train(tmp_path, "recipe=glm45", "trainer.max_steps=12", "trainer.val_check_interval=12")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"outputs: {tmp_path}/run" in done.stdout
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["global_step"] == 12
    train_losses = logged_losses(tmp_path / "run")
    assert len(train_losses) == 12
    assert train_losses[-1] < train_losses[0] - 0.5
    assert metrics["train/lm_loss"] == pytest.approx(train_losses[-1])
    assert "train/mtp_loss" in metrics and "val/lm_loss" in metrics


def test_validate_mode_reports_val_loss_without_mtp(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 256, (12, 33))
    np.save(tmp_path / "tokens.npy", tokens)
    done = train(tmp_path, "recipe=glm45_eval", "data=tokens", f"data.path={tmp_path}/tokens.npy",
                 "data.seq_length=32")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert "train/mtp_loss" not in metrics
    assert 4.0 < metrics["val/lm_loss"] < 7.0  # ~ln(256) for an untrained model


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.ep=3"], "parallel.ep=3 does not divide the expert count 8"),
        (["parallel.tp=2", "parallel.ep=1", "trainer.devices=3"], "world size 3 is not divisible"),
        (["parallel.pp=3", "parallel.ep=1", "trainer.devices=3"], "parallel.pp=3 does not divide the layer count 4"),
        (["data=tokens", "data.path=/no/such/tokens.npy"], "data.path: token file '/no/such/tokens.npy' does not exist"),
        (["data.global_batch_size=7"], "data.global_batch_size: 7 is not a multiple of data.micro_batch_size=2"),
        (["model.hf_config=/no/such/model"], "no HF config at '/no/such/model'"),
        (["recipe=gpt_oss", "parallel.tp=2", "parallel.ep=1", "parallel.etp=2"], "set parallel.etp=1 (got 2)"),
    ],
    ids=["ep-vs-experts", "world-vs-layout", "pp-vs-layers", "missing-data", "batch", "missing-config", "expert-bias-etp"],
)
def test_bad_values_fail_fast_with_one_line(tmp_path, overrides, message):
    done = train(tmp_path, *overrides, timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]


STEP_METRICS = {"train/lm_loss", "train/grad_norm", "perf/step_seconds", "perf/tokens_per_second",
                "perf/tflops_per_second", "perf/peak_memory_gib"}
EXPORT_METRICS = {"hf_export/seconds", "hf_export/stall_seconds", "hf_export/bytes"}


def test_logger_list_writes_csv_and_tensorboard_with_step_and_export_metrics(tmp_path):
    pytest.importorskip("tensorboard")  # in the test extra (pyproject.toml)
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bridges.checkpoint import hf_config
    from bridges.models import family_for
    from recipes.flops import training_flops_per_token

    done = train(tmp_path, "recipe=glm45", "logger=[csv,tensorboard]", "trainer.max_steps=2",
                 "trainer.limit_val_batches=0", "hf_export.every_n_train_steps=1")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert STEP_METRICS | EXPORT_METRICS <= set(events.Tags()["scalars"])
    rows = list(csv.DictReader(open(run / "logs" / "metrics.csv")))
    assert STEP_METRICS | EXPORT_METRICS <= set(rows[0])
    step = next(r for r in rows if r["perf/tokens_per_second"])
    seconds, rate = float(step["perf/step_seconds"]), float(step["perf/tokens_per_second"])
    assert rate * seconds == pytest.approx(8 * 64, rel=1e-5)  # global batch x sequence length, over all ranks
    config = hf_config.load_config("conf/model/glm45_tiny")
    flops = training_flops_per_token(family_for(config).architecture(config), 64)
    assert float(step["perf/tflops_per_second"]) == pytest.approx(flops * rate / 1e12, rel=1e-5)
    assert [e.value for e in events.Scalars("train/lm_loss")] == pytest.approx(
        [float(r["train/lm_loss"]) for r in rows if r["train/lm_loss"]], rel=1e-6)
    line = next(line for line in done.stdout.splitlines() if line.startswith("step 2/2"))
    assert all(f"{name}=" in line for name in ("grad_norm", "tokens/s", "TFLOP/s", "peak_mem_GiB")), line


def test_checkpoint_callback_or_trainer_flag_checkpoint_and_ckpt_path_last_resumes(tmp_path):
    import shutil

    common = ["recipe=glm45", "trainer.limit_val_batches=0", "~hf_export", "trainer.max_steps=4", "ckpt_path=last"]
    # The checkpoint callback node, every 2 steps; ckpt_path=last in a run directory without checkpoints.
    straight = train(tmp_path, *common, "callbacks=checkpoint", "callbacks.checkpoint.every_n_train_steps=2")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "ckpt_path=last: no checkpoint in" in straight.stdout
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["step_2.ckpt", "step_4.ckpt"]
    losses = logged_losses(tmp_path / "run")
    # As if the job had died after step 3: the same run directory again, with only trainer.enable_checkpointing.
    shutil.rmtree(checkpoints / "step_4.ckpt")
    resumed = train(tmp_path, *common, "trainer.enable_checkpointing=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("step ")] == ["3/4", "4/4"]
    assert logged_losses(tmp_path / "run")[-2:] == losses[2:]  # fp32, same layout: bit for bit
    assert sorted(os.listdir(checkpoints)) == ["step_2.ckpt", "step_4.ckpt"]  # the flag alone checkpoints
