"""GPT-OSS bridge end to end on a tiny random checkpoint: import -> export reproduces every HF tensor bit for
bit and Megatron logits match transformers, under EP / TP / PP / TPxEP; the same model stored as MXFP4
imports to the very same Megatron weights and logits, each rank dequantizing only the experts it owns.

Expert biases need expert-TP 1 in Megatron-Core 0.16 ("Bias in Moe is only supported when ETP==1"), so the
TP layouts keep experts whole (etp=1)."""

from __future__ import annotations

import pytest
import torch

from tests.bridges.gpt_oss_tiny import make_checkpoint, write_mxfp4
from tests.launcher import run_distributed

LOGITS_ATOL = 1e-5
IDS = torch.randint(0, 101, (3, 16), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(fp32 directory, MXFP4 directory, transformers logits of IDS)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gpt_oss")
    plain, quantized = str(root / "fp32"), str(root / "mxfp4")
    make_checkpoint(plain)
    write_mxfp4(plain, quantized)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(plain).eval()(IDS).logits
    return plain, quantized, logits


# ---- run on every rank ------------------------------------------------------------------------


class RecordingCheckpoint:
    """A SafetensorsCheckpoint that remembers which experts of the MXFP4 blocks were read."""

    def __init__(self, directory):
        from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

        self._source = SafetensorsCheckpoint(directory)
        self.experts_read: set[int] = set()

    def __getattr__(self, name):
        return getattr(self._source, name)

    def read(self, name, region=None):
        if name.endswith(("_blocks", "_scales")):
            self.experts_read.update(range(region[0].start, region[0].stop, region[0].step))
        return self._source.read(name, region)


def round_trips(plain, quantized, layouts, mxfp4_layouts):
    """Per parallel layout: this rank's exported pieces and the main logits; for the MXFP4 layouts also
    the Megatron tensors that differ from the fp32 import, the MXFP4 logits and the experts read."""
    from bridges.checkpoint import hf_config as hfc
    from bridges.export.specs import export_pieces
    from bridges.load import import_weights
    from bridges.rules.local_params import Ranks
    from bridges.megatron import build, parallel
    from bridges.megatron.forward import main_logits
    from bridges.models import gpt_oss
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    config = hfc.load_config(plain)
    arch = gpt_oss.architecture(config)
    results = []
    for layout in layouts:
        parallel.initialize(layout)
        model = build.build_gpt_model(arch, layout)
        import_weights([model], gpt_oss.FAMILY, arch, SafetensorsCheckpoint(plain), config=config)
        # numpy, not torch: torch shares returned tensors by file descriptor, gone once this process exits.
        pieces = [(p.spec.hf_name, p.spec.region, p.tensor.numpy()) for p in export_pieces([model], gpt_oss.FAMILY, arch)]
        result = {"layout": layout, "pieces": pieces, "logits": main_logits(model, IDS, arch.vocab_size).numpy()}
        if layout in mxfp4_layouts:
            fresh = build.build_gpt_model(arch, layout)
            source = RecordingCheckpoint(quantized)
            report = import_weights([fresh], gpt_oss.FAMILY, arch, source, config=hfc.load_config(quantized))
            reference = model.state_dict()
            result["mxfp4"] = {
                "dequantized": report.dequantized,
                "differ": [n for n, t in fresh.state_dict().items()
                           if torch.is_tensor(t) and not torch.equal(t, reference[n])],
                "logits": main_logits(fresh, IDS, arch.vocab_size).numpy(),
                "experts_read": sorted(source.experts_read),
                "ep_rank": Ranks.current().ep_rank,
            }
        results.append(result)
    return results


def world_1(plain, quantized, layouts):
    """round_trips, then `bridges.verify` on the MXFP4 checkpoint (round trip against the dequantized
    tensors, logits against transformers' own dequantized model)."""
    from bridges.megatron.layout import ParallelLayout
    from bridges.verify import verify

    results = round_trips(plain, quantized, layouts, layouts)
    report = verify(quantized, ParallelLayout())
    return results, (report.ok, report.max_abs_diff, report.text()), backward_at_ep1(plain)


def backward_at_ep1(plain):
    """Gradients reach every expert bias with experts neither expert- nor tensor-parallel (EP1, etp 1)."""
    from bridges.checkpoint import hf_config as hfc
    from bridges.megatron import build, parallel
    from bridges.megatron.layout import ParallelLayout
    from bridges.models import gpt_oss

    arch = gpt_oss.architecture(hfc.load_config(plain))
    parallel.initialize(ParallelLayout())
    model = build.build_gpt_model(arch, ParallelLayout())
    position_ids = torch.arange(IDS.shape[1]).expand_as(IDS)
    loss = model(IDS, position_ids, build.causal_attention_mask(IDS.shape[1]), labels=IDS).sum()
    loss.backward()
    return [n for n, p in model.named_parameters() if n.endswith("bias") and "experts" in n and p.grad is None]


# ---- tests ------------------------------------------------------------------------------------


def _check(results, checkpoints, mxfp4_layouts=()):
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    plain, _, reference = checkpoints
    source = SafetensorsCheckpoint(plain)
    for i, first in enumerate(results[0]):
        layout = first["layout"]
        rebuilt = {n: torch.full(source.shape(n), float("nan")) for n in source.keys()}
        writes = {n: torch.zeros(source.shape(n), dtype=torch.int32) for n in source.keys()}
        for rank, rank_results in enumerate(results):
            case = rank_results[i]
            for name, region, values in case["pieces"]:
                assert name in rebuilt, f"{layout}: export wrote {name}, which the source does not have"
                rebuilt[name][region] = torch.from_numpy(values)
                writes[name][region] += 1
            # Every rank's logits (data-parallel replicas may sum expert outputs in another order).
            diff = (torch.from_numpy(case["logits"]) - reference).abs().max().item()
            assert diff <= LOGITS_ATOL, f"{layout} rank {rank}: logits differ from transformers by {diff}"
            if layout in mxfp4_layouts:
                mx = case["mxfp4"]
                assert len(mx["dequantized"]) == 8 and mx["differ"] == [], (layout, rank, mx["differ"])
                assert torch.equal(torch.from_numpy(mx["logits"]), torch.from_numpy(case["logits"]))
                owned = 6 // layout.ep  # each rank dequantizes only its own experts
                assert mx["experts_read"] == list(range(mx["ep_rank"] * owned, (mx["ep_rank"] + 1) * owned))
        for name in source.keys():
            assert bool((writes[name] == 1).all()), f"{layout}: {name} not written exactly once"
            assert torch.equal(rebuilt[name], source.read(name)), f"{layout}: {name} differs"


def test_world_1_mxfp4_and_verify(checkpoints):
    from bridges.megatron.layout import ParallelLayout

    layouts = [ParallelLayout()]
    [(results, (ok, diff, text), no_grad)] = run_distributed(1, world_1, *checkpoints[:2], layouts)
    _check([results], checkpoints, layouts)
    assert ok and diff <= LOGITS_ATOL, text
    assert no_grad == []


def test_world_2_ep_tp_pp_and_mxfp4_ep(checkpoints):
    from bridges.megatron.layout import ParallelLayout

    layouts = [ParallelLayout(ep=2), ParallelLayout(tp=2, etp=1), ParallelLayout(pp=2)]
    results = run_distributed(2, round_trips, *checkpoints[:2], layouts, layouts[:1])
    _check(results, checkpoints, layouts[:1])


def test_world_4_tp_x_ep(checkpoints):
    from bridges.megatron.layout import ParallelLayout

    layouts = [ParallelLayout(tp=2, ep=2, etp=1)]
    _check(run_distributed(4, round_trips, *checkpoints[:2], layouts, ()), checkpoints)


def test_hf_tensor_specs_describe_the_checkpoint(checkpoints):
    from bridges.checkpoint import hf_config as hfc
    from bridges.export.specs import hf_tensor_specs
    from bridges.models import gpt_oss
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    source = SafetensorsCheckpoint(checkpoints[0])
    specs = hf_tensor_specs("gpt_oss", gpt_oss.architecture(hfc.load_config(checkpoints[0])), torch.float32)
    assert specs == {n: (source.shape(n), source.dtype(n)) for n in source.keys()}


def test_transformers_dequantizes_the_test_mxfp4_checkpoint_to_the_same_weights(checkpoints):
    """The test quantizer writes transformers' MXFP4 layout: transformers' own loader gets the fp32 weights."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    plain, quantized, _ = checkpoints
    expected = AutoModelForCausalLM.from_pretrained(plain).state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(
        quantized, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True)
    ).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[n], expected[n]) for n in expected)


@pytest.mark.parametrize(
    "change",
    [{"sliding_window": 64}, {"swiglu_limit": 100.0}, {"swiglu_alpha": 1.702}, {"sinks": -1e4},
     {"rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}}, {"router_bias": 0.0},
     {"expert_bias": 0.0}],
    ids=lambda c: next(iter(c)),
)
def test_the_tiny_model_depends_on_each_gpt_oss_feature(checkpoints, change):
    """Matching transformers proves a feature is modeled only if the tiny model's logits depend on it."""
    from transformers import AutoModelForCausalLM

    plain, _, reference = checkpoints
    (key, value), = change.items()
    overrides = {key: value} if key in ("sliding_window", "swiglu_limit", "swiglu_alpha", "rope_parameters") else {}
    model = AutoModelForCausalLM.from_pretrained(plain, **overrides).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (key == "sinks" and name.endswith("sinks")) or (key == "router_bias" and name.endswith("router.bias")):
                param.fill_(value)
            if key == "expert_bias" and name.endswith(("gate_up_proj_bias", "down_proj_bias")):
                param.fill_(value)
        logits = model(IDS).logits
    assert (logits - reference).abs().max().item() > 100 * LOGITS_ATOL
