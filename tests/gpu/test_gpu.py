"""The GPU tier (`pytest -m gpu`; skipped without CUDA): the `make gpu-smoke` checks under pytest, in order,
sharing one work directory: train 4 steps bf16 with async export and a checkpoint, resume, import at
lr=1e-12 then export equals the source, verify under torchrun."""

import pytest
import torch

from tests.gpu.smoke import Smoke

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return Smoke(str(tmp_path_factory.mktemp("gpu")), "gpu")


def test_train_bf16_with_async_export_and_checkpoint(smoke):
    smoke.train()


def test_resume_from_the_checkpoint(smoke):
    smoke.resume()


def test_import_at_tiny_lr_then_export_equals_the_source(smoke):
    smoke.import_export()


def test_verify_under_torchrun(smoke):
    smoke.verify()
