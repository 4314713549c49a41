"""`python train.py ...` as a user runs it: the embedded default trains, bad values fail fast."""

import json

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
    done = train(tmp_path, *overrides, timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]
