"""DeepSeek-V3 bridge: config translation against transformers' `DeepseekV3Config` (hub spelling included),
clear refusals of what Megatron cannot express, the grouped sigmoid router against transformers', and on tiny
random checkpoints written by `save_pretrained` (+ MTP layer): import -> export through the file writer
reproduces every tensor bit for bit, Megatron logits match transformers (EP1, EP2, TP2, PP2, TP2 x EP2) and
each export loads with `from_pretrained` (only the MTP layer, which transformers does not build, left over)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bridges.checkpoint import hf_config as hfc
from bridges.models import deepseek_v3
from tests.bridges.deepseek_v3_tiny import MAIN, VARIANT, fuse_experts, make_checkpoint
from tests.launcher import run_distributed

# DeepSeek-V3's hub config.json (transformers 4 era), less its fp8 quantization_config.
HUB = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
    "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}, "rope_theta": 10000,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 4,
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 129280,
}
LOGITS_ATOL = 1e-5


# ---- config translation -----------------------------------------------------------------------


def test_architecture_field_by_field():
    from transformers import DeepseekV3Config

    ref = DeepseekV3Config(**HUB)  # transformers' reading of the same file
    arch = deepseek_v3.architecture(HUB)
    t = arch.transformer
    assert t["num_layers"] == ref.num_hidden_layers == 61 and t["hidden_size"] == ref.hidden_size
    assert t["multi_latent_attention"] and t["qk_layernorm"]
    assert (t["q_lora_rank"], t["kv_lora_rank"]) == (ref.q_lora_rank, ref.kv_lora_rank) == (1536, 512)
    assert (t["qk_head_dim"], t["qk_pos_emb_head_dim"], t["v_head_dim"]) == (128, 64, 128)
    assert t["num_query_groups"] == t["num_attention_heads"] == ref.num_attention_heads
    assert t["moe_layer_freq"] == [0] * 3 + [1] * 58
    assert t["num_moe_experts"] == 256 and t["moe_ffn_hidden_size"] == 2048
    assert t["moe_shared_expert_intermediate_size"] == 2048 and t["moe_router_topk"] == 8
    assert t["moe_router_score_function"] == "sigmoid" and t["moe_router_enable_expert_bias"]
    assert (t["moe_router_num_groups"], t["moe_router_group_topk"]) == (8, 4)
    assert t["moe_router_topk_scaling_factor"] == ref.routed_scaling_factor == 2.5
    assert t["layernorm_epsilon"] == ref.rms_norm_eps
    assert arch.rotary_base == ref.rope_parameters["rope_theta"] == 10000
    y = arch.yarn
    assert (y.factor, y.original_max_position_embeddings, y.mscale, y.mscale_all_dim) == (40, 4096, 1.0, 1.0)
    assert arch.mtp_num_layers == 1 and arch.vocab_size == 129280
    assert hfc.dtype(HUB) == torch.bfloat16


@pytest.mark.parametrize("fields", [MAIN, VARIANT], ids=["main", "variant"])
def test_hf_config_round_trips(fields):
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(**fields).to_dict()
    arch = deepseek_v3.architecture(config)
    out = deepseek_v3.hf_config(arch, source=config, dtype=torch.float32)
    assert deepseek_v3.architecture(out) == arch
    ref, back = DeepseekV3Config(**config).to_dict(), DeepseekV3Config(**out).to_dict()
    for key in set(ref) - {"transformers_version", "architectures", "dtype"}:  # the export adds these two
        assert back[key] == ref[key], key
    hub = deepseek_v3.hf_config(deepseek_v3.architecture(HUB), source=HUB)
    assert not {"rope_scaling", "rope_theta", "torch_dtype"} & set(hub) and hub["rope_parameters"]["factor"] == 40
    assert deepseek_v3.architecture(hub) == deepseek_v3.architecture(HUB)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ({"topk_method": "group_limited_greedy"}, "topk_method"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
        ({"rope_interleave": False}, "rope_interleave"),
        ({"attention_bias": True}, "attention_bias"),
        ({"norm_topk_prob": False}, "norm_topk_prob"),
        ({"topk_group": 2}, "num_experts_per_tok / topk_group == 2"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
        ({"rope_scaling": dict(HUB["rope_scaling"], mscale=0)}, "mscale_all_dim without mscale"),
        ({"rope_scaling": dict(HUB["rope_scaling"], truncate=False)}, "truncate"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "deepseek_v2"}, "model_type"),
    ],
)
def test_unsupported_configs_are_refused(fields, words):
    with pytest.raises(hfc.HFConfigError, match=words):
        deepseek_v3.architecture(dict(HUB, **fields))


def test_grouped_router_weights_match_transformers():
    """Sigmoid + expert bias, grouped top-k (top-2 sum per group), normalised and scaled."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hidden = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    for fields in (MAIN, VARIANT):
        config = DeepseekV3Config(**fields)
        router = DeepseekV3TopkRouter(config)
        gen = torch.Generator().manual_seed(1)
        torch.nn.init.normal_(router.weight, generator=gen)
        router.e_score_correction_bias.copy_(0.1 * torch.randn(config.n_routed_experts, generator=gen))
        logits, weights, experts = router(hidden)
        t = deepseek_v3.architecture(config.to_dict()).transformer
        probs, chosen = topk_routing_with_score_function(
            logits.detach(), t["moe_router_topk"], use_pre_softmax=False, num_groups=t["moe_router_num_groups"],
            group_topk=t["moe_router_group_topk"], scaling_factor=t["moe_router_topk_scaling_factor"],
            score_function="sigmoid", expert_bias=router.e_score_correction_bias,
        )
        expected = torch.zeros_like(probs).scatter(1, experts, weights.detach())
        assert torch.equal(chosen, expected > 0)
        torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)


