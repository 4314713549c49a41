"""Qwen3-VL-MoE and GLM-4.5V bridges end to end on tiny random checkpoints, in both on-disk expert layouts
each: import -> export reproduces every HF tensor (language and vision) bit for bit, and the Megatron
vision-language model's logits match transformers, text-only and with images, under EP1, EP2, PP2 and TP2 x EP2;
the EP2 exports, written by every rank, load in transformers with no missing or unexpected keys."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.bridges import vlm_tiny
from tests.launcher import run_distributed

CASES = [(family, layout) for family, (_, layouts) in vlm_tiny.FAMILIES.items() for layout in layouts]
LOGITS_ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(family, expert layout): (directory, transformers text-only logits, transformers logits with images)}."""
    root = tmp_path_factory.mktemp("vlm")
    out = {}
    for family, layout in CASES:
        directory = str(root / f"{family}_{layout}")
        vlm_tiny.make_checkpoint(directory, family, layout)
        logits = (vlm_tiny.transformers_logits(directory, family, images) for images in (False, True))
        out[(family, layout)] = (directory, *logits)
    return out


# ---- run on every rank ------------------------------------------------------------------------


def _imported(directory, layout):
    """(config, family, arch, this rank's model with the checkpoint imported, import report)."""
    from bridges.checkpoint import hf_config as hfc
    from bridges.load import import_weights
    from bridges.megatron import parallel
    from bridges.megatron.vlm import build_vlm_model
    from bridges.models import family_for
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    config = hfc.load_config(directory)
    family = family_for(config)
    arch = family.architecture(config)
    parallel.initialize(layout)
    model = build_vlm_model(arch, layout)
    report = import_weights([model], family, arch, SafetensorsCheckpoint(directory), config=config)
    return config, family, arch, model, report


def round_trips(directories, layouts, export_root=None):
    """Per (parallel layout, case): detected expert layout, this rank's exported pieces, text / image logits.
    With `export_root`, exports under expert parallelism are also written there (every rank its own pieces)."""
    import torch.distributed as dist

    from bridges.export.specs import export_pieces, hf_tensor_specs
    from bridges.export.writer import write_checkpoint
    from bridges.megatron.forward import main_logits

    x = vlm_tiny.inputs()
    images = {"pixel_values": x["pixel_values"], "image_grid_thw": x["image_grid_thw"]}
    results = []
    for layout in layouts:
        for case, directory in directories.items():
            config, family, arch, model, report = _imported(directory, layout)
            pieces = [(p.spec.hf_name, p.spec.region, p.tensor.numpy())
                      for p in export_pieces([model], family, arch, None, report.expert_layout)]
            text = main_logits(model, x["input_ids"], arch.vocab_size).numpy()
            image = main_logits(model, x["input_ids"], arch.vocab_size, **images).numpy()
            if export_root and layout.ep > 1:
                out = os.path.join(export_root, "_".join(case))
                specs = hf_tensor_specs(family, arch, torch.float32, report.expert_layout)
                write_checkpoint(export_pieces([model], family, arch, None, report.expert_layout), specs, out)
                if dist.get_rank() == 0:
                    with open(os.path.join(out, "config.json"), "w") as f:
                        json.dump(family.hf_config(arch, config, torch.float32), f)
                dist.barrier()
            results.append((str(layout), case, report.expert_layout, pieces, text, image))
    return results


