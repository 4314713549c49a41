"""Import refuses a checkpoint that does not fit (missing, extra, mis-shaped, wrong-dtype tensors, config
mismatch) naming the tensor and where it is, agrees on failure across ranks, and changes no parameter;
MTP tensors are ignored with a reason when the model has no MTP, and differing MTP copies are reported.
It reads every byte it loads once and the MTP copies only on a sample; a file that fails to read after
the checks is agreed on and said to leave the model partly loaded."""

from __future__ import annotations

import pytest
import torch

from tests.bridges.glm45_tiny import make_checkpoint
from tests.launcher import run_distributed

WHERE = "/ckpt/model-00001.safetensors"


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("glm45") / "ckpt")
    make_checkpoint(path)
    return path


def _tensors(directory):
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    source = SafetensorsCheckpoint(directory)
    return {name: source.read(name) for name in source.keys()}


def _broken(tensors, case):
    t = dict(tensors)
    if case == "missing":
        del t["model.layers.3.mlp.experts.5.up_proj.weight"]
    elif case == "extra":
        t["model.layers.1.mlp.surprise.weight"] = torch.zeros(3)
    elif case == "shape":
        t["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(16, 48)
    elif case == "dtype":
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"].to(torch.bfloat16)
    return t


def checks_world_1(directory):
    """Every failure case on one rank; returns {case: (message, parameters unchanged)} and more."""
    from bridges.checkpoint import hf_config as hfc
    from bridges.export.specs import export_pieces, hf_tensor_specs
    from bridges.load import CheckpointMismatch, import_weights
    from bridges.megatron import build, parallel
    from bridges.megatron.layout import ParallelLayout
    from bridges.models import glm45
    from bridges.checkpoint.sources import DictSource

    config = hfc.load_config(directory)
    arch = glm45.architecture(config)
    parallel.initialize(ParallelLayout())
    model = build.build_gpt_model(arch, ParallelLayout())
    before = {n: t.clone() for n, t in model.state_dict().items() if torch.is_tensor(t)}
    tensors = _tensors(directory)
    out = {}
    for case in ("missing", "extra", "shape", "dtype", "config"):
        source = DictSource(_broken(tensors, case), where=WHERE)
        bad_config = dict(config, routed_scaling_factor=1.0) if case == "config" else config
        try:
            import_weights([model], glm45.FAMILY, arch, source, config=bad_config)
            message = None
        except CheckpointMismatch as e:
            message = str(e)
        unchanged = all(torch.equal(t, before[n]) for n, t in model.state_dict().items() if torch.is_tensor(t))
        out[case] = (message, unchanged)

    # A bf16 checkpoint re-saved by transformers 5 keeps routers in fp32: accepted, values loaded.
    resaved = {n: t if n.endswith(("mlp.gate.weight", "e_score_correction_bias")) else t.to(torch.bfloat16)
               for n, t in tensors.items()}
    import_weights([model], glm45.FAMILY, arch, DictSource(resaved, where=WHERE))
    router = model.decoder.layers[2].mlp.router.weight
    out["fp32_router"] = torch.equal(router, tensors["model.layers.2.mlp.gate.weight"])

    # Mirrors: a differing MTP copy of the embedding is reported, not fatal.
    mirrored = dict(tensors)
    mirrored["model.layers.4.embed_tokens.weight"] = mirrored["model.layers.4.embed_tokens.weight"] + 1
    out["mirror"] = import_weights([model], glm45.FAMILY, arch, DictSource(mirrored, where=WHERE)).warnings

    # MTP off: the source's MTP layer is ignored with a reason and not exported.
    no_mtp = arch.without_mtp()
    parallel.initialize(ParallelLayout())
    plain = build.build_gpt_model(no_mtp, ParallelLayout())
    report = import_weights([plain], glm45.FAMILY, no_mtp, DictSource(tensors, where=WHERE))
    exported = {p.spec.hf_name for p in export_pieces([plain], glm45.FAMILY, no_mtp)}
    out["mtp_off"] = (report.ignored, exported, set(hf_tensor_specs(glm45.FAMILY, no_mtp, torch.bfloat16)))
    # A read that fails after every check passed (the file changed, an I/O error): agreed, and said plainly.
    class FailingSource(DictSource):
        def read(self, name, region=None):
            if name == "model.layers.3.mlp.experts.5.down_proj.weight":
                raise OSError("Input/output error")
            return super().read(name, region)

    try:
        import_weights([model], glm45.FAMILY, arch, FailingSource(tensors, where=WHERE))
        out["read_failure"] = None
    except CheckpointMismatch as e:
        out["read_failure"] = str(e)
    out.update(_directory_cases(directory, model, arch, tensors))
    return out


MIRRORS = ("model.layers.4.embed_tokens.weight", "model.layers.4.shared_head.head.weight")


def _directory_cases(directory, model, arch, tensors):
    """Checkpoint directories (names missing from the files used to raise KeyError): a missing tensor is
    listed with the directory, and the MTP copies of embedding / head are optional."""
    import os

    from safetensors.torch import save_file

    from bridges.load import CheckpointMismatch, import_weights
    from bridges.models import glm45
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint

    out = {}
    variants = os.path.join(os.path.dirname(directory), "variants")
    for case, drop in (("dir_missing", ("model.layers.3.mlp.experts.5.up_proj.weight",)), ("dir_no_mirrors", MIRRORS)):
        path = os.path.join(variants, case)
        os.makedirs(path, exist_ok=True)
        save_file({n: t.contiguous() for n, t in tensors.items() if n not in drop}, os.path.join(path, "model.safetensors"))
        try:
            report = import_weights([model], glm45.FAMILY, arch, SafetensorsCheckpoint(path))
            out[case] = ("loaded", report.warnings)
        except CheckpointMismatch as e:
            out[case] = ("refused", str(e))

    # Bytes read, with the MTP copies compared on blocks of 2 rows (MIRROR_BLOCKS of them) and without them.
    from bridges import load

    row_bytes = tensors[MIRRORS[0]][0].numel() * tensors[MIRRORS[0]].element_size()
    default, load.MIRROR_SAMPLE_BYTES = load.MIRROR_SAMPLE_BYTES, 2 * row_bytes * load.MIRROR_BLOCKS
    try:
        for case, path in (("bytes_full", directory), ("bytes_no_mirrors", os.path.join(variants, "dir_no_mirrors"))):
            with SafetensorsCheckpoint(path) as source:
                import_weights([model], glm45.FAMILY, arch, source)
                in_files = sum(source.header(n).nbytes for n in source.keys())
                mirrors = sum(source.header(n).nbytes for n in MIRRORS if n in source.keys())
                out[case] = (source.bytes_read, in_files, mirrors)
        out["sampled_bytes"] = len(MIRRORS) * load.MIRROR_SAMPLE_BYTES
    finally:
        load.MIRROR_SAMPLE_BYTES = default
    return out


def agreement_world_2(directory):
    """Only rank 1's source is broken: both ranks must raise, and neither may change a parameter."""
    from bridges.checkpoint import hf_config as hfc
    from bridges.load import CheckpointMismatch, import_weights
    from bridges.megatron import build, parallel
    from bridges.megatron.layout import ParallelLayout
    from bridges.models import glm45
    from bridges.checkpoint.sources import DictSource

    arch = glm45.architecture(hfc.load_config(directory))
    parallel.initialize(ParallelLayout(ep=2))
    model = build.build_gpt_model(arch, ParallelLayout(ep=2))
    before = {n: t.clone() for n, t in model.state_dict().items() if torch.is_tensor(t)}
    tensors = _tensors(directory)
    if torch.distributed.get_rank() == 1:
        tensors = _broken(tensors, "shape")
    try:
        import_weights([model], glm45.FAMILY, arch, DictSource(tensors, where=WHERE))
        message = None
    except CheckpointMismatch as e:
        message = str(e)
    return message, all(torch.equal(t, before[n]) for n, t in model.state_dict().items() if torch.is_tensor(t))


@pytest.fixture(scope="module")
def world_1(directory):
    return run_distributed(1, checks_world_1, directory)[0]


@pytest.mark.parametrize(
    "case, names",
    [
        ("missing", ["model.layers.3.mlp.experts.5.up_proj.weight: missing in " + WHERE]),
        ("extra", ["model.layers.1.mlp.surprise.weight (" + WHERE + "): unexpected tensor"]),
        ("shape", ["model.layers.2.self_attn.k_proj.weight (" + WHERE + "): expected shape (32, 48), found (16, 48)"]),
        ("dtype", ["model.layers.0.mlp.down_proj.weight (" + WHERE + "): expected dtype torch.float32, found torch.bfloat16"]),
        ("config", ["config.json moe_router_topk_scaling_factor: checkpoint has 1.0, model has 2.5"]),
    ],
)
def test_bad_checkpoint_is_refused_and_nothing_changes(world_1, case, names):
    message, unchanged = world_1[case]
    assert message is not None, f"{case}: import did not fail"
    for name in names:
        assert name in message
    assert unchanged, f"{case}: a parameter changed although the import failed"


def test_missing_tensor_in_a_directory_is_listed_not_a_key_error(world_1):
    outcome, message = world_1["dir_missing"]
    assert outcome == "refused"
    assert "model.layers.3.mlp.experts.5.up_proj.weight: missing in " in message and "dir_missing" in message


def test_mtp_copies_of_embedding_and_head_are_optional(world_1):
    outcome, warnings = world_1["dir_no_mirrors"]
    assert outcome == "loaded", warnings
    assert all(any(name in w and "missing" in w for w in warnings) for name in MIRRORS)


def test_each_byte_is_read_once_and_mtp_copies_on_a_sample(world_1):
    read, in_files, mirrors = world_1["bytes_no_mirrors"]
    assert mirrors == 0 and read == in_files  # world 1: every tensor whole, each once
    read, in_files, mirrors = world_1["bytes_full"]
    assert mirrors > 4 * world_1["sampled_bytes"]
    assert read == in_files - mirrors + world_1["sampled_bytes"]


def test_a_read_failing_after_the_checks_is_agreed_and_reported_as_partial(world_1):
    message = world_1["read_failure"]
    assert message is not None and "reading the checkpoint" in message and "partly loaded" in message
    assert "model.layers.3.mlp.experts.5.down_proj.weight" in message and "Input/output error" in message


def test_fp32_router_in_a_bf16_checkpoint_is_accepted(world_1):
    assert world_1["fp32_router"]


def test_differing_mtp_copy_is_reported(world_1):
    assert any("model.layers.4.embed_tokens.weight" in w and "differs" in w for w in world_1["mirror"])


def test_mtp_tensors_ignored_when_mtp_is_off(world_1):
    ignored, exported, specs = world_1["mtp_off"]
    mtp = {n for n in ignored if n.startswith("model.layers.4.")}
    assert mtp and all(ignored[n] == "MTP disabled" for n in mtp) and set(ignored) == mtp
    assert not any(n.startswith("model.layers.4.") for n in exported | specs)
    assert exported == specs


def test_failure_on_one_rank_fails_every_rank(directory):
    results = run_distributed(2, agreement_world_2, directory)
    (message_0, unchanged_0), (message_1, unchanged_1) = results
    assert message_1 is not None and "k_proj.weight" in message_1
    # rank 0 found nothing itself, yet it fails too and shows what rank 1 found
    assert message_0 is not None and "k_proj.weight" in message_0 and "(rank 1)" in message_0
    assert unchanged_0 and unchanged_1
