"""Patch masks: exact counts within the ratio range, block structure, and CyclicMask's uniform
positional coverage (Franca arXiv 2507.14137 sec. 3) against the centre-biased unrolled masks."""

from __future__ import annotations

import numpy as np
import pytest

from ray_ssl.data.masking import (
    MaskGenerator,
    block_mask,
    cyclic_mask,
    inverse_block_mask,
    masked_count_range,
)

GRID = 16  # 224 / 14
DRAWS = 1500
RATIO = (0.1, 0.65)
# Statistic: coefficient of variation (std / mean) over the grid of each position's masking
# frequency. Uniform coverage leaves only sampling noise, about sqrt((1-f)/(f*DRAWS)) ~ 0.03;
# the unrolled masks measure 0.4 to 0.6.
UNIFORM_CV_MAX = 0.08
BIASED_CV_MIN = 0.25


def _position_cv(maker, seed: int) -> float:
    rng = np.random.default_rng(seed)
    low, high = masked_count_range(GRID * GRID, RATIO)
    counts = np.zeros((GRID, GRID))
    for _ in range(DRAWS):
        counts += maker(GRID, int(rng.integers(low, high + 1)), rng)
    frequency = counts / DRAWS
    return float(frequency.std() / frequency.mean())


def test_cyclic_mask_covers_every_position_equally():
    assert _position_cv(cyclic_mask, seed=0) < UNIFORM_CV_MAX


@pytest.mark.parametrize("maker", [inverse_block_mask, block_mask])
def test_unrolled_block_masks_are_position_biased(maker):
    assert _position_cv(maker, seed=1) > BIASED_CV_MIN


@pytest.mark.parametrize("maker", [block_mask, inverse_block_mask, cyclic_mask])
@pytest.mark.parametrize("grid", [7, 16])
def test_masks_have_exactly_the_requested_count(maker, grid):
    rng = np.random.default_rng(2)
    for count in range(1, grid * grid, 7):
        mask = maker(grid, count, rng)
        assert mask.shape == (grid, grid) and mask.dtype == bool
        assert int(mask.sum()) == count


def _mean_visible_neighbours(visible: np.ndarray) -> float:
    padded = np.pad(visible, 1).astype(int)
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    return float(neighbours[visible].mean())


def test_inverse_block_keeps_contiguous_blocks_visible():
    rng = np.random.default_rng(3)
    clustered = np.mean(
        [_mean_visible_neighbours(~inverse_block_mask(GRID, 200, rng)) for _ in range(50)]
    )
    scattered = np.mean(
        [
            _mean_visible_neighbours(rng.permutation(GRID * GRID).reshape(GRID, GRID) < 56)
            for _ in range(50)
        ]
    )
    # blocks of >= 4 patches give every visible patch >= 2 visible neighbours; scattered ~0.9
    assert clustered > 2.0 > scattered


@pytest.mark.parametrize("kind", ["block", "inverse_block", "cyclic"])
def test_generator_ratio_in_range_and_sample_fraction(kind):
    rng = np.random.default_rng(4)
    generator = MaskGenerator(kind, GRID, RATIO, sample_p=0.5)
    masks = np.stack([generator(rng) for _ in range(600)])
    masked = masks.any(axis=1)
    ratios = masks[masked].mean(axis=1)
    assert RATIO[0] <= ratios.min() and ratios.max() <= RATIO[1]
    assert abs(masked.mean() - 0.5) < 0.07  # 600 Bernoulli(0.5): std 0.02
    assert not masks[~masked].any()


def test_ratio_range_without_whole_counts_is_rejected():
    with pytest.raises(ValueError, match="no whole number"):
        masked_count_range(4, (0.3, 0.4))
