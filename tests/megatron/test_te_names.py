"""Transformer Engine layer specs map through every family's rules: a model built from Megatron-Core's own
TE specs (stand-in TE modules, see te_standins.py) names its parameters as TE does (fused
`linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`, TEGroupedMLP `linear_fc1.weight<i>`),
and import -> export through those names reproduces the HF checkpoint bit for bit, for every family
(GLM-4.5, GPT-OSS, Qwen3-MoE, Qwen3-VL-MoE, GLM-4.5V)."""

from __future__ import annotations

import pytest
import torch

from tests.bridges.glm45_tiny import make_checkpoint as glm45_checkpoint
from tests.bridges.gpt_oss_tiny import make_checkpoint as gpt_oss_checkpoint
from tests.bridges.qwen3_moe_tiny import MAIN as QWEN3_MOE_TINY
from tests.bridges.qwen3_moe_tiny import make_checkpoint as qwen3_moe_checkpoint
from tests.bridges import vlm_tiny
from tests.launcher import run_distributed


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("te_names")
    out = {}
    for family, make in (("glm45", glm45_checkpoint), ("gpt_oss", gpt_oss_checkpoint),
                         ("qwen3_moe", lambda d: qwen3_moe_checkpoint(d, **QWEN3_MOE_TINY))):
        make(str(root / family))
        out[family] = str(root / family)
    for family in ("qwen3_vl_moe", "glm4v_moe"):  # vision-language: the language model's names under TE
        vlm_tiny.make_checkpoint(str(root / family), family, vlm_tiny.FAMILIES[family][1][0])
        out[family] = str(root / family)
    return out


def te_round_trips(directories, layouts_of):
    """On every rank, per (family, layout): TE-style local names seen, and HF tensors not bit-identical."""
    from bridges.checkpoint import hf_config as hfc
    from bridges.export.specs import export_pieces
    from bridges.load import import_weights
    from bridges.megatron import build, parallel
    from bridges.megatron.vlm import build_vlm_model
    from bridges.models import family_for
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint
    from tests.megatron.te_standins import use_te_layer_specs

    use_te_layer_specs()
    out = []
    for family_name, directory in directories.items():
        for layout in layouts_of[family_name]:
            config = hfc.load_config(directory)
            family = family_for(config)
            arch = family.architecture(config)
            parallel.initialize(layout)
            vision = family_name in ("qwen3_vl_moe", "glm4v_moe")
            model = (build_vlm_model if vision else build.build_gpt_model)(arch, layout)
            names = [n for n in model.state_dict() if not n.endswith("_extra_state")]
            source = SafetensorsCheckpoint(directory)
            report = import_weights([model], family, arch, source, config=config)
            differ = [p.spec.hf_name for p in export_pieces([model], family, arch, None, report.expert_layout)
                      if not torch.equal(p.tensor, source.read(p.spec.hf_name, p.spec.region))]
            out.append((family_name, str(layout), names, len(report.loaded), differ))
    return out


def test_te_layer_spec_names_round_trip_for_every_family(checkpoints):
    from bridges.megatron.layout import ParallelLayout

    # GLM-4.5: expert weights split over expert-TP 2; the others: TP 2 with experts over EP 2 (Megatron-Core
    # takes GPT-OSS's expert biases only at expert-TP 1).
    layouts_of = {"glm45": [ParallelLayout(tp=2)], "qwen3_moe": [ParallelLayout(tp=2, ep=2, etp=1)],
                  "gpt_oss": [ParallelLayout(tp=2, ep=2, etp=1)], "qwen3_vl_moe": [ParallelLayout(ep=2)],
                  "glm4v_moe": [ParallelLayout(tp=2)]}
    results = run_distributed(2, te_round_trips, checkpoints, layouts_of)
    for rank_results in results:
        for family, layout, names, loaded, differ in rank_results:
            where = f"{family} {layout}"
            assert loaded > 0 and differ == [], f"{where}: {differ}"
            assert any(n.endswith("self_attention.linear_qkv.layer_norm_weight") for n in names), where
            assert not any(n.endswith("input_layernorm.weight") for n in names), where  # fused into linear_qkv
            assert any(".mlp.experts.linear_fc1.weight" in n for n in names), where  # TEGroupedMLP
            assert not any(".local_experts." in n for n in names), where
            if family in ("glm45", "glm4v_moe"):  # the dense first layer fuses the pre-MLP norm into linear_fc1
                assert any(n.endswith("mlp.linear_fc1.layer_norm_weight") for n in names), where
            if family == "gpt_oss":  # expert biases per GEMM
                assert any(".mlp.experts.linear_fc1.bias" in n for n in names), where
