"""Checks every family's bridge passes on tiny random checkpoints written by transformers' `save_pretrained`: under
each parallel layout, import -> export through the file writer reproduces every tensor bit for bit, Megatron's logits
match transformers', and the export loads with `from_pretrained` (no missing keys, no unexpected ones but MTP layers)
giving the source's weights. Families with their own model class (vision-language) have their own tests."""

from __future__ import annotations

import json
import os

import torch

from bridges.checkpoint import hf_config as hfc
from tests.launcher import run_distributed

LOGITS_ATOL = 1e-5


def check_softmax_router(router, transformer: dict, hidden: torch.Tensor) -> None:
    """transformers' softmax top-k `router` module on `hidden` against Megatron's top-k routing configured by the
    `transformer` fields a family translated: the same experts, the same weights."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    logits, weights, experts = router(hidden)
    probs, chosen = topk_routing_with_score_function(
        logits.detach(), transformer["moe_router_topk"], use_pre_softmax=transformer["moe_router_pre_softmax"],
        score_function="softmax",
    )
    expected = torch.zeros_like(probs).scatter(1, experts, weights.detach())
    assert torch.equal(chosen, expected > 0)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)


def reference(directory: str, ids: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(directory, token ids, transformers logits) of a checkpoint: what `check_round_trips` takes per case."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return directory, ids, AutoModelForCausalLM.from_pretrained(directory).eval()(ids).logits


def tiny_checkpoints(root, make_checkpoint, main: dict, variant: dict, fused_experts: int | None = None) -> dict:
    """{case: (directory, token ids, transformers logits)} of a family's tiny "main" and "variant" checkpoints
    (seeds 0 and 1) under `root`; with `fused_experts`, also "fused": main's weights with its experts fused."""
    from safetensors.torch import load_file, save_file

    from tests.bridges.glm45_tiny import fuse_experts

    ids = torch.randint(0, 101, (3, 16), generator=torch.Generator().manual_seed(7))
    out = {}
    for seed, (case, fields) in enumerate((("main", main), ("variant", variant))):
        make_checkpoint(str(root / case), seed=seed, **fields)
        out[case] = reference(str(root / case), ids)
    if fused_experts:
        fused = root / "fused"
        fused.mkdir()
        (fused / "config.json").write_text((root / "main" / "config.json").read_text())
        tensors = fuse_experts(load_file(str(root / "main" / "model.safetensors")), fused_experts)
        save_file(tensors, str(fused / "model.safetensors"), metadata={"format": "pt"})
        out["fused"] = (str(fused), ids, out["main"][2])
    return out


def layout_and_specs(family, directory: str):
    """The expert layout `family` finds in the checkpoint at `directory`, once the export's tensor specs in that layout
    (computed from the config alone) were found to be exactly the checkpoint's names, shapes and dtypes."""
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint
    from bridges.export.specs import hf_tensor_specs

    source = SafetensorsCheckpoint(directory)
    arch = family.architecture(hfc.load_config(directory))
    layout = family.detect(source, arch).layout
    specs = hf_tensor_specs(family, arch, torch.float32, layout)
    assert specs == {n: (source.shape(n), source.dtype(n)) for n in source.keys()}, directory
    return layout


def export_round_trips(family, checkpoints, runs, out_root):
    """Every rank: per (parallel layout, case) in `runs` import the checkpoint, write the export with the
    owner-writes engine into `out_root` (config by rank 0) and compute the Megatron logits; returns the logits."""
    import torch.distributed as dist

    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint
    from bridges.export.specs import export_pieces, hf_tensor_specs
    from bridges.export.writer import write_checkpoint
    from bridges.load import import_weights
    from bridges.megatron import build, parallel
    from bridges.megatron.forward import main_logits

    logits = {}
    for layout, case in runs:
        directory, ids, _ = checkpoints[case]
        config = hfc.load_config(directory)
        arch = family.architecture(config)
        parallel.initialize(layout)
        model = build.build_gpt_model(arch, layout)
        report = import_weights([model], family, arch, SafetensorsCheckpoint(directory), config=config)
        out = os.path.join(out_root, run_name(layout, case))
        specs = hf_tensor_specs(family, arch, torch.float32, report.expert_layout)
        write_checkpoint(export_pieces([model], family, arch, None, report.expert_layout), specs, out)
        if dist.get_rank() == 0:
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(family.hf_config(arch, config, torch.float32), f)
        # numpy: torch would share the tensor by a file descriptor that dies with this process
        logits[run_name(layout, case)] = main_logits(model, ids, arch.vocab_size).numpy()
    return logits


def run_name(layout, case) -> str:
    return f"tp{layout.tp}_pp{layout.pp}_ep{layout.ep}_{case}"


def check_round_trips(family, checkpoints, runs, world_size, tmp_path):
    """`runs`: (ParallelLayout, case of `checkpoints`) pairs, all in one world of `world_size` processes."""
    from transformers import AutoModelForCausalLM

    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    per_rank = run_distributed(world_size, export_round_trips, family, checkpoints, runs, str(tmp_path))
    for layout, case in runs:
        name = run_name(layout, case)
        directory, ids, expected_logits = checkpoints[case]
        source, exported = SafetensorsCheckpoint(directory), SafetensorsCheckpoint(str(tmp_path / name))
        assert sorted(exported.keys()) == sorted(source.keys()), name
        differ = [n for n in source.keys() if not torch.equal(exported.read(n), source.read(n))]
        assert differ == [], f"{name}: not bit-identical after import -> export: {differ}"
        for rank, logits in enumerate(r[name] for r in per_rank):
            diff = (torch.from_numpy(logits) - expected_logits).abs().max().item()
            assert diff <= LOGITS_ATOL, f"{name} rank {rank}: logits differ from transformers by {diff}"
        model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / name), output_loading_info=True)
        # transformers builds no MTP layer: the MTP tensors are all an export may leave unread
        config = hfc.load_config(directory)
        unread = sorted(info["unexpected_keys"])
        assert not info["missing_keys"] and family.mtp_tensor_names(unread, config) == unread, (name, info)
        # What is deterministic by construction is compared bit for bit: the weights transformers loads from
        # the export and from the source. Logits depend on the CPU kernels' threading (a loaded machine
        # changed them in the last bits once): a tolerance scaled to their size.
        expected = AutoModelForCausalLM.from_pretrained(directory).state_dict()
        loaded = model.state_dict()
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected), name
        with torch.no_grad():
            diff = (model(ids).logits - expected_logits).abs().max().item()
        assert diff <= 1e-5 * expected_logits.abs().max().item(), f"{name}: reloaded export's logits differ by {diff}"
