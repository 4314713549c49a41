"""The vision tower of a vision-language family: the `transformers` vision module itself, named by a spec.

Its weights pass through the bridge unchanged (HF `model.visual.X` <-> Megatron `vision.X`), replicated on
every tensor-parallel rank. Its tensor names and shapes come from building the module on the meta device,
so rule tables need no weights. Never loads remote code: the classes are transformers' own.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from bridges.rules.rule import same

MEGATRON_PREFIX = "vision."  # the tower's parameters inside bridges.megatron.vlm.VisionLanguageModel
INIT_SEED = 20250101  # every rank initialises the (replicated) tower alike, whatever Megatron drew before


@dataclass(frozen=True)
class VisionTower:
    model_class: str  # transformers class, e.g. "Qwen3VLMoeVisionModel"
    config_class: str  # its config class, e.g. "Qwen3VLMoeVisionConfig"
    config: dict[str, Any] = field(hash=False)  # the HF `vision_config`
    image_token_id: int = 0  # placeholder token the image features replace
    spatial_merge_size: int = 1  # patches merged per image token along each axis
    deepstack_layers: int = 0  # decoder layers 0..n-1 get the tower's deepstack features added (Qwen3-VL)

    def build(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """A freshly initialised tower, the same on every rank (its own seed; the global RNG is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            tower = _model_class(self.model_class)._from_config(self.hf_config(), dtype=dtype)
        return tower

    def hf_config(self):
        import transformers

        return getattr(transformers, self.config_class)(**self.config)

    def rules(self, hf_prefix: str) -> list:
        """Every tower tensor, unchanged and replicated over TP: `vision.X` <-> `{hf_prefix}X`."""
        return [same(MEGATRON_PREFIX + name, hf_prefix + name, shape) for name, shape in self.tensor_shapes().items()]

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """{name inside the tower: shape} of every weight and persistent buffer (no data is made)."""
        return dict(_shapes(self.model_class, self.config_class, json.dumps(self.config, sort_keys=True)))


def _model_class(name: str):
    import transformers

    return getattr(transformers, name)


@functools.lru_cache(maxsize=8)
def _shapes(model_class: str, config_class: str, config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    import transformers

    config = getattr(transformers, config_class)(**json.loads(config_json))
    with torch.device("meta"):
        tower = _model_class(model_class)._from_config(config)
    return tuple((name, tuple(t.shape)) for name, t in tower.state_dict().items())
