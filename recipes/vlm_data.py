"""Synthetic image + text data for vision-language recipes: the synthetic token language of recipes/data.py
with one image per sample (random pixels, a fixed patch grid) whose placeholder tokens sit at a random place.

The image's geometry (patch size, merge size, placeholder token) comes from the model's vision tower at setup;
placeholder targets carry no loss (`loss_mask`).
"""

from __future__ import annotations

import numpy as np
import torch

from recipes.data import DataConfigError, TokenDataModule, TokenDataset, synthetic_tokens


class ImageTextDataset(TokenDataset):
    """Token rows with image placeholders, plus each row's image: `pixel_values` [patches, C*T*P*P] drawn from
    a generator seeded by (seed, row), `image_grid_thw` [3], and `loss_mask` [seq] (0 where the target is an
    image token)."""

    def __init__(self, tokens: np.ndarray, image_token_id: int, grid: tuple[int, int, int], patch_values: int,
                 seed: int):
        super().__init__(tokens)
        self.image_token_id, self.grid, self.patch_values, self.seed = image_token_id, grid, patch_values, seed

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(index)
        row = index % len(self.tokens)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + row)
        patches = self.grid[0] * self.grid[1] * self.grid[2]
        sample["pixel_values"] = torch.randn(patches, self.patch_values, generator=gen)
        sample["image_grid_thw"] = torch.tensor(self.grid)
        sample["loss_mask"] = (sample["tokens"][1:] != self.image_token_id).to(torch.float32)
        return sample


class ImageTextDataModule(TokenDataModule):
    """TokenDataModule with one image per sample; `image_grid` is (t, h, w) in patches (h, w multiples of the
    tower's spatial merge size; t = 1: images)."""

    def __init__(self, image_grid: tuple[int, int, int] = (1, 4, 4), **kwargs):
        super().__init__(**kwargs)
        if self.kind != "synthetic":
            raise DataConfigError(f"data.kind: image + text data is synthetic only, got {self.kind!r}")
        self.image_grid = tuple(int(n) for n in image_grid)
        self.tower = None  # the model's VisionTower, read at setup

    def setup(self, stage: str | None = None) -> None:
        self.tower = self.tower or self.trainer.lightning_module.vision_tower
        t, h, w = self.image_grid
        merge = self.tower.spatial_merge_size
        if t != 1 or h % merge or w % merge:
            raise DataConfigError(f"data.image_grid {list(self.image_grid)}: needs t = 1 and h, w multiples of {merge}")
        self.image_tokens = h * w // merge**2
        if self.image_tokens > self.seq_length:
            raise DataConfigError(f"data.seq_length={self.seq_length} cannot hold an image of {self.image_tokens} "
                                  "tokens")
        self.train_tokens = self._rows(self.num_samples, split=0)
        self.val_tokens = self._rows(self.val_samples, split=1)

    def _rows(self, num_samples: int, split: int) -> np.ndarray:
        """Synthetic text over the ids below the image token, with an image block at a random place of the inputs."""
        text_vocab = min(self.vocab_size, self.tower.image_token_id)
        rows = synthetic_tokens(num_samples, self.seq_length, text_vocab, self.seed, split)
        rng = np.random.default_rng([self.seed, split, 7])
        for row, start in zip(rows, rng.integers(0, self.seq_length - self.image_tokens + 1, num_samples)):
            row[start : start + self.image_tokens] = self.tower.image_token_id
        return rows

    def dataset(self, tokens) -> ImageTextDataset:
        c = self.tower.hf_config()
        patch_values = c.in_channels * c.temporal_patch_size * c.patch_size**2
        return ImageTextDataset(tokens, self.tower.image_token_id, self.image_grid, patch_values, self.seed)
