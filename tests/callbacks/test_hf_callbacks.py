"""HF export / import callbacks under real Lightning training with 2-4 gloo processes.

Each distributed function runs several scenarios in the same processes (start-up is the slow part).
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.bridges.glm45_tiny import make_checkpoint
from tests.launcher import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE_IDS = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(7))


def _fit(hf_config, dirpath, tp=1, ep=2, steps=6, every=3, lr=3e-3, import_path=None, export_kwargs=None,
         probe_steps=(), mtp=True, precision="fp32"):
    """One Lightning fit in this process group; returns Megatron logits at `probe_steps` (rank 0)."""
    import lightning.pytorch as pl
    import torch.distributed as dist

    from bridges.megatron.forward import main_logits
    from callbacks.hf_export import HFExportCallback
    from callbacks.hf_import import HFImportCallback
    from recipes.data import TokenDataModule
    from recipes.strategy import MegatronStrategy
    from recipes.vlm_module import megatron_module

    module = megatron_module(hf_config, mtp_enabled=mtp, micro_batch_size=2, params_dtype=precision,
                             optim={"lr": lr, "min_lr": lr, "warmup_steps": 0})
    data = TokenDataModule(kind="synthetic", seq_length=16, micro_batch_size=2, global_batch_size=4, num_samples=64)
    data.vocab_size = module.arch.vocab_size
    logits, first_steps = {}, []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            first_steps.append(trainer.global_step)
            if trainer.global_step in probe_steps:
                module.model.eval()
                logits[trainer.global_step] = main_logits(module.model, PROBE_IDS, module.arch.vocab_size)
                module.model.train()

    export = HFExportCallback(dirpath=dirpath, every_n_train_steps=every, **(export_kwargs or {}))
    callbacks = [HFImportCallback(path=import_path), export, Probe()]
    trainer = pl.Trainer(
        accelerator="cpu", devices=dist.get_world_size(), strategy=MegatronStrategy(tp=tp, ep=ep), max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data)
    return {"logits": logits if dist.get_rank() == 0 else None, "steps": first_steps, "history": export.history,
            "failures": export.failures}


def _refusal(*args, **kwargs):
    """`_fit` expected to be refused: the exception's type and message (None if it trained)."""
    try:
        _fit(*args, **kwargs)
    except Exception as e:  # every rank must get here: no hang
        return f"{type(e).__name__}: {e}"
    return None


def _lazy_against_sync(source, tmp, tp=1, ep=2, steps=3):
    """An export every step, sync and async (lazy snapshot), in two runs of the same training. The writer
    thread starts the snapshot's copy late, so the next step's forward and backward run first, and so would
    its expert-bias update and optimizer step, were they not waiting for the copy."""
    import threading
    import time

    from bridges.export.snapshot import LazySnapshot

    original = LazySnapshot.copy

    def late(self):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.5)
        return original(self)

    _fit(source, f"{tmp}/sync", tp=tp, ep=ep, steps=steps, every=1, import_path=source,
         export_kwargs={"async_write": False})
    LazySnapshot.copy = late
    try:
        _fit(source, f"{tmp}/lazy", tp=tp, ep=ep, steps=steps, every=1, import_path=source)
    finally:
        LazySnapshot.copy = original


