"""Region geometry against brute force: byte runs in row-major order, and exact overlap tests."""

import random

import numpy as np

from bridges.checkpoint.regions import bounding_box, byte_runs, regions_overlap


def _random_region(rng, shape):
    region = []
    for n in shape:
        start = rng.randint(0, n - 1)
        region.append(slice(start, rng.randint(start + 1, n), rng.randint(1, 3)))
    return tuple(region)


def _elements(shape, region):
    return np.arange(int(np.prod(shape))).reshape(shape)[region].reshape(-1)


def test_byte_runs_match_row_major_order_and_are_maximal():
    rng = random.Random(0)
    for _ in range(1500):
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 4)))
        region = _random_region(rng, shape)
        starts, lengths = byte_runs(shape, region, 2)
        covered = np.concatenate([np.arange(s, s + n, 2) // 2 for s, n in zip(starts, lengths)])
        assert np.array_equal(covered, _elements(shape, region)), (shape, region)
        assert not np.any(starts[1:] == starts[:-1] + lengths[:-1]), "adjacent runs were not merged"


def test_whole_tensor_and_leading_rows_are_one_run():
    def runs(shape, region, itemsize):
        return [a.tolist() for a in byte_runs(shape, region, itemsize)]

    assert runs((4, 3, 5), (slice(0, 4, 1), slice(0, 3, 1), slice(0, 5, 1)), 4) == [[0], [240]]
    assert runs((4, 3, 5), (slice(2, 3, 1), slice(1, 3, 1), slice(0, 5, 1)), 4) == [[140], [40]]
    assert runs((), (), 2) == [[0], [2]]
    assert len(byte_runs((4, 6), (slice(0, 4, 1), slice(0, 3, 1)), 1)[0]) == 4  # column block: one run a row


def test_overlap_is_exact_with_steps():
    rng = random.Random(1)
    for _ in range(1500):
        shape = tuple(rng.randint(1, 7) for _ in range(rng.randint(1, 3)))
        a, b = _random_region(rng, shape), _random_region(rng, shape)
        mask_a, mask_b = np.zeros(shape, bool), np.zeros(shape, bool)
        mask_a[a], mask_b[b] = True, True
        assert regions_overlap(a, b) == bool((mask_a & mask_b).any()), (a, b)


def test_bounding_box_of_strided_regions():
    box = bounding_box([(slice(0, 6, 2), slice(1, 8, 3)), (slice(3, 4, 1), slice(0, 2, 1))])
    assert box == (slice(0, 5, 1), slice(0, 8, 1))
