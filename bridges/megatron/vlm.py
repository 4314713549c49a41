"""A vision-language model on Megatron-Core: a GPTModel (multimodal rotary) fed by a transformers vision tower.

The tower's image features replace the embeddings of the image placeholder tokens; its deepstack features
(Qwen3-VL) are added to the outputs of the first decoder layers at the image positions, as transformers
does. The tower runs on the first pipeline stage, replicated over tensor-parallel ranks: each rank keeps the
features of its own sequence chunk (sequence parallelism), so the tower's gradients are summed over the
TP group (its parameters are marked `sequence_parallel`) and averaged over data-parallel replicas by DDP.
The tower lives under `vision.` in the state dict, next to the GPT names, so the bridge's canonical names hold.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from bridges.megatron import build
from bridges.megatron.mrope import mrope_position_ids
from bridges.rules.vision_tower import VisionTower


class VisionLanguageModel(GPTModel):
    """GPTModel + `vision` (the HF tower; None on later pipeline stages). Build with `build_vlm_model`."""

    def attach_vision(self, tower: VisionTower, dtype: torch.dtype) -> None:
        self.tower = tower
        self.vision = tower.build(dtype) if self.pre_process else None
        for param in self.vision.parameters() if self.vision is not None else ():
            param.sequence_parallel = bool(self.config.sequence_parallel)
        self._deepstack: list[torch.Tensor] = []
        for layer in self.decoder.layers:
            index = layer.layer_number - 1  # global decoder layer
            if index < tower.deepstack_layers:
                if not self.pre_process:
                    raise NotImplementedError(
                        f"decoder layer {index} takes deepstack features but sits on a later pipeline stage than the "
                        f"vision tower; use a layout whose first stage holds the first {tower.deepstack_layers} layers"
                    )
                layer.register_forward_hook(self._deepstack_hook(index))

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None, *args,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None, **kwargs):
        """GPTModel.forward plus the images of the batch: `pixel_values` [patches, C*T*P*P] (or
        [batch, patches, ...]), `image_grid_thw` [images, 3]. 2-D `position_ids` become 3-D M-RoPE positions."""
        if image_grid_thw is not None:
            image_grid_thw = image_grid_thw.reshape(-1, 3)
            position_ids = mrope_position_ids(
                input_ids, self.tower.image_token_id, image_grid_thw, self.tower.spatial_merge_size
            )
        elif position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        if decoder_input is None and self.pre_process:
            decoder_input, self._deepstack = self._embed(input_ids, position_ids, pixel_values, image_grid_thw)
        try:
            return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels, *args, **kwargs)
        finally:
            self._deepstack = []

    # ----------------------------------------------------------------- embeddings
    def _embed(self, input_ids, position_ids, pixel_values, image_grid_thw):
        """([seq (/ tp), batch, hidden] decoder input, deepstack additions in the same layout)."""
        text = self.embedding(input_ids=input_ids, position_ids=position_ids)
        if pixel_values is None:
            return text, []
        if image_grid_thw is None:
            raise ValueError("pixel_values need image_grid_thw")
        pixels = pixel_values.reshape(-1, pixel_values.shape[-1])
        out = self.vision(pixels.to(next(self.vision.parameters()).dtype), grid_thw=image_grid_thw)
        deepstack = list(getattr(out, "deepstack_features", None) or [])[: self.tower.deepstack_layers]
        features = [out.pooler_output] + deepstack
        mask = input_ids == self.tower.image_token_id  # [batch, seq]
        if int(mask.sum()) != features[0].shape[0]:
            raise ValueError(
                f"the batch has {int(mask.sum())} image tokens (id {self.tower.image_token_id}) but its images give "
                f"{features[0].shape[0]} features"
            )
        placed = [self._local(_scatter(mask, f.to(text.dtype))) for f in features]
        decoder_input = torch.where(self._local(mask[..., None]), placed[0], text)
        return decoder_input, placed[1:]

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, ...] -> this rank's [seq (/ tp), batch, ...]: a plain slice, so gradients reach the
        (replicated) tower from this rank's chunk only and are summed over TP with the tower's other grads."""
        x = x.transpose(0, 1)
        if self.config.sequence_parallel:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            x = x.chunk(tp, dim=0)[parallel_state.get_tensor_model_parallel_rank()]
        return x

    def _deepstack_hook(self, index: int):
        def add(module, inputs, output):
            if index >= len(self._deepstack):
                return output
            hidden, context = output
            return hidden + self._deepstack[index], context

        return add


def _scatter(mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """[batch, seq, hidden] zeros with `features` rows at the True positions of `mask`, batch-major
    (transformers' `masked_scatter` order)."""
    full = features.new_zeros(*mask.shape, features.shape[-1])
    return full.masked_scatter(mask[..., None].expand_as(full), features)


def build_vlm_model(arch: build.GPTArchitecture, layout, params_dtype: torch.dtype = torch.float32,
                    mtp_loss_scaling_factor: float = 0.1, overrides=None, knobs=None) -> VisionLanguageModel:
    """This rank's vision-language model; `arch.extra["vision"]` is the family's `VisionTower`."""
    tower = arch.extra.get("vision")
    if not isinstance(tower, VisionTower):
        raise ValueError("build_vlm_model needs an architecture with a vision tower (arch.extra['vision'])")
    model = build.build_gpt_model(arch, layout, params_dtype, mtp_loss_scaling_factor, overrides,
                                  model_class=VisionLanguageModel, knobs=knobs)
    model.attach_vision(tower, params_dtype)
    return model
