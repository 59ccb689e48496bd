"""Patch masks: exact counts, CyclicMask as published (ONE visible rectangle cut row-major to the
count, rolled with wrap-around; Franca arXiv 2507.14137 sec. 3 and valeoai/Franca's masking.py),
its uniform positional coverage against the centre-biased unrolled masks, and the batch-level
draw of Franca/DINOv2's collate, also through the real Ray Data stream."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ray_ssl.config import DataConfig, ShardsConfig, StorageConfig, ViewConfig
from ray_ssl.data.masking import (
    MaskGenerator,
    block_mask,
    cyclic_mask,
    inverse_block_mask,
    masked_crop_ratios,
    rectangle_sides,
)

GRID = 16  # 224 / 14
RATIO = (0.1, 0.65)
LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


def _cut_rectangle_at(visible: np.ndarray, dy: int, dx: int) -> bool:
    """Whether ``visible`` rolled back by (dy, dx) is the row-major prefix of a rectangle at the
    top-left corner: full rows of some width w, then one partial row, nothing else."""
    v = np.roll(visible, (-dy, -dx), axis=(0, 1))
    if not v[0, 0]:
        return False
    width = int(np.argmin(v[0])) if not v[0].all() else v.shape[1]
    cells = np.arange(int(v.sum()))
    if (len(cells) - 1) // width >= v.shape[0]:
        return False
    expected = np.zeros_like(v)
    expected[cells // width, cells % width] = True
    return bool((expected == v).all())


def is_rolled_cut_rectangle(visible: np.ndarray) -> bool:
    """Some wrap-around shift turns ``visible`` into one cut rectangle at the corner."""
    h, w = visible.shape
    return any(_cut_rectangle_at(visible, dy, dx) for dy in range(h) for dx in range(w))


def test_the_rectangle_checker_refuses_two_pieces_and_a_hole():
    two = np.zeros((8, 8), bool)
    two[0:2, 0:2] = two[5:7, 4:6] = True
    holed = np.zeros((8, 8), bool)
    holed[1:4, 1:4] = True
    holed[2, 2] = False
    wrapped = np.roll(np.pad(np.ones((3, 5), bool), ((0, 5), (0, 3))), (6, 6), axis=(0, 1))
    assert not is_rolled_cut_rectangle(two) and not is_rolled_cut_rectangle(holed)
    assert is_rolled_cut_rectangle(wrapped)


@pytest.mark.parametrize("grid", [4, 7, 16])
def test_cyclic_visible_area_is_one_rolled_rectangle_in_every_draw(grid):
    rng = np.random.default_rng(0)
    for count in list(range(0, grid * grid)) * max(1, 400 // grid**2):
        mask = cyclic_mask(grid, count, rng)
        assert int(mask.sum()) == count
        assert is_rolled_cut_rectangle(~mask), (grid, count, (~mask).astype(int))


def test_cyclic_rectangles_wrap_around_the_border():
    rng = np.random.default_rng(1)
    crossing = 0
    for _ in range(200):
        visible = ~cyclic_mask(GRID, 200, rng)  # 56 visible patches
        crossing += bool(visible[0].any() and visible[-1].any())
        crossing += bool(visible[:, 0].any() and visible[:, -1].any())
    assert crossing > 0


def test_rectangle_aspect_is_log_uniform_in_range_and_fits():
    rng = np.random.default_rng(2)
    small = np.array([rectangle_sides(GRID, 60, rng) for _ in range(500)])
    assert (small <= GRID).all() and (small.prod(axis=1) >= 60).all()
    # On a large grid the range is not narrowed and the ceil of sides of ~20 patches moves
    # log(h/w) by at most ~0.1: quarters of the log range each hold 1/4 (4000 draws: se 0.007).
    big = np.array([rectangle_sides(64, 400, rng) for _ in range(4000)])
    log_ratio = np.log(big[:, 0] / big[:, 1])
    assert LOG_ASPECT[0] - 0.1 <= log_ratio.min() and log_ratio.max() <= LOG_ASPECT[1] + 0.1
    quarters = np.histogram(log_ratio, bins=4, range=LOG_ASPECT)[0] / len(log_ratio)
    assert np.allclose(quarters, 0.25, atol=0.03), quarters


def test_rectangle_of_the_whole_grid_and_too_large_areas():
    assert rectangle_sides(GRID, GRID * GRID, np.random.default_rng(0)) == (GRID, GRID)
    with pytest.raises(ValueError, match="does not fit"):
        rectangle_sides(GRID, GRID * GRID + 1, np.random.default_rng(0))


# Equal frequency. For a cyclic mask with c masked patches every position is masked with
# probability exactly c/Np (uniform roll), so over D draws with counts c_d the position's count
# is a sum of Bernoulli(c_d/Np) whose standard error is sqrt(sum p(1-p)); we allow 4.5 of them
# (a chance of ~2e-3 that one of 256 positions exceeds it under exact uniformity; the unrolled
# masks miss by 30-60 standard errors).
DRAWS = 2000
TOLERANCE_SE = 4.5


def _position_z_scores(maker, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = rng.integers(int(RATIO[0] * GRID**2), int(RATIO[1] * GRID**2) + 1, size=DRAWS)
    hits = np.zeros((GRID, GRID))
    for c in counts:
        hits += maker(GRID, int(c), rng)
    p = counts / GRID**2
    return (hits - p.sum()) / math.sqrt(float((p * (1 - p)).sum()))


def test_cyclic_mask_masks_every_position_equally_often():
    z = _position_z_scores(cyclic_mask, seed=3)
    assert np.abs(z).max() < TOLERANCE_SE, np.abs(z).max()


@pytest.mark.parametrize("maker", [inverse_block_mask, block_mask])
def test_unrolled_block_masks_fail_the_same_test(maker):
    z = _position_z_scores(maker, seed=4)
    assert np.abs(z).max() > 3 * TOLERANCE_SE


def test_inverse_block_is_the_unrolled_rectangle():
    rng = np.random.default_rng(5)
    for count in range(0, GRID * GRID, 5):
        visible = ~inverse_block_mask(GRID, count, rng)
        assert int(visible.sum()) == GRID * GRID - count
        rows, cols = np.nonzero(visible)
        assert _cut_rectangle_at(visible, rows.min(), cols.min())  # inside the grid, no wrap


@pytest.mark.parametrize("maker", [block_mask, inverse_block_mask, cyclic_mask])
@pytest.mark.parametrize("grid", [7, 16])
def test_masks_have_exactly_the_requested_count(maker, grid):
    rng = np.random.default_rng(6)
    for count in range(1, grid * grid, 7):
        mask = maker(grid, count, rng)
        assert mask.shape == (grid, grid) and mask.dtype == bool
        assert int(mask.sum()) == count


def test_masked_crop_ratios_spread_evenly_as_franca_collate():
    intervals = masked_crop_ratios(crops=20, ratio=RATIO, sample_p=0.5)
    assert len(intervals) == 10
    assert intervals[0][0] == pytest.approx(0.1) and intervals[-1][1] == pytest.approx(0.65)
    widths = [hi - lo for lo, hi in intervals]
    assert np.allclose(widths, 0.055)
    assert all(
        a[1] == pytest.approx(b[0]) for a, b in zip(intervals[:-1], intervals[1:], strict=True)
    )
    assert masked_crop_ratios(crops=3, ratio=RATIO, sample_p=0.5) == [pytest.approx((0.1, 0.65))]


@pytest.mark.parametrize("crops, sample_p", [(64, 0.5), (2, 0.5), (7, 0.3), (12, 1.0), (5, 0.0)])
def test_generator_masks_exactly_int_crops_times_p_with_ratios_in_their_intervals(crops, sample_p):
    generator = MaskGenerator("cyclic", GRID, RATIO, sample_p)
    rng = np.random.default_rng(7)
    for _ in range(20):
        masks = generator(crops, rng)
        assert masks.shape == (crops, GRID * GRID) and masks.dtype == bool
        masked = masks.any(axis=1)
        assert int(masked.sum()) == int(crops * sample_p)
        ratios = np.sort(masks[masked].mean(axis=1))
        for ratio, (low, high) in zip(
            ratios, masked_crop_ratios(crops, RATIO, sample_p), strict=True
        ):
            assert math.floor(low * GRID**2) / GRID**2 <= ratio <= high  # int() floors
        for row in masks[masked]:
            assert is_rolled_cut_rectangle(~row.reshape(GRID, GRID))


def test_generator_shuffles_which_crops_are_masked():
    generator = MaskGenerator("cyclic", GRID, RATIO, 0.5)
    rng = np.random.default_rng(8)
    masked = np.stack([generator(8, rng).any(axis=1) for _ in range(400)])
    assert np.allclose(masked.mean(axis=0), 0.5, atol=0.1)  # each crop ~Bernoulli(0.5), se 0.025


def test_batch_masks_follow_the_samples_seeds():
    generator = MaskGenerator("cyclic", GRID, RATIO, 0.5)
    seeds = np.array([11, 22, 33, 44])
    first = generator.for_batch(8, seeds)
    assert np.array_equal(first, generator.for_batch(8, seeds.copy()))
    assert not np.array_equal(first, generator.for_batch(8, seeds[::-1]))


def test_stream_batches_mask_exactly_int_crops_times_p_and_are_reproducible(ray_local, tmp_path):
    from ray_ssl.data.shards import write_shard_set
    from ray_ssl.data.stream import WorkerBatchIterator, build_train_dataset

    storage = StorageConfig()
    uri = str(tmp_path / "digits")
    write_shard_set(ShardsConfig(source="digits", split="test", samples_per_shard=60), uri, storage)
    views = ViewConfig(kind="multicrop", channels=1, global_crops=2, global_size=16,
                       local_crops=1, local_size=8, patch_size=4, mask="cyclic",
                       mask_sample_p=0.5)  # fmt: skip
    batch_size = 24

    def masks_of_epoch() -> list[torch.Tensor]:
        dataset = build_train_dataset(DataConfig(uri=uri, shuffle_seed=3), views, storage)
        dataset.context.execution_options.preserve_order = True
        cpu = torch.device("cpu")
        return [
            b["masks"] for b in WorkerBatchIterator(dataset.iterator(), batch_size, views, cpu, 0.0)
        ]

    first = masks_of_epoch()
    assert len(first) == 359 // batch_size
    for masks in first:
        assert masks.shape == (2 * batch_size, 16) and masks.dtype == torch.bool
        assert int(masks.any(dim=1).sum()) == int(2 * batch_size * 0.5)
        for row in masks[masks.any(dim=1)]:
            assert is_rolled_cut_rectangle(~row.view(4, 4).numpy())
    again = masks_of_epoch()
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
