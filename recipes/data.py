"""Training data as token arrays: a synthetic learnable stream, or a `.npy` file of token ids.

Each sample is `seq_length + 1` token ids (inputs and shifted labels). One Lightning batch holds the
micro-batches of one optimizer step for this data-parallel rank.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class DataConfigError(ValueError):
    """Bad data settings (missing file, wrong shape, batch sizes that do not divide)."""


class TokenDataset(Dataset):
    """Rows of token ids; indices past the end are padding (a repeated row with weight 0), so
    every data-parallel rank runs the same number of micro-batches and no sample counts twice."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        real = index < len(self.tokens)
        row = self.tokens[index % len(self.tokens)]
        return {
            "tokens": torch.from_numpy(np.asarray(row, dtype=np.int64)),
            "weight": torch.tensor(1.0 if real else 0.0),
        }


class DataParallelSampler(DistributedSampler):
    """This data-parallel rank's share of the rows, padded to whole steps on every rank.

    A DistributedSampler so Lightning leaves it in place (it would otherwise wrap it and split the
    rows over ranks a second time); its own __init__, since the split is over data-parallel ranks.
    """

    def __init__(self, num_rows: int, dp_rank: int, dp_size: int, step_batch: int, shuffle: bool,
                 drop_last: bool, seed: int, skip_steps: int = 0):
        self.num_rows, self.dp_rank, self.dp_size = num_rows, dp_rank, dp_size
        self.step_batch, self.shuffle, self.drop_last, self.seed = step_batch, shuffle, drop_last, seed
        self.epoch = 0
        self.per_step = step_batch * dp_size
        steps = num_rows // self.per_step if drop_last else -(-num_rows // self.per_step)
        self.total = steps * self.per_step
        # A resumed run continues where its first epoch stopped (skipped once, in epoch 0 only).
        self.skip_steps = skip_steps % max(steps, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_rows, generator=g).tolist()
        else:
            order = list(range(self.num_rows))
        order = order[: self.total] + list(range(self.num_rows, self.num_rows + self.total - len(order[: self.total])))
        if self.epoch == 0:
            order = order[self.skip_steps * self.per_step :]
        return iter(order[self.dp_rank :: self.dp_size])

    def __len__(self) -> int:
        skipped = self.skip_steps * self.per_step if self.epoch == 0 else 0
        return (self.total - skipped) // self.dp_size


def synthetic_tokens(num_samples: int, seq_length: int, vocab_size: int, seed: int, split: int = 0) -> np.ndarray:
    """Sequences that follow a fixed random successor table: next = table[prev] most of the time.

    The table depends on `seed` only, the sampled rows on `split` too, so training and validation
    draw different rows of the same language. A model learns the table within a few steps, so the
    loss visibly falls on tiny runs.
    """
    successor = np.random.default_rng(seed).permutation(vocab_size)
    rng = np.random.default_rng([seed, split])
    out = np.empty((num_samples, seq_length + 1), dtype=np.int64)
    out[:, 0] = rng.integers(0, vocab_size, num_samples)
    noise = rng.random((num_samples, seq_length)) < 0.1
    random_tokens = rng.integers(0, vocab_size, (num_samples, seq_length))
    for t in range(seq_length):
        out[:, t + 1] = np.where(noise[:, t], random_tokens[:, t], successor[out[:, t]])
    return out


def load_token_file(path: str, seq_length: int, vocab_size: int) -> np.ndarray:
    if not path or not os.path.isfile(path):
        raise DataConfigError(f"data.path: token file {path!r} does not exist")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise DataConfigError(f"data.path: {path} is not a plain .npy array ({e})") from e
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataConfigError(
            f"data.path: {path} must hold an integer array [num_samples, seq_length + 1], "
            f"found {tokens.dtype} {tuple(tokens.shape)}"
        )
    if tokens.shape[1] != seq_length + 1:
        raise DataConfigError(
            f"data.path: {path} has rows of {tokens.shape[1]} tokens, expected data.seq_length + 1 = {seq_length + 1}"
        )
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise DataConfigError(f"data.path: {path} has token ids outside [0, {vocab_size})")
    return tokens


