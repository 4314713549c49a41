"""The export plan of the real GLM-4.5 (355B: 92 layers, 160 experts, MTP 1) at training layouts of 32 and
256 ranks, from metadata alone (no model, no tensor): every byte of every HF tensor has exactly one
writer, files stay under the shard size, row-parallel shards are merged in an order all ranks can follow,
and the busiest rank writes little more than the mean. How long planning takes is measured by
`python benchmarks/plan_bench.py` (`make bench`), not asserted here: CPU time too grows on a loaded machine."""

from __future__ import annotations

import time

import pytest
import torch

from bridges.export.specs import hf_tensor_specs
from bridges.export.coverage import check_coverage
from bridges.export.writer import DEFAULT_MAX_SHARD_BYTES, _plan_merges
from bridges.export.plan import plan_files
from bridges.megatron.layout import ParallelLayout
from bridges.models import glm45
from bridges.checkpoint.piece_bytes import piece_nbytes
from bridges.checkpoint.safetensors_format import itemsize
from bridges.export.virtual_ranks import LayoutPlanner

# zai-org/GLM-4.5 config.json, the fields that fix tensor shapes and the config translation.
GLM45_355B = {
    "model_type": "glm4_moe",
    "architectures": ["Glm4MoeForCausalLM"],
    "num_hidden_layers": 92,
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "n_routed_experts": 160,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151552,
    "num_nextn_predict_layers": 1,
    "attention_bias": True,
    "use_qk_norm": True,  # the released model normalises queries and keys
    "partial_rotary_factor": 0.5,
    "rope_theta": 1000000,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "routed_scaling_factor": 2.5,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
DTYPE = torch.bfloat16
BALANCE = 1.25  # the busiest rank writes at most this many times the mean

LAYOUTS = [
    # 92 layers do not split over 8 stages evenly: 10 on the first and last stage, 12 on the others.
    pytest.param(ParallelLayout(tp=2, pp=8, ep=16), 256, {"first_stage_layers": 10, "last_stage_layers": 10},
                 id="tp2-pp8-ep16-on-256"),
    pytest.param(ParallelLayout(tp=8, pp=4, ep=8, etp=1), 32, {}, id="tp8-pp4-ep8-etp1-on-32"),
]


@pytest.fixture(scope="module")
def arch():
    return glm45.architecture(GLM45_355B)


@pytest.fixture(scope="module")
def tensor_specs(arch):
    return hf_tensor_specs(glm45.FAMILY, arch, DTYPE)


def test_the_config_is_the_355b_model(tensor_specs):
    total = sum(torch.Size(shape).numel() for shape, _ in tensor_specs.values())
    # 355B in the main model plus the MTP layer (a full MoE layer, eh_proj and its copies of embedding and head).
    assert 355e9 < total < 362e9, total
    assert len([n for n in tensor_specs if ".mlp.experts." in n]) == (92 - 3 + 1) * 160 * 3
    # QK norm: one q_norm and one k_norm [head_dim] per layer, the MTP layer's included
    assert len([n for n in tensor_specs if n.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight"))]) == 93 * 2


@pytest.mark.parametrize("layout, world, stages", LAYOUTS)
def test_export_plan_at_full_scale(arch, tensor_specs, layout, world, stages):
    start = time.process_time()
    planner = LayoutPlanner(glm45.FAMILY, arch, layout, world, **stages)
    specs_by_rank = planner.all_export_specs(DTYPE)
    check_coverage(tensor_specs, specs_by_rank)  # every element exactly once, no overlap
    plan = plan_files(tensor_specs, DEFAULT_MAX_SHARD_BYTES)
    merges = _plan_merges(specs_by_rank)  # row-parallel shards gathered in the TP group, in one agreed order
    seconds = time.process_time() - start

    total = sum(torch.Size(shape).numel() * itemsize(dtype) for shape, dtype in tensor_specs.values())
    written = [sum(piece_nbytes(spec) for spec in specs) for specs in specs_by_rank]
    assert sum(written) == total == plan.total_size
    assert max(f.size - len(f.header) for f in plan.files) <= DEFAULT_MAX_SHARD_BYTES
    row_parallel = {n for n in tensor_specs if n.endswith(("o_proj.weight", "down_proj.weight"))}
    if layout.expert_tp == 1:
        row_parallel = {n for n in row_parallel if ".mlp.experts." not in n}
    assert {m.name for m in merges} == row_parallel
    mean = total / world
    print(f"\n{layout} on {world} ranks: {sum(map(len, specs_by_rank))} pieces, {len(plan.files)} files, "
          f"{len(merges)} merged tensors, busiest rank {max(written) / 1e9:.2f} GB = {max(written) / mean:.2f}x the mean, "
          f"planned in {seconds:.1f} s of CPU")
    assert max(written) <= BALANCE * mean


def test_import_plan_reads_what_each_rank_holds(arch, tensor_specs):
    """Each rank reads the regions of the parameters it holds: their bytes (vocab padding aside); every
    tensor but the MTP copies of embedding and head (which import checks, never loads) is read."""
    planner = LayoutPlanner(glm45.FAMILY, arch, ParallelLayout(tp=8, pp=4, ep=8, etp=1), 32)
    read_anywhere = set()
    for vrank in planner.ranks:
        specs = planner.import_specs(vrank, DTYPE)
        params = planner.params(vrank)
        held = sum(torch.Size(p.local_shape(vrank.ranks)).numel() * itemsize(p.rule.dtype or DTYPE) for p in params)
        read = sum(piece_nbytes(spec) for spec in specs)
        assert 0.99 * held <= read <= held, (vrank, read, held)
        read_anywhere.update(spec.hf_name for spec in specs)
    copies = {name for name, (_, _, mirror) in planner.ruleset.hf_tensors().items() if mirror}
    assert read_anywhere == set(tensor_specs) - copies and len(copies) == 2
