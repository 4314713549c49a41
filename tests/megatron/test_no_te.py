"""Megatron-Core without Transformer Engine: the no-TE steps (keyed on Megatron's HAVE_TE, not on the device),
and expert GEMMs that never pick the legacy GroupedMLP."""

import pytest
import torch

from bridges.megatron import no_te
from bridges.megatron.knobs import KnobError, ModelKnobs

pytestmark = pytest.mark.skipif(no_te.have_te(), reason="Transformer Engine is installed")


@pytest.fixture(scope="module", autouse=True)
def steps():
    no_te.enable()
    no_te.enable()  # idempotent


def test_missing_transformer_engine_gemm_name_is_defined():
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None


def test_multi_latent_attention_knows_transformer_engine_is_absent():
    from megatron.core.transformer import multi_latent_attention

    assert multi_latent_attention.HAVE_TE is False  # else it calls isinstance() on a TE placeholder


def test_torch_norm_accepts_sequence_parallel_and_marks_weights():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cfg = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
        tensor_model_parallel_size=2, sequence_parallel=True, use_cpu_initialization=True,
    )
    norm = WrappedTorchNorm(cfg, 8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-6
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


def test_te_layer_specs_only_with_te_on_gpu():
    assert not no_te.use_te_layer_specs(on_gpu=True) and not no_te.use_te_layer_specs(on_gpu=False)


@pytest.mark.parametrize("on_gpu", [True, False])
def test_experts_never_use_the_legacy_grouped_mlp(on_gpu):
    fields = ModelKnobs().megatron_fields(on_gpu=on_gpu, te_layers=False)
    assert fields["moe_grouped_gemm"] is False and fields["moe_use_legacy_grouped_gemm"] is False
    assert fields["moe_token_dispatcher_type"] == ("alltoall" if on_gpu else "allgather")
    with pytest.raises(KnobError, match="model.moe_grouped_gemm=true needs Transformer Engine"):
        ModelKnobs(moe_grouped_gemm=True).megatron_fields(on_gpu=on_gpu, te_layers=False)
    te = ModelKnobs().megatron_fields(on_gpu=True, te_layers=True)
    assert te["moe_grouped_gemm"] is True and te["moe_use_legacy_grouped_gemm"] is False
