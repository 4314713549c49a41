"""`python -m bridges.plan`: the export plan from a config alone. Sizes are checked against transformers' own
model built from the same config (on the meta device), the 355B plan against its known size and file limit,
the vision tower's writers against the first pipeline stage, and refusals print the run's one-line error."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bridges.plan import main, plan_export_of, smallest_world
from bridges.megatron.layout import ParallelLayout
from tests.bridges.test_full_scale_plan import GLM45_355B

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "conf", "model")


def _run(capsys, *argv) -> tuple[int, list[str], list[str]]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def _line(lines: list[str], start: str) -> str:
    return next(line for line in lines if line.startswith(start))


def test_vision_language_plan_matches_transformers_and_puts_the_vision_tower_on_the_first_stage():
    import transformers

    path = os.path.join(TINY, "qwen3_vl_moe_tiny")
    config = json.load(open(os.path.join(path, "config.json")))
    with torch.device("meta"):
        reference = transformers.Qwen3VLMoeForConditionalGeneration(transformers.AutoConfig.from_pretrained(path))
    state = reference.state_dict()
    layout = ParallelLayout(tp=2, pp=2, ep=2)
    plan = plan_export_of(config, layout, world=8, dtype="bf16")
    assert plan.tensors == len(state)
    assert plan.total_bytes == 2 * sum(t.numel() for t in state.values())  # every byte written once, bf16
    vision = [n for n in state if n.startswith("model.visual.")]
    assert plan.vision_tensors == len(vision) and plan.vision_bytes == 2 * sum(state[n].numel() for n in vision)
    assert plan.vision_writers and set(plan.vision_writers) <= set(plan.first_stage_ranks) == set(range(4))
    assert plan.merged_tensors > 0  # TP2: row-parallel shards go to one writer


@pytest.mark.parametrize("name", sorted(os.listdir(TINY)))
def test_every_shipped_family_plans_with_every_byte_written_once(name):
    from bridges.export.specs import hf_tensor_specs
    from bridges.models import family_for

    config = json.load(open(os.path.join(TINY, name, "config.json")))
    family = family_for(config)
    plan = plan_export_of(config, ParallelLayout(tp=2, pp=2, ep=2, etp=1), world=8)  # checks coverage itself
    specs = hf_tensor_specs(family, family.architecture(config), torch.bfloat16)
    assert plan.total_bytes == sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())
    assert set(plan.vision_writers) <= set(plan.first_stage_ranks) == set(range(4))
    assert bool(plan.vision_tensors) == ("vision_config" in config)


def test_tiny_config_cli_prints_the_plan(capsys):
    code, out, err = _run(capsys, os.path.join(TINY, "glm45_tiny"), "--tp", 2, "--ep", 2, "--write-gbps", 0.5)
    assert code == 0 and not err
    assert _line(out, "layout:").startswith("layout: TP2 x PP1 x EP2, expert TP 2 on 4 ranks")  # smallest world
    assert _line(out, "files: 1 ")
    assert "0 of 4 ranks write nothing" in _line(out, "bytes written per rank:")
    assert _line(out, "expected export time at 0.5 GB/s per rank:")
    assert not any(line.startswith("vision tower") for line in out)


def test_355b_plan_from_its_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(GLM45_355B))
    code, out, err = _run(capsys, tmp_path, "--tp", 8, "--pp", 4, "--ep", 8, "--etp", 1, "--write-gbps", 2)
    assert code == 0 and not err, err
    total = _hf_bytes()
    assert 710e9 < total < 725e9  # 355B parameters + the MTP layer, in bf16 (routers' score bias in fp32)
    assert _line(out, "model:") == f"model: glm4_moe, 44691 HF tensors, {total / 1e9:.2f} GB in bf16"
    assert _line(out, "layout:").endswith("on 32 ranks (data parallel 1, expert data parallel 1)")
    files = int(_line(out, "files:").split()[1])
    assert math.ceil(total / 5e9) <= files <= math.ceil(total / 5e9) + 8  # shards of at most 5 GB, few part-full
    per_rank = _line(out, "bytes written per rank:").split()
    busiest, mean = float(per_rank[per_rank.index("busiest") + 1]), float(per_rank[per_rank.index("mean") + 1][:-1])
    assert mean == pytest.approx(total / 32 / 1e9, abs=0.01) and mean <= busiest < 1.25 * mean
    seconds = float(_line(out, "expected export time at 2 GB/s per rank:").split(": ")[1].split()[0])
    assert seconds == pytest.approx(busiest / 2, abs=0.01)  # the busiest rank's bytes at 2 GB/s


def _hf_bytes() -> int:
    from bridges.export.specs import hf_tensor_specs
    from bridges.models import glm45

    specs = hf_tensor_specs(glm45.FAMILY, glm45.architecture(GLM45_355B), torch.bfloat16).values()
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs)


@pytest.mark.parametrize(
    "argv, message",
    [
        # test_train_cli checks train.py's line for the same layout: ParallelLayout.check_model makes both
        (["gpt_oss_tiny", "--tp", 2, "--ep", 2],
         "error: this model's experts have biases, which Megatron-Core supports only with expert tensor parallel 1: "
         "set parallel.etp=1 (got 2)"),
        (["glm45_tiny", "--ep", 3], "error: parallel.ep=3 does not divide the expert count 8"),
        (["glm45_tiny", "--tp", 2, "--world", 3], "error: world size 3 is not divisible by parallel.tp x parallel.pp"),
        (["no_such_model"], "error: no HF config at"),
        (["glm45_tiny", "--write-gbps", 0], "error: --write-gbps must be > 0, got 0.0"),
    ],
    ids=["expert-bias-etp", "ep-vs-experts", "world-vs-layout", "missing-config", "bandwidth"],
)
def test_refusals_are_one_line_with_exit_code_2(capsys, argv, message):
    code, out, err = _run(capsys, os.path.join(TINY, argv[0]), *argv[1:])
    assert code == 2 and not out
    assert len(err) == 1 and err[0].startswith(message), err


@pytest.mark.parametrize(
    "text, message",
    [
        (json.dumps({"model_type": "glm4_moe", "hidden_size": 8}), "HF config (glm4_moe) lacks required field"),
        (json.dumps({"model_type": "llama"}), "model_type 'llama' is not supported"),
        ("{not json", "cannot read HF config"),
    ],
    ids=["field-missing", "unsupported-family", "not-json"],
)
def test_invalid_config_is_refused(tmp_path, capsys, text, message):
    (tmp_path / "config.json").write_text(text)
    code, out, err = _run(capsys, tmp_path)
    assert code == 2 and not out and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_module_runs_as_a_command():
    done = subprocess.run([sys.executable, "-m", "bridges.plan", os.path.join(TINY, "gpt_oss_tiny"), "--tp", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: this model's experts have biases, which Megatron-Core supports only with expert tensor parallel 1: "
        "set parallel.etp=1 (got 2)"], done.stderr


def test_smallest_world_fits_dense_and_expert_groups():
    assert smallest_world(ParallelLayout(tp=8, pp=4, ep=8, etp=1)) == 32
    assert smallest_world(ParallelLayout(tp=2, pp=8, ep=16)) == 256
    assert smallest_world(ParallelLayout(tp=4, ep=3, etp=1)) == 12