def _world2(tmp, source):
    """EP2: periodic export with logits probes; resume from step_6; lr=0 round trip; failures; lazy
    snapshot against sync export."""
    out = {}
    _lazy_against_sync(source, f"{tmp}/lazy_ep2")
    out["periodic"] = _fit(source, f"{tmp}/run1", probe_steps=(3, 6), import_path=source)
    out["resume"] = _fit(source, f"{tmp}/run2", steps=8, every=1, import_path=f"{tmp}/run1/step_6",
                         export_kwargs={"keep_last_k": 1})
    out["lr0"] = _fit(source, f"{tmp}/lr0", steps=1, every=0, lr=0.0, import_path=source,
                      export_kwargs={"async_write": False})
    out["mtp_off"] = _fit(source, f"{tmp}/mtp_off", steps=1, every=0, lr=0.0, import_path=source, mtp=False,
                          export_kwargs={"dtype": "bf16"})
    out["passthrough"] = _fit(source, f"{tmp}/passthrough", steps=1, every=0, lr=0.0, import_path=source, mtp=False,
                              export_kwargs={"mtp_passthrough": True, "mode": "gather"})
    glm45v = f"{tmp}/glm45v_source"
    _fit(glm45v, f"{tmp}/glm45v", steps=1, every=0, lr=0.0, import_path=glm45v, mtp=False,
         export_kwargs={"mtp_passthrough": True})
    # bf16 parameters, fp32 masters: the import must reach the masters or the first step restores random weights.
    out["bf16"] = _fit(_bf16_copy(source, f"{tmp}/bf16_source"), f"{tmp}/bf16", steps=2, every=0, lr=1e-12,
                       import_path=f"{tmp}/bf16_source", precision="bf16-mixed", export_kwargs={"async_write": False})
    out["fault"] = _failing_export(source, f"{tmp}/run1")
    out["fault_warn"] = _failing_export(source, f"{tmp}/run1", on_error="warn")
    out.update(_ownership(tmp, source))
    return out


def _ownership(tmp, source):
    """Runs sharing an export root never delete, replace or skip what they did not write; bad sources and
    trainer states are refused on every rank in one line."""
    import torch.distributed as dist

    shared, out = f"{tmp}/shared", {}
    # A: 4 steps. B continues from A's step_4 in the same root, keep_last_k=1: only B's own step_6 goes.
    _fit(source, shared, steps=4, every=2, import_path=source)
    _fit(source, shared, steps=8, every=2, import_path=f"{shared}/step_4", export_kwargs={"keep_last_k": 1})
    # C starts from scratch in the same root: its step_2 / step_4 would collide with A's, refused up front.
    out["collide"] = _refusal(source, shared, steps=4, every=2)
    locked = f"{tmp}/locked"
    if dist.get_rank() == 0:  # a live run (the test process) holds the root
        os.makedirs(locked)
        with open(f"{locked}/.lock", "w") as f:
            json.dump({"run_id": "live", "host": __import__("socket").gethostname(), "pid": os.getppid()}, f)
    dist.barrier()
    out["locked"] = _refusal(source, locked, steps=2, every=0)
    out["root_is_file"] = _refusal(source, f"{tmp}/afile", steps=2, every=0)
    for case in ("outside_link", "negative_step", "step_past_max", "state_list"):
        out[case] = _refusal(source, f"{tmp}/{case}_out", steps=6, every=0, import_path=f"{tmp}/sources/{case}")
    out["one_rank_import"] = _one_rank_cannot_open(source, tmp)
    return out


def _one_rank_cannot_open(source, tmp):
    """Only rank 1 finds a problem while opening the source: both ranks refuse, neither waits alone."""
    import torch.distributed as dist

    from bridges.checkpoint.files import CheckpointFileError
    from callbacks import hf_import

    original = hf_import.open_checkpoint

    def failing(directory, *args):
        if dist.get_rank() == 1:
            raise CheckpointFileError(f"{directory}/tokenizer.json: injected on rank 1")
        return original(directory, *args)

    hf_import.open_checkpoint = failing
    try:
        return _refusal(source, f"{tmp}/one_rank_out", steps=2, every=0, import_path=source)
    finally:
        hf_import.open_checkpoint = original


def _bf16_copy(source, directory):
    """The source checkpoint in bf16 (the expert-bias buffer stays fp32, as in released checkpoints)."""
    import shutil

    from safetensors.torch import save_file

    if torch.distributed.get_rank() == 0:
        shutil.copytree(source, directory)
        tensors = load_file(f"{source}/model.safetensors")
        save_file({n: t if n.endswith("e_score_correction_bias") else t.to(torch.bfloat16) for n, t in tensors.items()},
                  f"{directory}/model.safetensors", metadata={"format": "pt"})
        config = json.load(open(f"{directory}/config.json"))
        config["dtype"] = config["torch_dtype"] = "bfloat16"
        json.dump(config, open(f"{directory}/config.json", "w"))
    torch.distributed.barrier()
    return directory


