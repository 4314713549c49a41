"""GLM-4.5 bridge end to end on a tiny random checkpoint: import -> export reproduces every HF tensor bit
for bit and Megatron logits match transformers, under TP / EP / PP / TPxEP, for both on-disk expert
layouts; other Megatron naming schemes (later MTP inner name, grouped experts, TE norms) convert alike."""

from __future__ import annotations

import pytest
import torch

from tests.bridges.glm45_tiny import make_checkpoint
from tests.launcher import run_distributed

EXPERT_LAYOUTS = ("per_expert", "fused")
LOGITS_ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{expert layout: (directory, token ids, transformers logits)}."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("glm45")
    out = {}
    for layout in EXPERT_LAYOUTS:
        directory = str(root / layout)
        make_checkpoint(directory, fused=layout == "fused")
        ids = torch.randint(0, 101, (3, 16), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(directory).eval()(ids).logits
        out[layout] = (directory, ids, logits)
    return out


# ---- run on every rank ------------------------------------------------------------------------


def _setup(directory, layout, mtp=True):
    from bridges.checkpoint import hf_config as hfc
    from bridges.megatron import build, parallel
    from bridges.models import glm45

    config = hfc.load_config(directory)
    arch = glm45.architecture(config)
    arch = arch if mtp else arch.without_mtp()
    parallel.initialize(layout)
    return config, arch, build.build_gpt_model(arch, layout)


def round_trips(checkpoints, layouts):
    """For each (parallel layout, expert layout): this rank's exported pieces and the main logits."""
    from bridges.export.specs import export_pieces
    from bridges.load import import_weights
    from bridges.megatron.forward import main_logits
    from bridges.models import glm45
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    results = []
    for layout in layouts:
        for expert_layout, (directory, ids, _) in checkpoints.items():
            config, arch, model = _setup(directory, layout)
            report = import_weights([model], glm45.FAMILY, arch, SafetensorsCheckpoint(directory), config=config)
            exported = export_pieces([model], glm45.FAMILY, arch, None, report.expert_layout)
            pieces = [(p.spec.hf_name, p.spec.region, p.tensor.numpy()) for p in exported]
            logits = main_logits(model, ids, arch.vocab_size).numpy()
            # numpy, not torch: torch shares returned tensors by file descriptor, gone once this process exits.
            results.append((layout, expert_layout, report.expert_layout, pieces, logits))
    return results


def other_namings(directory):
    """Export from / import into the same model seen under later Megatron-Core names."""
    from bridges.export.specs import export_pieces
    from bridges.load import import_weights
    from bridges.megatron.layout import ParallelLayout
    from bridges.models import glm45
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    config, arch, model = _setup(directory, ParallelLayout())
    source = SafetensorsCheckpoint(directory)
    import_weights([model], glm45.FAMILY, arch, source)
    renamed = Renamed(model)
    assert any(".mtp_model_layer." in n for n in renamed.state_dict()) and any(".linear_fc1.weight7" in n for n in renamed.state_dict())
    differ = [p.spec.hf_name for p in export_pieces([renamed], glm45.FAMILY, arch) if not torch.equal(p.tensor, source.read(p.spec.hf_name, p.spec.region))]
    _, _, fresh = _setup(directory, ParallelLayout())
    import_weights([Renamed(fresh)], glm45.FAMILY, arch, source)
    unequal = [n for n, t in fresh.state_dict().items() if torch.is_tensor(t) and not torch.equal(t, model.state_dict()[n])]
    return differ, unequal


class Renamed:
    """A built model whose state dict uses a later release's MTP inner name (`mtp_model_layer`),
    TEGroupedMLP expert names (`experts.linear_fc1.weight{k}`) and TE's fused norm names."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def state_dict(self, keep_vars=False):
        import re

        renames = [
            (r"\.transformer_layer\.", ".mtp_model_layer."),
            (r"\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$", r".experts.\2.weight\1"),
            (r"\.input_layernorm\.weight$", ".self_attention.linear_qkv.layer_norm_weight"),
        ]
        out = {}
        state = self._model.state_dict(keep_vars=keep_vars)
        for name, value in state.items():
            for pattern, new in renames:
                name = re.sub(pattern, new, name)
            dense = name.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.weight") in state
            if name.endswith("pre_mlp_layernorm.weight") and dense:
                name = name.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
            out[name] = value
        return out


# ---- tests ------------------------------------------------------------------------------------


def _assert_round_trip(results, checkpoints):
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    by_case = {}
    for rank_results in results:
        for layout, expert_layout, detected, pieces, logits in rank_results:
            case = by_case.setdefault((layout, expert_layout), {"pieces": [], "logits": []})
            assert detected == expert_layout
            case["pieces"] += [(name, region, torch.from_numpy(values)) for name, region, values in pieces]
            # Data-parallel replicas may sum expert outputs in another order: each is checked.
            case["logits"].append(torch.from_numpy(logits))
    for (layout, expert_layout), case in by_case.items():
        directory, _, reference = checkpoints[expert_layout]
        source = SafetensorsCheckpoint(directory)
        rebuilt = {n: torch.full(source.shape(n), float("nan")) for n in source.keys()}
        writes = {n: torch.zeros(source.shape(n), dtype=torch.int32) for n in source.keys()}
        for name, region, tensor in case["pieces"]:
            assert name in rebuilt, f"{layout}: export wrote {name}, which the source does not have"
            rebuilt[name][region] = tensor
            writes[name][region] += 1
        for name in source.keys():
            assert bool((writes[name] == 1).all()), f"{layout} {expert_layout}: {name} not written exactly once"
            assert torch.equal(rebuilt[name], source.read(name)), f"{layout} {expert_layout}: {name} differs"
        for rank, logits in enumerate(case["logits"]):
            diff = (logits - reference).abs().max().item()
            assert diff <= LOGITS_ATOL, f"{layout} {expert_layout} rank {rank}: logits differ from transformers by {diff}"


def test_world_1(checkpoints):
    from bridges.megatron.layout import ParallelLayout

    results = run_distributed(1, round_trips, checkpoints, [ParallelLayout()])
    _assert_round_trip(results, checkpoints)


def test_world_2_ep_tp_pp(checkpoints):
    from bridges.megatron.layout import ParallelLayout

    # The last: uneven pipeline stages (1 + 3 layers), placed by the layout and named by global layer number.
    layouts = [ParallelLayout(ep=2), ParallelLayout(tp=2), ParallelLayout(pp=2), ParallelLayout(pp=2, first_stage_layers=1)]
    _assert_round_trip(run_distributed(2, round_trips, checkpoints, layouts), checkpoints)


def test_world_4_tp_x_ep(checkpoints):
    from bridges.megatron.layout import ParallelLayout

    _assert_round_trip(run_distributed(4, round_trips, checkpoints, [ParallelLayout(tp=2, ep=2)]), checkpoints)


def test_later_megatron_names_convert_alike(checkpoints):
    [(differ, unequal)] = run_distributed(1, other_namings, checkpoints["per_expert"][0])
    assert differ == [] and unequal == []


@pytest.mark.parametrize("expert_layout", EXPERT_LAYOUTS)
def test_hf_tensor_specs_describe_the_checkpoint(checkpoints, expert_layout):
    from bridges.checkpoint import hf_config as hfc
    from bridges.export.specs import hf_tensor_specs
    from bridges.models import glm45
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    directory = checkpoints[expert_layout][0]
    source = SafetensorsCheckpoint(directory)
    specs = hf_tensor_specs("glm4_moe", glm45.architecture(hfc.load_config(directory)), torch.float32, expert_layout)
    assert specs == {n: (source.shape(n), source.dtype(n)) for n in source.keys()}
