"""Sharded Lightning checkpoints (Megatron dist_checkpointing): a resumed run continues as if uninterrupted,
under the same layout (bit for bit in fp32) and under another one (within 1e-5 per step in fp32); what
cannot be resumed is refused in one line.

Every scenario of a world size runs in the same processes (start-up is the slow part).
"""

import os

import pytest

from tests.launcher import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fit(layout, ckpt_dir=None, resume=None, precision="fp32", import_path=None, trainer_checkpointing=False,
         root_dir=None):
    """Fit to step 6 (a checkpoint every 3 steps into `ckpt_dir`); returns [(step, lm_loss, weight sum)]."""
    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.hf_import import HFImportCallback
    from recipes.data import TokenDataModule
    from recipes.module import MegatronGPTModule
    from recipes.strategy import MegatronStrategy

    module = MegatronGPTModule(os.path.join(ROOT, "conf/model/glm45_tiny"), micro_batch_size=2,
                               params_dtype=precision, optim={"warmup_steps": 1})
    data = TokenDataModule(seq_length=16, micro_batch_size=2, global_batch_size=4, num_samples=64)
    data.vocab_size = module.arch.vocab_size
    record = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
            weights = float(sum(p.double().sum() for p in m.model.parameters()))
            record.append((trainer.global_step, float(trainer.callback_metrics["train/lm_loss"]), weights))

    callbacks = [Record(), HFImportCallback(path=import_path)]
    if ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=dist.get_world_size(), strategy=MegatronStrategy(**layout), max_steps=6,
        logger=False, enable_checkpointing=bool(ckpt_dir) or trainer_checkpointing, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
        default_root_dir=root_dir,
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return record


def _refusal(layout, resume, precision):
    try:
        _fit(layout, resume=resume, precision=precision)
    except Exception as e:  # every rank must get here: no hang
        return f"{type(e).__name__}: {e}"
    return None


def _world2(tmp):
    ep2 = {"ep": 2}
    out = {}
    out["fp32"] = _fit(ep2, ckpt_dir=f"{tmp}/fp32")
    step3 = f"{tmp}/fp32/epoch=0-step=3.ckpt"
    out["files"] = sorted(os.listdir(step3))
    # The HF import must be skipped when resuming (its path does not even exist).
    out["fp32_resumed"] = _fit(ep2, resume=step3, import_path=f"{tmp}/no-such-hf-dir")
    out["ep1_dp2"] = _fit({}, resume=step3)
    out["tp2"] = _fit({"tp": 2}, resume=step3)
    out["pp2"] = _fit({"pp": 2}, resume=step3)
    out["bf16"] = _fit(ep2, ckpt_dir=f"{tmp}/bf16", precision="bf16")
    out["bf16_resumed"] = _fit(ep2, resume=f"{tmp}/bf16/epoch=0-step=3.ckpt", precision="bf16")
    out["refused_dtype"] = _refusal(ep2, step3, "bf16")
    # Only trainer.enable_checkpointing: Lightning's own ModelCheckpoint writes under the root dir.
    _fit(ep2, trainer_checkpointing=True, root_dir=f"{tmp}/plain")
    out["plain"] = [os.path.relpath(os.path.join(d, n), f"{tmp}/plain")
                    for d, names, _ in os.walk(f"{tmp}/plain") for n in names if n.endswith(".ckpt")]
    return out


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_distributed(2, _world2, str(tmp_path_factory.mktemp("ckpt")), timeout=900)


def test_checkpoint_directory_holds_shards_and_lightning_state(world2):
    files = world2[0]["files"]
    assert {"run.json", "lightning_state.pt", "common.pt", "metadata.json", ".metadata"} <= set(files)
    assert sorted(f for f in files if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank


def test_same_layout_resume_is_bit_exact_in_fp32(world2):
    for rank in world2:
        straight, resumed = rank["fp32"], rank["fp32_resumed"]
        assert [s for s, _, _ in straight] == [1, 2, 3, 4, 5, 6]
        assert resumed == straight[3:]  # losses and weights, bit for bit


def test_same_layout_resume_in_bf16_matches(world2):
    straight, resumed = world2[0]["bf16"], world2[0]["bf16_resumed"]
    assert [s for s, _, _ in resumed] == [4, 5, 6]
    # bf16 parameters, fp32 masters and moments restored exactly: measured bit-exact on CPU.
    assert [loss for _, loss, _ in resumed] == [loss for _, loss, _ in straight[3:]]


@pytest.mark.parametrize("layout", ["ep1_dp2", "tp2", "pp2"])
def test_resume_under_another_layout_continues_within_1e_5(world2, layout):
    straight, resumed = world2[0]["fp32"], world2[0][layout]
    assert [s for s, _, _ in resumed] == [4, 5, 6]
    for (_, expected, _), (_, loss, _) in zip(straight[3:], resumed):
        assert abs(loss - expected) <= 1e-5, (layout, straight[3:], resumed)


def test_another_master_dtype_is_refused_in_one_line(world2):
    for rank in world2:
        message = rank["refused_dtype"]
        assert message is not None and "\n" not in message
        assert "float32 parameters" in message and "bfloat16" in message and "trainer.precision" in message


def test_enable_checkpointing_alone_writes_resumable_checkpoints(world2):
    assert world2[0]["plain"], "no checkpoint written"


def _world4(tmp):
    layout = {"tp": 2, "ep": 2}
    straight = _fit(layout, ckpt_dir=f"{tmp}/tp2ep2")
    resumed = _fit(layout, resume=f"{tmp}/tp2ep2/epoch=0-step=3.ckpt")
    return straight, resumed


def test_tp2_ep2_same_layout_resume_is_bit_exact(tmp_path):
    for straight, resumed in run_distributed(4, _world4, str(tmp_path), timeout=900):
        assert resumed == straight[3:]


def test_newest_checkpoint_is_the_last_completed_one_under_the_run_directory(tmp_path):
    from recipes.checkpoint import LIGHTNING_STATE, RUN_RECORD, newest_checkpoint

    assert newest_checkpoint(str(tmp_path)) is None
    for age, name in ((30, "checkpoints/step_10.ckpt"), (20, "checkpoints/step_2.ckpt"), (10, "other/step_5.ckpt")):
        directory = tmp_path / name
        directory.mkdir(parents=True)
        for file in (LIGHTNING_STATE, RUN_RECORD):
            (directory / file).write_text("{}")
        os.utime(directory / RUN_RECORD, (1e9 - age, 1e9 - age))
    (tmp_path / "checkpoints" / "step_9.ckpt").mkdir()  # unfinished: no run record
    (tmp_path / "checkpoints" / "step_9.ckpt" / LIGHTNING_STATE).write_text("{}")
    assert newest_checkpoint(str(tmp_path)) == str(tmp_path / "other" / "step_5.ckpt")
