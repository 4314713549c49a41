"""Token data: every row once per epoch across data-parallel ranks, padding carries weight 0."""

import numpy as np
import pytest

from recipes.data import DataConfigError, DataParallelSampler, TokenDataset, load_token_file, synthetic_tokens


@pytest.mark.parametrize("rows, dp, step_batch", [(10, 2, 2), (8, 2, 2), (7, 3, 1), (5, 1, 4)])
def test_validation_sampler_covers_every_row_once_with_equal_steps(rows, dp, step_batch):
    dataset = TokenDataset(np.arange(rows * 3).reshape(rows, 3))
    per_rank = [list(DataParallelSampler(rows, r, dp, step_batch, False, False, 0)) for r in range(dp)]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) % step_batch == 0
    real = [i for p in per_rank for i in p if dataset[i]["weight"] == 1]
    assert sorted(real) == list(range(rows))
    assert all(dataset[i]["weight"] == 0 for p in per_rank for i in p if i >= rows)


def test_training_sampler_drops_partial_steps_and_skips_consumed_steps():
    full = [list(DataParallelSampler(20, r, 2, 3, True, True, 0)) for r in range(2)]
    assert all(len(p) == 9 for p in full)  # 3 whole steps of 3 per rank
    resumed = [list(DataParallelSampler(20, r, 2, 3, True, True, 0, skip_steps=1)) for r in range(2)]
    assert all(resumed[r] == full[r][3:] for r in range(2))


def test_synthetic_train_and_validation_share_the_language():
    train = synthetic_tokens(64, 16, 50, seed=3)
    val = synthetic_tokens(64, 16, 50, seed=3, split=1)
    assert not np.array_equal(train, val)
    successor = {}
    for a, b in zip(train[:, :-1].ravel(), train[:, 1:].ravel()):
        successor.setdefault(int(a), []).append(int(b))
    table = {a: max(set(bs), key=bs.count) for a, bs in successor.items()}
    hits = np.mean([table.get(int(a)) == int(b) for a, b in zip(val[:, :-1].ravel(), val[:, 1:].ravel())])
    assert hits > 0.8


def test_token_file_errors_name_the_problem(tmp_path):
    with pytest.raises(DataConfigError, match="does not exist"):
        load_token_file(str(tmp_path / "none.npy"), 8, 100)
    np.save(tmp_path / "short.npy", np.zeros((4, 5), dtype=np.int64))
    with pytest.raises(DataConfigError, match="rows of 5 tokens, expected data.seq_length \\+ 1 = 9"):
        load_token_file(str(tmp_path / "short.npy"), 8, 100)
    np.save(tmp_path / "big.npy", np.full((4, 9), 100, dtype=np.int64))
    with pytest.raises(DataConfigError, match="outside \\[0, 100\\)"):
        load_token_file(str(tmp_path / "big.npy"), 8, 100)
    np.save(tmp_path / "float.npy", np.zeros((4, 9), dtype=np.float32))
    with pytest.raises(DataConfigError, match="integer array"):
        load_token_file(str(tmp_path / "float.npy"), 8, 100)
