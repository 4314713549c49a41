"""Qwen3-VL-MoE / GLM-4.5V without processes: expert orientation of a checkpoint (from shapes, else from
`transformers_version`), config translation both ways, M-RoPE positions and Qwen3-VL's interleaved rotary
against transformers."""

from __future__ import annotations

from dataclasses import astuple

import pytest
import torch

from bridges.checkpoint.hf_config import HFConfigError
from bridges.models import glm45v, qwen3_vl_moe
from bridges.rules.expert_layouts import ExpertLayout, LayoutFound
from bridges.checkpoint.sources import DictSource
from tests.bridges import vlm_tiny

E = 2


def _arch(family="qwen3_vl_moe", **text):
    config = vlm_tiny.hf_config(family, **text).to_dict()
    return qwen3_vl_moe.architecture(config) if family == "qwen3_vl_moe" else glm45v.architecture(config)


def _experts(hidden, ffn, gate_up_orientation, down_orientation):
    """Fused expert tensors of two layers, each kind in the given orientation ("in_out" / "out_in")."""
    gate_up = {"in_out": (E, hidden, 2 * ffn), "out_in": (E, 2 * ffn, hidden)}[gate_up_orientation]
    down = {"in_out": (E, ffn, hidden), "out_in": (E, hidden, ffn)}[down_orientation]
    tensors = {}
    for layer in (1, 2):
        p = f"model.language_model.layers.{layer}.mlp.experts."
        tensors[p + "gate_up_proj"], tensors[p + "down_proj"] = torch.zeros(gate_up), torch.zeros(down)
    return DictSource(tensors)


IN_OUT, FUSED = ExpertLayout.FUSED_IN_OUT, ExpertLayout.FUSED


@pytest.mark.parametrize("orientation, expected", [("in_out", IN_OUT), ("out_in", FUSED)])
def test_orientation_from_shapes_whatever_the_version(orientation, expected):
    arch = _arch(hidden_size=48, moe_intermediate_size=16)
    for version in ("4.57.0", "5.24.0", None):
        config = {"transformers_version": version} if version else {}
        found = qwen3_vl_moe.FAMILY.detect(_experts(48, 16, orientation, orientation), arch, config)
        assert found == LayoutFound(expected)


@pytest.mark.parametrize("hidden, ffn, square", [(32, 16, "gate_up_proj"), (16, 16, "down_proj")])
@pytest.mark.parametrize("version, orientation, expected", [
    ("5.24.0", "out_in", FUSED), ("4.57.0", "in_out", IN_OUT), (None, "in_out", IN_OUT),
])
def test_square_experts_follow_transformers_version_and_say_so(hidden, ffn, square, version, orientation, expected,
                                                               caplog):
    arch = _arch(hidden_size=hidden, moe_intermediate_size=ffn)
    config = {"transformers_version": version} if version else None
    layout, notes = astuple(qwen3_vl_moe.FAMILY.detect(_experts(hidden, ffn, orientation, orientation), arch, config))
    assert layout == expected
    assert len(notes) == 1 and square in notes[0] and "cannot tell" in notes[0] and (version or "(none)") in notes[0]
    assert notes[0] in caplog.text  # a log line


def test_orientation_contradictions_are_refused():
    arch = _arch(hidden_size=32, moe_intermediate_size=16)  # H == 2I: gate_up_proj is square
    with pytest.raises(ValueError, match="disagree"):  # down_proj says released, the version says transformers 5
        qwen3_vl_moe.FAMILY.detect(_experts(32, 16, "in_out", "in_out"), arch, {"transformers_version": "5.1.0"})
    arch = _arch(hidden_size=48, moe_intermediate_size=16)
    with pytest.raises(ValueError, match="disagree"):
        qwen3_vl_moe.FAMILY.detect(_experts(48, 16, "in_out", "out_in"), arch, {})
    with pytest.raises(ValueError, match="neither"):
        qwen3_vl_moe.FAMILY.detect(_experts(40, 16, "in_out", "in_out"), arch, {})


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "glm4v_moe"])
def test_config_translation_round_trips_and_loads_in_transformers(family):
    import transformers

    module = qwen3_vl_moe if family == "qwen3_vl_moe" else glm45v
    source = vlm_tiny.hf_config(family).to_dict()
    arch = module.architecture(source)
    for exported in (module.hf_config(arch, source, torch.bfloat16), module.hf_config(arch)):
        assert module.architecture(exported) == arch
        loaded = getattr(transformers, vlm_tiny.FAMILIES[family][0].replace("ForConditionalGeneration", "Config"))(
            **exported)
        assert loaded.image_token_id == vlm_tiny.IMAGE and loaded.text_config.num_hidden_layers == 4
    assert module.hf_config(arch, source, torch.bfloat16)["dtype"] == "bfloat16"
    assert module.hf_config(arch, source)["video_token_id"] == vlm_tiny.VIDEO  # from the source
    assert "transformers_version" not in module.hf_config(arch)  # orientation of a sourceless export: released


