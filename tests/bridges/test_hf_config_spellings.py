"""Exported config.json is read alike by transformers 5 (installed) and 4.x (servers, lm-eval): every family's
export config, with a RoPE base and rotary fraction that are nobody's default, gives the same RoPE values and
dtype under transformers 5's `AutoConfig` and under the 4.x reading rules written out below."""

import dataclasses
import json
import os

import pytest
import torch

from bridges.checkpoint import hf_config as hfc
from bridges.models import family_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["glm45_tiny", "gpt_oss_tiny", "qwen3_moe_tiny", "qwen35_moe_tiny", "qwen3_vl_moe_tiny", "glm45v_tiny"]

# transformers 4.57, configuration_<model>.py: what a config.json without the key falls back on.
V4_DEFAULTS = {
    "glm4_moe": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    "gpt_oss": {"rope_theta": 150000.0, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                          "beta_slow": 1.0, "truncate": False,
                                                          "original_max_position_embeddings": 4096}},
    "qwen3_moe": {"rope_theta": 10000.0},
    "qwen3_vl_moe_text": {"rope_theta": 5000000.0},
    "glm4v_moe_text": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5},
}


def v4_rope(config: dict) -> dict:
    """RoPE as transformers 4.57 reads config.json: the text config's top-level `rope_theta` and
    `partial_rotary_factor` (`_compute_default_rope_parameters`: getattr(config, ..., 1.0)), the rest from
    `rope_scaling` (`rope_type`, or legacy `type`; null: default RoPE). `rope_parameters` is not read."""
    text = config.get("text_config") or config
    defaults = V4_DEFAULTS.get(text["model_type"], {"rope_theta": 10000.0})
    scaling = dict((text["rope_scaling"] if "rope_scaling" in text else defaults.get("rope_scaling")) or {})
    scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type", "default"))
    return {"rope_theta": float(text.get("rope_theta", defaults["rope_theta"])),
            "partial_rotary_factor": float(text.get("partial_rotary_factor", defaults.get("partial_rotary_factor", 1.0))),
            **scaling}


def v4_dtype(config: dict):
    return config.get("torch_dtype")  # releases before 4.56 read only `torch_dtype`


def v5_rope(directory: str) -> dict:
    from transformers import AutoConfig

    params = dict(AutoConfig.from_pretrained(directory).get_text_config().rope_parameters)
    params.setdefault("partial_rotary_factor", 1.0)
    params.pop("type", None)
    return {k: float(v) if k in ("rope_theta", "partial_rotary_factor") else v for k, v in params.items()}


def _export_configs(name: str, tmp_path) -> tuple[str, str]:
    """The family's export config for a model with rope_theta 123456 and (where the family has partial
    rotary) rotary fraction 0.25: as transformers 5 spells it, and as exports write it. Returns both dirs."""
    source = hfc.load_config(os.path.join(ROOT, "conf/model", name))
    family = family_for(source)
    arch = family.architecture(source)
    changes = {"rotary_base": 123456.0}
    if arch.rotary_percent != 1.0:
        changes["rotary_percent"] = 0.25
    config = family.hf_config(dataclasses.replace(arch, **changes), source, torch.bfloat16)
    dirs = []
    for label, data in (("v5_only", config), ("export", hfc.with_legacy_spellings(config))):
        (tmp_path / label).mkdir()
        (tmp_path / label / "config.json").write_text(json.dumps(data))
        dirs.append(str(tmp_path / label))
    return dirs[0], dirs[1]


@pytest.mark.parametrize("name", TINY)
def test_transformers_4_and_5_read_the_same_rope_and_dtype(name, tmp_path):
    v5_only, export = _export_configs(name, tmp_path)
    exported = json.load(open(f"{export}/config.json"))
    expected = v5_rope(v5_only)
    assert expected["rope_theta"] == 123456.0
    assert v5_rope(export) == expected  # transformers 5 reads the export as it reads its own spelling
    assert v4_rope(exported) == expected  # and transformers 4.x reads the same values
    assert v4_dtype(exported) == exported["dtype"] == "bfloat16"
    # Without the 4.x spellings, 4.x would read its class default: the check above is not vacuous.
    assert v4_rope(json.load(open(f"{v5_only}/config.json")))["rope_theta"] != 123456.0


def test_legacy_spellings_follow_rope_parameters():
    config = {"model_type": "glm4_moe", "dtype": "float32",
              "rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5}}
    out = hfc.with_legacy_spellings(config)
    assert out["rope_theta"] == 5e5 and out["partial_rotary_factor"] == 0.5 and out["rope_scaling"] is None
    assert out["torch_dtype"] == "float32" and out["rope_parameters"] == config["rope_parameters"]
    yarn = hfc.with_legacy_spellings({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.5e5, "factor": 32.0}})
    assert yarn["rope_scaling"] == {"rope_type": "yarn", "factor": 32.0} and "torch_dtype" not in yarn
