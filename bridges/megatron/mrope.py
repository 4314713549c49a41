"""Multimodal rotary positions (M-RoPE): 3-D position ids for text + image sequences, and the interleaved
channel layout of Qwen3-VL, which Megatron-Core 0.16's `MultimodalRotaryEmbedding` does not have.

Megatron-Core 0.16 assigns the rotary frequencies to (T, H, W) in contiguous sections (Qwen2-VL, GLM-4.5V);
Qwen3-VL cycles them (T, H, W, T, H, W, ...; channels past 3 x the H / W section stay T). The subclass here
keeps Megatron's interface and numerics (the same frequencies, cos/sin taken by Megatron's rotary apply)
and changes only which position each channel reads.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding


class InterleavedMultimodalRotaryEmbedding(MultimodalRotaryEmbedding):
    """Qwen3-VL's interleaved M-RoPE with the interface of Megatron's `MultimodalRotaryEmbedding`."""

    @classmethod
    def like(cls, sectioned: MultimodalRotaryEmbedding) -> "InterleavedMultimodalRotaryEmbedding":
        """The interleaved variant of a built `MultimodalRotaryEmbedding` (same frequencies and groups)."""
        out = cls.__new__(cls)
        torch.nn.Module.__init__(out)
        out.rotary_interleaved = sectioned.rotary_interleaved
        out.seq_len_interpolation_factor = sectioned.seq_len_interpolation_factor
        out.inv_freq = sectioned.inv_freq
        out.cp_group = sectioned.cp_group
        if out.rotary_interleaved:
            raise ValueError("interleaved M-RoPE with interleaved rotary pairs (rotary_interleaved) is not supported")
        return out

    def forward(self, position_ids: torch.Tensor, mrope_section: list[int], cp_group=None) -> torch.Tensor:
        """[3, batch, seq] position ids -> [seq, batch, 1, rotary dim] angles (Megatron's layout)."""
        from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

        positions = position_ids.to(device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        if self.seq_len_interpolation_factor is not None:
            positions = positions * (1 / self.seq_len_interpolation_factor)
        freqs = positions[..., None].float() * self.inv_freq  # [3, batch, seq, dim / 2], as transformers
        axis = interleaved_axes(mrope_section, freqs.shape[-1]).to(freqs.device)
        freqs = freqs.gather(0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]
        emb = torch.cat((freqs, freqs), dim=-1)[..., None, :].transpose(0, 1).contiguous()
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb


def interleaved_axes(section: list[int], channels: int) -> torch.Tensor:
    """For each of `channels` rotary frequencies, the position axis it reads (0 = T, 1 = H, 2 = W):
    transformers' Qwen3-VL `recomposition_frequencies` (H at 1, 4, ... below 3 x section[1]; W at 2, 5, ...)."""
    if sum(section) != channels:
        raise ValueError(f"mrope_section {list(section)} does not sum to the {channels} rotary frequencies")
    axis = torch.zeros(channels, dtype=torch.long)
    for a in (1, 2):
        axis[a : 3 * section[a] : 3] = a
    return axis


def mrope_position_ids(
    input_ids: torch.Tensor, image_token_id: int, image_grid_thw: torch.Tensor | None, spatial_merge_size: int
) -> torch.Tensor:
    """[3, batch, seq] positions of text + image sequences, as transformers' Qwen3-VL / GLM-4.5V `get_rope_index`
    for images: text advances every axis by one; an image's tokens (merged h x w consecutive `image_token_id`s
    per row of `image_grid_thw`, images in order over the batch) take T = start and (H, W) = start + their merged
    grid coordinates; what follows starts at start + max(merged h, merged w)."""
    batch, seq = input_ids.shape
    out = torch.empty(3, batch, seq, dtype=torch.long, device=input_ids.device)
    grids = iter([] if image_grid_thw is None else image_grid_thw.tolist())
    for b in range(batch):
        is_image = input_ids[b] == image_token_id
        bounds = [0, *(torch.nonzero(is_image[1:] != is_image[:-1]).flatten() + 1).tolist(), seq]
        pos = 0
        for start, end in zip(bounds, bounds[1:]):  # runs of text or of image tokens
            if not is_image[start]:
                out[:, b, start:end] = pos + torch.arange(end - start, device=input_ids.device)
                pos += end - start
                continue
            while start < end:  # one or more images back to back
                t, h, w = next(grids, (None, None, None))
                if t is None:
                    raise ValueError(f"sample {b}: more image tokens than image_grid_thw has images")
                if t != 1:
                    raise ValueError(f"sample {b}: image grid {(t, h, w)} has t={t}; only single-frame images "
                                     "are supported")
                h, w = h // spatial_merge_size, w // spatial_merge_size
                if start + h * w > end:
                    raise ValueError(f"sample {b}: an image of {h} x {w} merged patches needs {h * w} image tokens "
                                     f"at {start}")
                rows = torch.arange(h, device=input_ids.device).repeat_interleave(w)
                cols = torch.arange(w, device=input_ids.device).repeat(h)
                out[0, b, start : start + h * w] = pos
                out[1, b, start : start + h * w] = pos + rows
                out[2, b, start : start + h * w] = pos + cols
                pos, start = pos + max(h, w), start + h * w
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more images than the batch has image tokens for")
    return out
