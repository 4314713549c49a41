"""Qwen3.5-MoE bridge end to end on tiny random checkpoints (Gated DeltaNet and gated-attention layers, gated shared
expert, MTP, vision tower): import -> export reproduces every HF tensor bit for bit (`mtp.*` included with MTP on,
left out with MTP off), and the Megatron model's logits match transformers, text-only and with images, under EP1,
EP2, TP2, PP2 (one launch of two processes), TP2 x EP2 and TP2 x EP2 x expert-TP1 (four); the EP2 exports load in
transformers with no missing or unexpected keys and say how many MTP layers they hold. The text-only config
(`qwen3_5_moe_text`, Qwen3_5MoeForCausalLM) passes `bridges.verify` under TP2."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.bridges import qwen35_tiny
from tests.launcher import run_distributed

# (on-disk expert layout, MTP built): per-expert with MTP on, fused [E, out, in] with MTP off
CASES = [("per_expert", True), ("fused", False)]


def _atol(reference: torch.Tensor) -> float:
    """fp32 logits: 1e-5 relative to their scale (Gated DeltaNet's chunked delta rule sums in another order than
    transformers' triangular solve)."""
    return 1e-5 * max(1.0, reference.abs().max().item())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{case: (directory, transformers text-only logits, transformers logits with images)}."""
    root = tmp_path_factory.mktemp("qwen35")
    out = {}
    for layout, mtp in CASES:
        directory = str(root / layout)
        qwen35_tiny.make_checkpoint(directory, layout, mtp=1)
        out[(layout, mtp)] = (directory, *(qwen35_tiny.transformers_logits(directory, i) for i in (False, True)))
    return out


# ---- run on every rank ------------------------------------------------------------------------


def round_trips(directories, layouts, export_root=None):
    """Per (parallel layout, case): detected expert layout, ignored HF names, this rank's exported pieces, text and
    image logits. With `export_root`, EP2 exports are also written there (every rank its own pieces)."""
    import torch.distributed as dist

    from bridges.checkpoint import hf_config as hfc
    from bridges.export.specs import export_pieces, hf_tensor_specs
    from bridges.export.writer import write_checkpoint
    from bridges.load import import_weights
    from bridges.megatron import parallel
    from bridges.megatron.forward import main_logits
    from bridges.megatron.vlm import build_vlm_model
    from bridges.models import family_for
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    x = qwen35_tiny.inputs()
    images = {"pixel_values": x["pixel_values"], "image_grid_thw": x["image_grid_thw"]}
    results = []
    for layout in layouts:
        for case, directory in directories.items():
            config = hfc.load_config(directory)
            family = family_for(config)
            arch = family.architecture(config)
            arch = arch if case[1] else arch.without_mtp()
            parallel.initialize(layout)
            model = build_vlm_model(arch, layout)
            report = import_weights([model], family, arch, SafetensorsCheckpoint(directory), config=config)
            pieces = [(p.spec.hf_name, p.spec.region, p.tensor.numpy())
                      for p in export_pieces([model], family, arch, None, report.expert_layout)]
            text = main_logits(model, x["input_ids"], arch.vocab_size).numpy()
            image = main_logits(model, x["input_ids"], arch.vocab_size, **images).numpy()
            if export_root and layout.ep > 1:
                out = os.path.join(export_root, case[0])
                specs = hf_tensor_specs(family, arch, torch.float32, report.expert_layout)
                write_checkpoint(export_pieces([model], family, arch, None, report.expert_layout), specs, out)
                if dist.get_rank() == 0:
                    with open(os.path.join(out, "config.json"), "w") as f:
                        json.dump(family.hf_config(arch, config, torch.float32), f)
                dist.barrier()
            results.append((str(layout), case, report.expert_layout, sorted(report.ignored), pieces, text, image))
    return results


def world2(directories, layouts, export_root, text_directory):
    """The round trips, and `bridges.verify` of the text-only checkpoint under TP2."""
    from bridges.megatron.layout import ParallelLayout
    from bridges.verify import verify

    trips = round_trips(directories, layouts, export_root)
    report = verify(text_directory, ParallelLayout(tp=2), sequences=2, seq_length=16)
    return trips, (report.ok, report.differ, report.not_covered, report.max_abs_diff, report.exported)


# ---- checks -----------------------------------------------------------------------------------


def _assert_round_trips(results, checkpoints, layouts: int):
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    by_case = {}
    for rank_results in results:
        for layout, case, detected, ignored, pieces, text, image in rank_results:
            assert detected == case[0], f"{layout} {case}: detected {detected}"
            mtp_names = [n for n in SafetensorsCheckpoint(checkpoints[case][0]).keys() if n.startswith("mtp.")]
            assert ignored == ([] if case[1] else sorted(mtp_names)), f"{layout} {case}: ignored {ignored}"
            entry = by_case.setdefault((layout, case), {"pieces": [], "logits": []})
            entry["pieces"] += pieces
            entry["logits"].append((torch.from_numpy(text), torch.from_numpy(image)))
    assert len(by_case) == layouts * len(checkpoints)
    for (layout, case), entry in by_case.items():
        directory, text_reference, image_reference = checkpoints[case]
        source = SafetensorsCheckpoint(directory)
        expected = [n for n in source.keys() if case[1] or not n.startswith("mtp.")]
        assert any(n.startswith("mtp.") for n in expected) == case[1]
        rebuilt = {n: torch.full(source.shape(n), float("nan")) for n in expected}
        writes = {n: torch.zeros(source.shape(n), dtype=torch.int32) for n in expected}
        for name, region, values in entry["pieces"]:
            assert name in rebuilt, f"{layout} {case}: export wrote {name}, which it should not"
            rebuilt[name][region] = torch.from_numpy(values)
            writes[name][region] += 1
        for name in expected:
            assert bool((writes[name] == 1).all()), f"{layout} {case}: {name} not written exactly once"
            assert torch.equal(rebuilt[name], source.read(name)), f"{layout} {case}: {name} differs"
        for rank, (text, image) in enumerate(entry["logits"]):
            for what, got, want in (("text-only", text, text_reference), ("image", image, image_reference)):
                diff = (got - want).abs().max().item()
                assert diff <= _atol(want), f"{layout} {case} rank {rank}: {what} logits differ by {diff}"


def _directories(checkpoints):
    return {case: directory for case, (directory, _, _) in checkpoints.items()}


def test_ep1_ep2_tp2_pp2_and_exports_load_in_transformers(checkpoints, tmp_path):
    import transformers

    from bridges.megatron.layout import ParallelLayout
    from bridges.models import family_for

    layouts = [ParallelLayout(), ParallelLayout(ep=2), ParallelLayout(tp=2), ParallelLayout(pp=2)]
    text_directory = str(tmp_path / "text_only")
    qwen35_tiny.make_text_checkpoint(text_directory)
    results = run_distributed(2, world2, _directories(checkpoints), layouts, str(tmp_path), text_directory)
    _assert_round_trips([trips for trips, _ in results], checkpoints, len(layouts))
    ok, differ, not_covered, text_diff, exported = results[0][1]  # the verify report is complete on rank 0
    assert ok and not differ and not not_covered and exported > 0, (differ, not_covered)
    assert text_diff <= 1e-4, f"text-only model (qwen3_5_moe_text) logits differ by {text_diff}"
    x = qwen35_tiny.inputs()
    for (layout, mtp), (directory, _, image_reference) in checkpoints.items():
        exported = str(tmp_path / layout)
        model, info = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(
            exported, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (layout, info)
        with torch.no_grad():
            logits = model.eval()(**x, mm_token_type_ids=(x["input_ids"] == qwen35_tiny.IMAGE).int()).logits
        assert (logits - image_reference).abs().max().item() <= _atol(image_reference), layout
        # the exported config describes the model that was built, MTP layer count included
        source, config = (json.load(open(f"{d}/config.json")) for d in (directory, exported))
        assert config["text_config"]["mtp_num_hidden_layers"] == int(mtp)
        built = family_for(source).architecture(source)
        assert family_for(config).architecture(config) == (built if mtp else built.without_mtp())
        index = json.load(open(f"{exported}/model.safetensors.index.json"))["weight_map"]
        assert any(n.startswith("mtp.") for n in index) == mtp


def world4(directories):
    """TP2 x EP2 (expert-TP 2) on the per-expert checkpoint with MTP, expert-TP 1 on the fused one without."""
    from bridges.megatron.layout import ParallelLayout

    (per_expert, mtp), (fused, no_mtp) = CASES
    return (round_trips({(per_expert, mtp): directories[(per_expert, mtp)]}, [ParallelLayout(tp=2, ep=2)])
            + round_trips({(fused, no_mtp): directories[(fused, no_mtp)]}, [ParallelLayout(tp=2, ep=2, etp=1)]))


def test_tp2_x_ep2_and_expert_tp1(checkpoints):
    results = run_distributed(4, world4, _directories(checkpoints))
    _assert_round_trips(results, checkpoints, 1)