def _failing_export(source, dirpath, on_error="raise"):
    """Rank 1 fails while writing tensor data of a new export into a directory with earlier exports.
    on_error=warn: returns what rank 0 printed to stderr and the failure count instead."""
    import contextlib
    import io

    import torch.distributed as dist

    from bridges.export import writer as export_writer

    original = export_writer._write_pieces

    def broken(*args, **kwargs):
        if dist.get_rank() == 1:
            raise OSError(28, "No space left on device (injected)")
        return original(*args, **kwargs)

    export_writer._write_pieces = broken
    try:
        if on_error == "warn":
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                result = _fit(source, dirpath, steps=2, every=0, import_path=None, export_kwargs={"on_error": on_error})
            return {"stderr": err.getvalue(), "failures": result["failures"]}
        _fit(source, dirpath, steps=2, every=0, import_path=None, export_kwargs={"on_error": on_error})
    except Exception as e:  # every rank must get here: no hang
        return f"{type(e).__name__}: {e}"
    finally:
        export_writer._write_pieces = original
    return None


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("glm45_source"))
    make_checkpoint(d, seed=3)
    for name in ("tokenizer_config.json", "generation_config.json"):
        if not os.path.exists(os.path.join(d, name)):
            with open(os.path.join(d, name), "w") as f:
                json.dump({"made_by": "test"}, f)
    return d


def _variants(tmp, source):
    """Copies of the source (weights and config linked, small files copied) with one hostile change each."""
    import shutil

    changes = {
        "outside_link": lambda d: os.symlink(f"{tmp}/secret.txt", f"{d}/tokenizer.json"),
        "negative_step": lambda d: json.dump({"global_step": -5, "consumed_samples": 0}, open(f"{d}/trainer_state.json", "w")),
        "step_past_max": lambda d: json.dump({"global_step": 1000, "consumed_samples": 0}, open(f"{d}/trainer_state.json", "w")),
        "state_list": lambda d: json.dump([1, 2], open(f"{d}/trainer_state.json", "w")),
    }
    with open(f"{tmp}/secret.txt", "w") as f:
        f.write("not for export\n")
    with open(f"{tmp}/afile", "w") as f:
        f.write("a file where the export root should be\n")
    for case, change in changes.items():
        d = f"{tmp}/sources/{case}"
        os.makedirs(d)
        for name in os.listdir(source):
            if name.endswith((".safetensors", "config.json")) and name != "tokenizer_config.json" and "generation" not in name:
                os.symlink(f"{source}/{name}", f"{d}/{name}")
            else:
                shutil.copyfile(f"{source}/{name}", f"{d}/{name}")
        change(d)


@pytest.fixture(scope="module")
def world2(source, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("world2"))
    _variants(tmp, source)
    _glm45v_with_mtp(f"{tmp}/glm45v_source")
    results = run_distributed(2, _world2, tmp, source, timeout=900)
    return tmp, results


