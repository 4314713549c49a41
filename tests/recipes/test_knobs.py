"""Performance knobs: each reaches Megatron-Core's TransformerConfig / DDP config, and a bad value stops the run
before any process starts with one line naming the key."""

import glob

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from tests.train_runs import ROOT, train


def _compose(*overrides):
    with initialize_config_dir(config_dir=f"{ROOT}/conf", version_base="1.3"):
        return compose(config_name="config", overrides=["recipe=glm45", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["model.recompute=partial"], "model.recompute must be"),
    (["+model.overrides.no_such_field=1"], "model.overrides.no_such_field: not a field"),
    (["+model.overrides.num_layers=3"], "model.overrides.num_layers: set by the model config"),
    (["model.moe_grouped_gemm=true", "trainer.accelerator=cpu"], "model.moe_grouped_gemm=true needs Transformer Engine"),
    (["model.moe_token_dispatcher=fast"], "model.moe_token_dispatcher must be"),
    (["parallel.pp=2", "parallel.ep=1", "parallel.first_stage_layers=3", "parallel.last_stage_layers=3"],
     "parallel.first_stage_layers=3, parallel.last_stage_layers=3"),
    (["parallel.pp=1", "parallel.first_stage_layers=1"], "parallel.first_stage_layers=1 needs parallel.pp > 1"),
    (["parallel.first_stage_layers=0"], "parallel.first_stage_layers: must be >= 1"),
    (["ddp.overlap_grad_reduce=maybe"], "ddp.overlap_grad_reduce: expected true or false"),
    (["hf_export.group_timeout_minutes=0"], "hf_export.group_timeout_minutes: must be > 0"),
    (["parallel.virtual_stages=2"], "parallel.virtual_stages=2: the interleaved pipeline schedule"),
    (["ddp.overlap_param_gather=true"], "ddp.overlap_param_gather=true needs ddp.overlap_grad_reduce=true"),
    # Megatron-Core's own checks run before launch too.
    (["model.recompute=selective", "model.recompute_modules=[moe_act]"], "Megatron-Core refuses them: moe_act"),
])
def test_bad_knobs_stop_before_launch_naming_the_key(overrides, message):
    import train

    cfg = _compose(*overrides)
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        train.validate_config(cfg)  # types and ranges first, then what needs the model
        train.build_run(cfg)


def test_knobs_reach_the_transformer_config():
    from bridges.megatron import build, cpu_runtime
    from bridges.megatron.knobs import ModelKnobs
    from bridges.megatron.layout import ParallelLayout
    from bridges.models import glm45
    from tests.bridges.glm45_tiny import tiny_config

    cfg = _compose("model.recompute=selective", "model.recompute_modules=[core_attn,layernorm]",
                   "model.cross_entropy_fusion=true", "+model.overrides.moe_router_load_balancing_type=aux_loss",
                   "parallel.pp=2", "parallel.first_stage_layers=1")
    from omegaconf import OmegaConf

    knobs = ModelKnobs.from_config(OmegaConf.to_container(cfg.model))
    cpu_runtime.enable()  # a CPU run, as the strategy decides from its root device
    arch = glm45.architecture({**tiny_config().to_dict(), "model_type": "glm4_moe"})
    layout = ParallelLayout(**OmegaConf.to_container(cfg.parallel))
    config = build.transformer_config(arch, layout, torch.float32, knobs=knobs)
    assert config.recompute_granularity == "selective" and config.recompute_modules == ["core_attn", "layernorm"]
    assert config.cross_entropy_loss_fusion and config.moe_router_load_balancing_type == "aux_loss"
    assert config.num_layers_in_first_pipeline_stage == 1 and config.num_layers_in_last_pipeline_stage is None
    assert not config.moe_grouped_gemm and config.moe_token_dispatcher_type == "allgather"  # CPU, no TE
    full = build.transformer_config(arch, ParallelLayout(), knobs=ModelKnobs(recompute="full", recompute_num_layers=2))
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "uniform", 2)


def test_fewer_micro_batches_than_stages_warns(capsys):
    import train

    train.warn_pipeline_bubble(micro_batches=1, pp=4)
    assert "1 micro-batch(es) per step with parallel.pp=4" in capsys.readouterr().err
    train.warn_pipeline_bubble(micro_batches=4, pp=4)
    assert capsys.readouterr().err == ""


def test_export_group_timeout_is_a_setting():
    from callbacks.hf_export import HFExportCallback

    assert HFExportCallback(group_timeout_minutes=240).group_timeout.total_seconds() == 240 * 60
    with pytest.raises(ValueError, match="hf_export.group_timeout_minutes must be > 0"):
        HFExportCallback(group_timeout_minutes=0)


def _exported(run_dir, step: int) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(glob.glob(f"{run_dir}/hf/step_{step}/*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_overlapped_param_gather_exports_the_weights_after_the_step(tmp_path):
    """With ddp.overlap_param_gather Megatron gathers the distributed optimizer's updated shards only at the next
    forward; an export between steps must still hold every rank's updated values, as without the overlap."""
    runs = {}
    for name, knobs in {"plain": [], "overlap": ["ddp.overlap_grad_reduce=true", "ddp.overlap_param_gather=true"]}.items():
        done = train(tmp_path / name, "recipe=glm45", "parallel.ep=1", "trainer.max_steps=2",
                     "hf_export.every_n_train_steps=1", "hf_export.async_write=false", *knobs)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = tmp_path / name / "run"
    before, after = _exported(runs["plain"], 1), _exported(runs["plain"], 2)
    overlap = _exported(runs["overlap"], 2)
    assert set(overlap) == set(after)
    moved = max((after[n].float() - before[n].float()).abs().max().item() for n in after)
    off = max((overlap[n].float() - after[n].float()).abs().max().item() for n in after)
    # the same training (reductions may only be ordered differently), far from a step's update
    assert off <= 1e-3 * moved, (off, moved)