def test_family_facts():
    q, g = _arch("qwen3_vl_moe"), _arch("glm4v_moe")
    assert q.mrope.section == (4, 2, 2) and q.mrope.interleaved and q.extra["vision"].deepstack_layers == 2
    assert q.transformer["moe_layer_freq"] == [0, 1, 1, 1] and q.transformer["qk_layernorm"]
    assert g.mrope.section == (2, 1, 1) and not g.mrope.interleaved and g.rotary_percent == 0.5
    assert g.mtp_num_layers == 0 and g.transformer["moe_layer_freq"] == [0, 1, 1, 1]
    with pytest.raises(HFConfigError, match="attention_bias"):
        _arch("qwen3_vl_moe", attention_bias=True)


def test_mrope_positions_match_transformers():
    from transformers import Qwen3VLMoeModel

    from bridges.megatron.mrope import mrope_position_ids

    hf = Qwen3VLMoeModel(vlm_tiny.hf_config("qwen3_vl_moe"))
    ids = torch.randint(0, vlm_tiny.IMAGE, (2, 24), generator=torch.Generator().manual_seed(0))
    block = [vlm_tiny.START] + [vlm_tiny.IMAGE] * 4 + [vlm_tiny.END]
    ids[0, 1:7] = ids[0, 10:16] = ids[1, 17:23] = torch.tensor(block)
    ids[1, 2:2 + 8] = torch.tensor([vlm_tiny.START] + [vlm_tiny.IMAGE] * 6 + [vlm_tiny.END])
    grids = torch.tensor([[1, 4, 4], [1, 4, 4], [1, 4, 6], [1, 4, 4]])
    expected, _ = hf.get_rope_index(ids, (ids == vlm_tiny.IMAGE).int(), image_grid_thw=grids)
    assert torch.equal(mrope_position_ids(ids, vlm_tiny.IMAGE, grids, vlm_tiny.MERGE), expected)


def test_interleaved_rotary_matches_transformers():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextRotaryEmbedding

    from bridges.megatron import cpu_runtime
    from bridges.megatron.mrope import InterleavedMultimodalRotaryEmbedding

    cpu_runtime.enable()
    text = vlm_tiny.hf_config("qwen3_vl_moe", rope_parameters={
        "rope_type": "default", "rope_theta": 5e5, "mrope_section": [3, 3, 2], "mrope_interleaved": True}).text_config
    positions = torch.randint(0, 300, (3, 2, 9), generator=torch.Generator().manual_seed(1))
    cos, sin = Qwen3VLMoeTextRotaryEmbedding(text)(torch.zeros(1, dtype=torch.float32), positions)
    sectioned = MultimodalRotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=5e5)
    emb = InterleavedMultimodalRotaryEmbedding.like(sectioned)(positions, [3, 3, 2])  # [seq, batch, 1, 16]
    angles = emb[:, :, 0].transpose(0, 1)
    assert torch.equal(angles.cos(), cos) and torch.equal(angles.sin(), sin)
    # Megatron's own (contiguous sections) differs wherever the H / W positions differ from T
    assert not torch.equal(sectioned(positions, [3, 3, 2])[:, :, 0].transpose(0, 1).cos(), cos)


def test_aux_loss_default_is_transformers_when_the_config_omits_it():
    import transformers

    config = vlm_tiny.hf_config("qwen3_vl_moe").to_dict()
    del config["text_config"]["router_aux_loss_coef"]
    arch = qwen3_vl_moe.architecture(config)
    default = transformers.Qwen3VLMoeTextConfig().router_aux_loss_coef
    assert arch.transformer["moe_aux_loss_coeff"] == default > 0
    assert arch.transformer["moe_router_load_balancing_type"] == "aux_loss"
    assert qwen3_vl_moe.hf_config(arch, config)["text_config"]["router_aux_loss_coef"] == default