def _hf_logits(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return model(PROBE_IDS).logits, info


def _is_mtp(name, layers=4):
    return name.startswith(f"model.layers.{layers}.")


def _same_exports(root, steps=3):
    """Every step's async export equals the sync export of that step bit for bit, and the weights and the
    router's expert bias moved between the steps (so a snapshot of the wrong step could not pass)."""
    exported = {}
    for step in range(1, steps + 1):
        sync = load_file(f"{root}/sync/step_{step}/model.safetensors")
        lazy = load_file(f"{root}/lazy/step_{step}/model.safetensors")
        assert set(sync) == set(lazy)
        differ = [n for n in sync if not torch.equal(sync[n], lazy[n])]
        assert not differ, f"step {step}: {differ[:5]}"
        exported[step] = sync
    first, last = exported[1], exported[steps]
    moved = [n for n in first if not torch.equal(first[n], last[n])]
    assert any(n.endswith("e_score_correction_bias") for n in moved) and any(n.endswith("q_proj.weight") for n in moved)


def test_lazy_snapshot_export_equals_sync_export_every_step_ep2(world2):
    _same_exports(f"{world2[0]}/lazy_ep2")


def test_periodic_exports_load_in_transformers_with_matching_logits(world2):
    tmp, results = world2
    root = f"{tmp}/run1"
    assert open(f"{root}/latest").read().strip() == "step_6"
    for step in (3, 6):
        logits, info = _hf_logits(f"{root}/step_{step}")
        assert info["missing_keys"] == set() or not info["missing_keys"]
        assert all(_is_mtp(k) for k in info["unexpected_keys"]), info["unexpected_keys"]
        megatron = results[0]["periodic"]["logits"][step]
        assert (logits - megatron).abs().max().item() <= 1e-5
    # weights changed between the exports, so the two logits differ
    assert not torch.equal(results[0]["periodic"]["logits"][3], results[0]["periodic"]["logits"][6])


def test_export_directory_contents(world2, source):
    tmp, _ = world2
    d = f"{tmp}/run1/step_6"
    state = json.load(open(f"{d}/trainer_state.json"))
    assert state["global_step"] == 6 and state["consumed_samples"] == 24
    assert state["parallel"]["ep"] == 2 and state["export_seconds"] > 0
    config = json.load(open(f"{d}/config.json"))
    assert config["num_nextn_predict_layers"] == 1 and config["model_type"] == "glm4_moe"
    # transformers 4.x spellings of the same RoPE and dtype beside the 5.x ones
    rope = config["rope_parameters"]
    assert (config["rope_theta"], config["partial_rotary_factor"]) == (rope["rope_theta"], rope["partial_rotary_factor"])
    assert config["rope_scaling"] is None and config["torch_dtype"] == config["dtype"]
    index = json.load(open(f"{d}/model.safetensors.index.json"))
    on_disk = {}
    for f in set(index["weight_map"].values()):
        on_disk.update(load_file(f"{d}/{f}"))
    assert set(on_disk) == set(index["weight_map"])
    assert set(on_disk) == set(load_file(f"{source}/model.safetensors"))  # same names as the source, MTP included
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert open(f"{d}/{name}").read() == open(f"{source}/{name}").read()
    assert not [n for n in os.listdir(f"{tmp}/run1") if n.endswith(".staging")]


def test_resume_continues_at_the_exported_step(world2):
    tmp, results = world2
    assert results[0]["resume"]["steps"] == [7, 8]
    # keep_last_k=1: step_7 was pruned once step_8 was complete
    assert sorted(os.listdir(f"{tmp}/run2")) == ["latest", "step_8"]
    state = json.load(open(f"{tmp}/run2/step_8/trainer_state.json"))
    assert state["global_step"] == 8 and state["consumed_samples"] == 32


def test_import_one_step_at_lr0_export_is_bit_exact(world2, source):
    tmp, _ = world2
    original = load_file(f"{source}/model.safetensors")
    exported = load_file(f"{tmp}/lr0/step_1/model.safetensors")
    assert set(exported) == set(original)
    differ = [n for n in original if not torch.equal(original[n], exported[n])]
    # Megatron updates the router's expert bias from routing statistics, not from the learning rate.
    assert differ and all(n.endswith("e_score_correction_bias") for n in differ), differ


def test_bf16_import_reaches_the_fp32_masters_export_after_two_steps_is_bit_exact(world2):
    tmp, _ = world2
    original = load_file(f"{tmp}/bf16_source/model.safetensors")
    exported = load_file(f"{tmp}/bf16/step_2/model.safetensors")
    assert set(exported) == set(original)
    assert all(exported[n].dtype == original[n].dtype for n in original)
    differ = [n for n in original if not torch.equal(original[n], exported[n])]
    # Only the router's expert bias moves (routing statistics, not the learning rate).
    assert all(n.endswith("e_score_correction_bias") for n in differ), differ


def test_mtp_off_export_has_no_mtp_and_says_so(world2, source):
    tmp, _ = world2
    d = f"{tmp}/mtp_off/step_1"
    config = json.load(open(f"{d}/config.json"))
    assert config["num_nextn_predict_layers"] == 0 and config["dtype"] == "bfloat16"
    tensors = load_file(f"{d}/model.safetensors")
    assert not [n for n in tensors if _is_mtp(n)]
    original = load_file(f"{source}/model.safetensors")
    for name, tensor in tensors.items():
        if name.endswith("e_score_correction_bias"):
            continue  # kept in fp32 like the released checkpoints
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, original[name].to(torch.bfloat16)), name
    _, info = _hf_logits(d)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_mtp_passthrough_copies_source_mtp_tensors_in_gather_mode(world2, source):
    tmp, _ = world2
    d = f"{tmp}/passthrough/step_1"
    assert json.load(open(f"{d}/config.json"))["num_nextn_predict_layers"] == 1
    original = load_file(f"{source}/model.safetensors")
    exported = load_file(f"{d}/model.safetensors")
    mtp = [n for n in original if _is_mtp(n)]
    assert mtp and all(torch.equal(original[n], exported[n]) for n in mtp)
    assert set(exported) == set(original)
    differ = [n for n in original if not torch.equal(original[n], exported[n])]
    assert all(n.endswith("e_score_correction_bias") for n in differ), differ