def vision_grads(directories, layouts):
    """Per layout: the vision tower's gradients of one training step (image batch), as Megatron DDP +
    finalize_model_grads leave them in `main_grad` (DP-averaged, TP-summed for the replicated tower)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from bridges.megatron.build import causal_attention_mask

    x = vlm_tiny.inputs()
    out = {}
    for layout in layouts:
        for case, directory in directories.items():
            model = _imported(directory, layout)[3]
            ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
            ids = x["input_ids"]
            loss = ddp(ids, None, causal_attention_mask(ids.shape[1]), labels=ids, pixel_values=x["pixel_values"],
                       image_grid_thw=x["image_grid_thw"])
            loss.sum().backward()
            finalize_model_grads([ddp])
            out[(str(layout), case)] = {n: p.main_grad.numpy().copy() for n, p in model.vision.named_parameters()}
    return out


def world2(directories, layouts, export_root):
    from bridges.megatron.layout import ParallelLayout

    grads = vision_grads({c: d for c, d in directories.items() if c[1] == vlm_tiny.FAMILIES[c[0]][1][0]},
                         [ParallelLayout(), ParallelLayout(tp=2)])
    return round_trips(directories, layouts, export_root), grads


# ---- checks -----------------------------------------------------------------------------------


def _assert_round_trips(results, checkpoints):
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    by_case = {}
    for rank_results in results:
        for layout, case, detected, pieces, text, image in rank_results:
            assert detected == case[1], f"{layout} {case}: detected {detected}"
            entry = by_case.setdefault((layout, case), {"pieces": [], "logits": []})
            entry["pieces"] += pieces
            entry["logits"].append((torch.from_numpy(text), torch.from_numpy(image)))
    assert {case for _, case in by_case} == set(checkpoints)
    for (layout, case), entry in by_case.items():
        directory, text_reference, image_reference = checkpoints[case]
        source = SafetensorsCheckpoint(directory)
        rebuilt = {n: torch.full(source.shape(n), float("nan")) for n in source.keys()}
        writes = {n: torch.zeros(source.shape(n), dtype=torch.int32) for n in source.keys()}
        for name, region, values in entry["pieces"]:
            assert name in rebuilt, f"{layout} {case}: export wrote {name}, which the source does not have"
            rebuilt[name][region] = torch.from_numpy(values)
            writes[name][region] += 1
        for name in source.keys():
            assert bool((writes[name] == 1).all()), f"{layout} {case}: {name} not written exactly once"
            assert torch.equal(rebuilt[name], source.read(name)), f"{layout} {case}: {name} differs"
        for rank, (text, image) in enumerate(entry["logits"]):
            for what, got, want in (("text-only", text, text_reference), ("image", image, image_reference)):
                diff = (got - want).abs().max().item()
                assert diff <= LOGITS_ATOL, f"{layout} {case} rank {rank}: {what} logits differ by {diff}"


def _assert_tensor_parallel_vision_grads(grads):
    """Under TP2 each rank sees its sequence chunk only; summed over TP the tower's gradients are TP1's."""
    from bridges.megatron.layout import ParallelLayout

    tp1, tp2 = str(ParallelLayout()), str(ParallelLayout(tp=2))
    cases = {case for _, case in grads[0]}
    assert len(cases) == 2
    for case in cases:
        reference = grads[0][(tp1, case)]
        for rank in (0, 1):
            got = grads[rank][(tp2, case)]
            assert set(got) == set(reference)
            for name, value in got.items():
                scale = max(abs(reference[name]).max(), 1e-6)
                assert abs(value - reference[name]).max() <= 1e-5 * scale, f"{case} rank {rank}: {name}"


def _directories(checkpoints):
    return {case: directory for case, (directory, _, _) in checkpoints.items()}


def test_ep1_ep2_and_exports_load_in_transformers(checkpoints, tmp_path):
    """World 2: EP1 (two data-parallel replicas), EP2 and PP2 (the vision tower and the deepstack layers on the
    first stage); the EP2 exports are written to disk and loaded."""
    import transformers

    from bridges.megatron.layout import ParallelLayout
    from bridges.models import family_for

    layouts = [ParallelLayout(), ParallelLayout(ep=2), ParallelLayout(pp=2)]
    results = run_distributed(2, world2, _directories(checkpoints), layouts, str(tmp_path))
    _assert_round_trips([trips for trips, _ in results], checkpoints)
    _assert_tensor_parallel_vision_grads([grads for _, grads in results])
    x = vlm_tiny.inputs()
    for (family, layout), (directory, _, image_reference) in checkpoints.items():
        exported = str(tmp_path / f"{family}_{layout}")
        model, info = getattr(transformers, vlm_tiny.FAMILIES[family][0]).from_pretrained(
            exported, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (family, layout, info)
        with torch.no_grad():
            logits = model.eval()(**x, mm_token_type_ids=(x["input_ids"] == vlm_tiny.IMAGE).int()).logits
        assert (logits - image_reference).abs().max().item() <= LOGITS_ATOL, (family, layout)
        # the exported config describes the same model
        source, config = (json.load(open(f"{d}/config.json")) for d in (directory, exported))
        assert family_for(config).architecture(config) == family_for(source).architecture(source)


def test_tp2_x_ep2(checkpoints):
    from bridges.megatron.layout import ParallelLayout

    results = run_distributed(4, round_trips, _directories(checkpoints), [ParallelLayout(tp=2, ep=2)])
    _assert_round_trips(results, checkpoints)


# ---- single-process checks ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=["_".join(c) for c in CASES])
def test_hf_tensor_specs_describe_the_checkpoint(checkpoints, case):
    from bridges.checkpoint import hf_config as hfc
    from bridges.export.specs import hf_tensor_specs
    from bridges.models import family_for
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    directory = checkpoints[case][0]
    config = hfc.load_config(directory)
    source = SafetensorsCheckpoint(directory)
    specs = hf_tensor_specs(case[0], family_for(config).architecture(config), torch.float32, case[1])
    assert specs == {n: (source.shape(n), source.dtype(n)) for n in source.keys()}
