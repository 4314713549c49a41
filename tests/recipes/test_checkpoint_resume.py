"""Lightning checkpoints under expert parallelism: one file per rank, and a resumed run continues bit for bit."""

import os

import pytest

from tests.launcher import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fit(ckpt_dir=None, resume=None, stop_at=None, import_path=None):
    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.hf_import import HFImportCallback
    from recipes.data import TokenDataModule
    from recipes.module import MegatronGPTModule
    from recipes.strategy import MegatronStrategy

    module = MegatronGPTModule(os.path.join(ROOT, "conf/model/glm45_tiny"), micro_batch_size=2,
                               optim={"warmup_steps": 1})
    data = TokenDataModule(seq_length=16, micro_batch_size=2, global_batch_size=4, num_samples=64)
    data.vocab_size = module.arch.vocab_size
    record = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
            weights = float(sum(p.double().sum() for p in m.model.parameters()))
            record.append((trainer.global_step, float(trainer.callback_metrics["train/lm_loss"]), weights))
            if trainer.global_step == stop_at:
                trainer.should_stop = True

    callbacks = [Record(), HFImportCallback(path=import_path)]
    if ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=dist.get_world_size(), strategy=MegatronStrategy(ep=2), max_steps=6,
        logger=False, enable_checkpointing=bool(ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return record


def _scenario(tmp):
    straight = _fit()
    first_half = _fit(ckpt_dir=tmp, stop_at=3)
    (name,) = os.listdir(tmp)
    files = sorted(os.listdir(os.path.join(tmp, name)))
    # The HF import must be skipped when resuming (its path does not even exist).
    second_half = _fit(resume=os.path.join(tmp, name), import_path=os.path.join(tmp, "no-such-hf-dir"))
    return straight, first_half, second_half, files


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(2, _scenario, str(tmp_path_factory.mktemp("ckpt")))


def test_checkpoint_is_one_file_per_rank(runs):
    assert runs[0][3] == ["rank_00000.ckpt", "rank_00001.ckpt"]


def test_resumed_run_continues_bit_for_bit(runs):
    for straight, first_half, second_half, _ in runs:
        assert first_half == straight[:3]
        assert second_half == straight[3:]