def _glm45v_with_mtp(directory):
    """A tiny GLM-4.5V checkpoint with one MTP layer after its 4 language-model layers, as released ones have it
    (`model.language_model.layers.4.*`, `text_config.num_nextn_predict_layers: 1`); transformers builds none."""
    from safetensors.torch import save_file

    from tests.bridges import vlm_tiny

    vlm_tiny.make_checkpoint(directory, "glm4v_moe", "per_expert", seed=4)
    tensors = load_file(f"{directory}/model.safetensors")
    last, mtp = "model.language_model.layers.3.", "model.language_model.layers.4."
    tensors.update({mtp + n[len(last):]: t + 0.5 for n, t in tensors.items() if n.startswith(last)})
    hidden = tensors[last + "input_layernorm.weight"].shape[0]
    gen = torch.Generator().manual_seed(5)
    for name, shape in (("enorm", (hidden,)), ("hnorm", (hidden,)), ("eh_proj", (hidden, 2 * hidden)),
                        ("shared_head.norm", (hidden,))):
        tensors[f"{mtp}{name}.weight"] = torch.randn(shape, generator=gen)
    save_file(tensors, f"{directory}/model.safetensors", metadata={"format": "pt"})
    config = json.load(open(f"{directory}/config.json"))
    config["text_config"]["num_nextn_predict_layers"] = 1
    json.dump(config, open(f"{directory}/config.json", "w"))


def test_mtp_passthrough_keeps_the_mtp_tensors_of_a_glm45v_source(world2):
    """GLM-4.5V keeps its MTP layers under the language model's prefix (`model.language_model.layers.4.*`): they
    travel through unchanged, and the exported config keeps their count."""
    tmp, _ = world2
    export, source = f"{tmp}/glm45v/step_1", f"{tmp}/glm45v_source"
    assert json.load(open(f"{export}/config.json"))["text_config"]["num_nextn_predict_layers"] == 1
    original, exported = load_file(f"{source}/model.safetensors"), load_file(f"{export}/model.safetensors")
    mtp = [n for n in original if n.startswith("model.language_model.layers.4.")]
    assert mtp and set(exported) == set(original)
    assert all(torch.equal(exported[n], original[n]) for n in mtp)