# ---- weights, under parallel layouts -----------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{case: (directory, token ids, transformers logits)}; "fused" holds MAIN's weights with fused experts."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("deepseek_v3")
    ids = torch.randint(0, 101, (3, 16), generator=torch.Generator().manual_seed(7))
    out = {}
    for case, fields in (("main", MAIN), ("variant", VARIANT)):
        make_checkpoint(str(root / case), seed=len(out), **fields)
        with torch.no_grad():
            out[case] = (str(root / case), ids, AutoModelForCausalLM.from_pretrained(str(root / case))(ids).logits)
    fused = root / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((root / "main" / "config.json").read_text())
    tensors = fuse_experts(load_file(str(root / "main" / "model.safetensors")), MAIN["n_routed_experts"])
    save_file(tensors, str(fused / "model.safetensors"), metadata={"format": "pt"})
    out["fused"] = (str(fused), ids, out["main"][2])
    return out


def export_round_trips(checkpoints, runs, out_root):
    """Every rank: per (parallel layout, case) in `runs` import the checkpoint, write the export with the
    owner-writes engine into `out_root` (config by rank 0) and compute the Megatron logits; returns the logits."""
    import torch.distributed as dist

    from bridges.export.specs import export_pieces, hf_tensor_specs
    from bridges.export.writer import write_checkpoint
    from bridges.load import import_weights
    from bridges.megatron import build, parallel
    from bridges.megatron.forward import main_logits
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    logits = {}
    for layout, case in runs:
        directory, ids, _ = checkpoints[case]
        config = hfc.load_config(directory)
        arch = deepseek_v3.architecture(config)
        parallel.initialize(layout)
        model = build.build_gpt_model(arch, layout)
        report = import_weights([model], deepseek_v3, arch, SafetensorsCheckpoint(directory), config=config)
        out = os.path.join(out_root, _name(layout, case))
        specs = hf_tensor_specs(deepseek_v3, arch, torch.float32, report.expert_layout)
        write_checkpoint(export_pieces([model], deepseek_v3, arch, None, report.expert_layout), specs, out)
        if dist.get_rank() == 0:
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(deepseek_v3.hf_config(arch, config, torch.float32), f)
        # numpy: torch would share the tensor by a file descriptor that dies with this process
        logits[_name(layout, case)] = main_logits(model, ids, arch.vocab_size).numpy()
    return logits


def _name(layout, case) -> str:
    return f"tp{layout.tp}_pp{layout.pp}_ep{layout.ep}_{case}"


def _check(checkpoints, runs, world_size, tmp_path):
    from transformers import AutoModelForCausalLM

    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    per_rank = run_distributed(world_size, export_round_trips, checkpoints, runs, str(tmp_path))
    for layout, case in runs:
        name = _name(layout, case)
        directory, ids, reference = checkpoints[case]
        source, exported = SafetensorsCheckpoint(directory), SafetensorsCheckpoint(str(tmp_path / name))
        assert sorted(exported.keys()) == sorted(source.keys()), name
        differ = [n for n in source.keys() if not torch.equal(exported.read(n), source.read(n))]
        assert differ == [], f"{name}: not bit-identical after import -> export: {differ}"
        for rank, logits in enumerate(r[name] for r in per_rank):
            diff = (torch.from_numpy(logits) - reference).abs().max().item()
            assert diff <= LOGITS_ATOL, f"{name} rank {rank}: logits differ from transformers by {diff}"
        model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / name), output_loading_info=True)
        mtp_layer = f"model.layers.{MAIN['num_hidden_layers']}."
        assert not info["missing_keys"] and all(k.startswith(mtp_layer) for k in info["unexpected_keys"]), (name, info)
        expected = AutoModelForCausalLM.from_pretrained(directory).state_dict()
        loaded = model.state_dict()
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected), name
        with torch.no_grad():
            diff = (model(ids).logits - reference).abs().max().item()
        assert diff <= 1e-5 * reference.abs().max().item(), f"{name}: reloaded export's logits differ by {diff}"


def test_world_2_ep1_ep2_tp2_pp2(checkpoints, tmp_path):
    """EP1 runs as two data-parallel replicas (one process start less than a world of one)."""
    from bridges.megatron.layout import ParallelLayout

    runs = [(ParallelLayout(), "main"), (ParallelLayout(), "fused"), (ParallelLayout(ep=2), "main"),
            (ParallelLayout(ep=2), "variant"), (ParallelLayout(tp=2), "variant"),
            # 3 layers: uneven stages (1 dense + 2 MoE with the MTP layer)
            (ParallelLayout(pp=2, first_stage_layers=1), "variant")]
    _check(checkpoints, runs, 2, tmp_path)


def test_world_4_tp_x_ep(checkpoints, tmp_path):
    from bridges.megatron.layout import ParallelLayout

    _check(checkpoints, [(ParallelLayout(tp=2, ep=2), case) for case in ("main", "variant")], 4, tmp_path)


def test_hf_tensor_specs_describe_the_checkpoints(checkpoints):
    from bridges.export.specs import hf_tensor_specs
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    for case, (directory, _, _) in checkpoints.items():
        source = SafetensorsCheckpoint(directory)
        layout = deepseek_v3.detect_expert_layout(source.keys())
        assert layout == ("fused" if case == "fused" else "per_expert")
        arch = deepseek_v3.architecture(hfc.load_config(directory))
        specs = hf_tensor_specs(deepseek_v3, arch, torch.float32, layout)
        assert specs == {n: (source.shape(n), source.dtype(n)) for n in source.keys()}, case