class TokenDataModule(pl.LightningDataModule):
    """Serves `global_batch_size / dp` samples per step to each data-parallel rank.

    `kind` is "synthetic" or "tokens" (then `path` names the .npy file). The validation split is
    the file's last `val_samples` rows (tokens) or a separate synthetic draw.
    """

    def __init__(
        self,
        kind: str = "synthetic",
        path: str | None = None,
        seq_length: int = 64,
        micro_batch_size: int = 2,
        global_batch_size: int = 8,
        num_samples: int = 4096,
        val_samples: int = 32,
        seed: int = 1234,
    ):
        super().__init__()
        if kind not in ("synthetic", "tokens"):
            raise DataConfigError(f"data.kind must be 'synthetic' or 'tokens', got {kind!r}")
        self.kind, self.path = kind, path
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.global_batch_size = global_batch_size
        self.num_samples, self.val_samples, self.seed = num_samples, val_samples, seed
        self.vocab_size: int | None = None  # set by the module before setup
        self.consumed_samples = 0  # set when a run continues from an export (hf_import)

    def step_batch_size(self, dp_size: int) -> int:
        """Samples per optimizer step on one data-parallel rank."""
        if self.micro_batch_size < 1 or self.global_batch_size < 1:  # a step of no micro-batches never ends
            raise DataConfigError(
                f"data.micro_batch_size={self.micro_batch_size} and data.global_batch_size={self.global_batch_size} "
                f"must be positive"
            )
        per_dp = self.micro_batch_size * dp_size
        if self.global_batch_size % per_dp:
            raise DataConfigError(
                f"data.global_batch_size={self.global_batch_size} is not divisible by "
                f"data.micro_batch_size x data-parallel size = {self.micro_batch_size} x {dp_size}"
            )
        return self.global_batch_size // dp_size

    def setup(self, stage: str | None = None) -> None:
        assert self.vocab_size is not None, "the model sets data.vocab_size before setup"
        if self.kind == "tokens":
            tokens = load_token_file(self.path, self.seq_length, self.vocab_size)
            if len(tokens) <= self.val_samples and stage == "fit":
                raise DataConfigError(f"data.path: {self.path} has {len(tokens)} rows, not enough for training")
            self.train_tokens = tokens[: max(len(tokens) - self.val_samples, 0)] if stage == "fit" else tokens[:0]
            self.val_tokens = tokens if stage == "validate" else tokens[len(tokens) - self.val_samples :]
        else:
            self.train_tokens = synthetic_tokens(self.num_samples, self.seq_length, self.vocab_size, self.seed)
            self.val_tokens = synthetic_tokens(self.val_samples, self.seq_length, self.vocab_size, self.seed, split=1)

    def _loader(self, tokens, shuffle: bool, drop_last: bool, skip_steps: int = 0) -> DataLoader:
        dp_rank, dp_size = _data_parallel_rank_and_size()
        step_batch = self.step_batch_size(dp_size)
        sampler = DataParallelSampler(len(tokens), dp_rank, dp_size, step_batch, shuffle, drop_last, self.seed,
                                      skip_steps)
        return DataLoader(self.dataset(tokens), batch_size=step_batch, sampler=sampler, num_workers=0)

    def dataset(self, tokens) -> Dataset:
        """The samples served from token rows (subclasses add e.g. images)."""
        return TokenDataset(tokens)

    def train_dataloader(self) -> DataLoader:
        skip = self.consumed_samples // self.global_batch_size
        return self._loader(self.train_tokens, shuffle=True, drop_last=True, skip_steps=skip)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_tokens, shuffle=False, drop_last=False)


def _data_parallel_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    return 0, 1