def test_rank_failing_mid_export_is_agreed_and_leaves_previous_export_intact(world2):
    tmp, results = world2
    for rank in (0, 1):
        message = results[rank]["fault"]
        assert message is not None and "No space left on device (injected)" in message and "rank 1" in message
    # on_error=warn: training went on; rank 0 printed one visible warning line, and the failure was counted
    warned = [line for line in results[0]["fault_warn"]["stderr"].splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "HF export of step 2" in warned[0] and "No space left" in warned[0]
    assert results[0]["fault_warn"]["failures"] == results[1]["fault_warn"]["failures"] == 1
    root = f"{tmp}/run1"
    # the failed exports (step_2) left nothing behind; step_3 / step_6 and latest are untouched
    assert sorted(n for n in os.listdir(root)) == ["latest", "step_3", "step_6"]
    assert open(f"{root}/latest").read().strip() == "step_6"


def _world4(tmp, source):
    _lazy_against_sync(source, f"{tmp}/lazy_tp2_ep2", tp=2, steps=2)
    return _fit(source, f"{tmp}/lr0", tp=2, ep=2, steps=1, every=0, lr=0.0, import_path=source)


def test_tp2_ep2_import_export_round_trip_is_bit_exact_and_lazy_snapshot_equals_sync(source, tmp_path):
    run_distributed(4, _world4, str(tmp_path), source, timeout=900)
    _same_exports(f"{tmp_path}/lazy_tp2_ep2", steps=2)
    original = load_file(f"{source}/model.safetensors")
    exported = load_file(f"{tmp_path}/lr0/step_1/model.safetensors")
    assert set(exported) == set(original)
    differ = [n for n in original if not torch.equal(original[n], exported[n])]
    assert all(n.endswith("e_score_correction_bias") for n in differ), differ


def test_runs_sharing_a_root_delete_only_their_own_exports(world2, source):
    tmp, _ = world2
    shared = f"{tmp}/shared"
    # A wrote step_2, step_4; B (continuing from step_4, keep_last_k=1) wrote step_6, step_8 and pruned only
    # its own step_6: A's exports, B's import source among them, are untouched; no lock is left behind.
    assert sorted(os.listdir(shared)) == ["latest", "step_2", "step_4", "step_8"]
    assert open(f"{shared}/latest").read().strip() == "step_8"
    ids = {s: json.load(open(f"{shared}/step_{s}/trainer_state.json"))["run_id"] for s in (2, 4, 8)}
    assert ids[2] == ids[4] != ids[8]
    # the import source survived, so B's exports still carry the tokenizer and generation config
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert open(f"{shared}/step_8/{name}").read() == open(f"{source}/{name}").read()


def _one_line(results, case):
    messages = [results[rank][case] for rank in (0, 1)]
    assert all(m is not None and "\n" not in m for m in messages), messages
    return messages


def test_a_new_run_never_skips_its_exports_in_a_root_with_earlier_ones(world2):
    tmp, results = world2
    for message in _one_line(results, "collide"):
        assert "ExportDirError" in message and "step_2 already exists (written by run " in message
    assert sorted(os.listdir(f"{tmp}/shared")) == ["latest", "step_2", "step_4", "step_8"]


def test_a_live_runs_lock_and_a_file_as_root_are_refused_on_every_rank(world2):
    tmp, results = world2
    for message in _one_line(results, "locked"):
        assert "is in use by run live (pid" in message
    assert json.load(open(f"{tmp}/locked/.lock"))["run_id"] == "live"  # not taken over
    for message in _one_line(results, "root_is_file"):
        assert "afile: exists and is not a directory" in message


@pytest.mark.parametrize("case, expected", [
    ("outside_link", "tokenizer.json: links to "),
    ("negative_step", "global_step must be a non-negative integer, found -5"),
    ("step_past_max", "global_step 1000 is not below trainer.max_steps=6"),
    ("state_list", "trainer_state.json: expected a JSON object, found a list"),
])
def test_hostile_sources_are_refused_in_one_line_on_every_rank(world2, case, expected):
    tmp, results = world2
    for message in _one_line(results, case):
        assert message.startswith("HFImportError: ") and expected in message, message
    assert not os.path.exists(f"{tmp}/{case}_out/step_6")


def test_an_import_failure_on_one_rank_is_refused_on_every_rank(world2):
    messages = _one_line(world2[1], "one_rank_import")
    assert messages[1].startswith("HFImportError: ") and "injected on rank 1" in messages[1]
    assert messages[0].startswith("HFImportError: ") and "failed on rank 1: " in messages[0]

