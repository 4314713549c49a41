"""LightningModule for vision-language MoE families (Qwen3-VL-MoE, GLM-4.5V): MegatronGPTModule whose model is
bridges.megatron.vlm.VisionLanguageModel (HF vision tower + Megatron GPT) and whose batches may carry images.

Everything else (schedule, losses, optimizer, checkpoints, HF import / export) is MegatronGPTModule's: the
tower's weights are ordinary parameters of the model under `vision.`, which the family's rules map.
"""

from __future__ import annotations

from typing import Any

from bridges.checkpoint import hf_config
from bridges.models import family_for
from bridges.rules.vision_tower import VisionTower
from recipes.module import MegatronGPTModule


class MegatronVLMModule(MegatronGPTModule):
    # One image per sample: `pixel_values` [batch, patches, C*T*P*P], `image_grid_thw` [batch, 3].
    model_input_keys = ("pixel_values", "image_grid_thw")

    @property
    def vision_tower(self) -> VisionTower:
        return self.arch.extra["vision"]

    def build_model(self):
        from bridges.megatron.vlm import build_vlm_model  # imports Megatron-Core: only once a model is built

        return build_vlm_model(self.arch, self.layout, self.params_dtype, mtp_loss_scaling_factor=self.mtp_loss_factor,
                               knobs=self.knobs)


def module_class_for(config: dict[str, Any]) -> type[MegatronGPTModule]:
    """MegatronVLMModule for a vision-language family's HF config, else MegatronGPTModule."""
    vision = family_for(config).architecture(config).extra.get("vision")
    return MegatronVLMModule if isinstance(vision, VisionTower) else MegatronGPTModule


def megatron_module(hf_config_path: str, source_hf_config: dict[str, Any] | None = None,
                    **kwargs: Any) -> MegatronGPTModule:
    """The module for the HF config at `hf_config_path` (its contents `source_hf_config` when already read);
    `kwargs`: MegatronGPTModule's."""
    config = source_hf_config if source_hf_config is not None else hf_config.load_config(hf_config_path)
    return module_class_for(config)(hf_config_path, source_hf_config=config, **kwargs)
