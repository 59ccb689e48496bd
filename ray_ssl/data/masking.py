"""Patch masks for masked image modelling (iBOT/Franca): block, inverse-block and CyclicMask.

Masks are boolean [grid, grid] arrays, True = masked patch.

- ``block``: BEiT's blockwise generator (arXiv 2106.08254, Alg. 1; DINOv2's MaskingGenerator):
  rectangles of random area and aspect ratio added until the target count is reached.
- ``inverse_block``: Franca's InverseBlockMasking without the roll (valeoai/Franca
  ``franca/data/masking.py``): ONE visible rectangle whose area is the visible patch count, aspect
  ratio log-uniform in [0.3, 1/0.3] (narrowed so that it fits), cut row-major to the exact count
  and placed uniformly inside the grid; everything else is masked. Because the rectangle must fit,
  its visible area is biased towards the centre.
- ``cyclic``: CyclicMask (Franca, arXiv 2507.14137 sec. 3): the same rectangle rolled with
  wrap-around by a uniform random offset on both axes, so every position is masked equally often.

A batch's masks are drawn together, as Franca/DINOv2's ``collate_data_and_cast``: exactly
``int(crops * sample_p)`` of the batch's global crops are masked, with ratios spread evenly over
``ratio`` (crop i of n draws from the i-th of n equal sub-intervals), in random crop order.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

MaskKind = Literal["none", "block", "inverse_block", "cyclic"]

MIN_BLOCK_PATCHES = 4  # BEiT / DINOv2 MaskingGenerator min_num_patches
MAX_BLOCK_FRACTION = 0.5  # DINOv2: max_num_patches = 0.5 * patches per image
MIN_ASPECT = 0.3  # BEiT / Franca: aspect ratio log-uniform in [0.3, 1/0.3]
BLOCK_ATTEMPTS = 10  # BEiT: tries per block before giving up on that block


def _add_block(mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
    """Set one random rectangle of at most ``budget`` new patches; returns patches added."""
    grid_h, grid_w = mask.shape
    max_area = min(budget, max(MIN_BLOCK_PATCHES, int(MAX_BLOCK_FRACTION * mask.size)))
    log_aspect = (math.log(MIN_ASPECT), math.log(1.0 / MIN_ASPECT))
    for _ in range(BLOCK_ATTEMPTS):
        area = rng.uniform(min(MIN_BLOCK_PATCHES, max_area), max_area)  # BEiT: U(min, remaining)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (0 < h < grid_h and 0 < w < grid_w):
            continue
        top = int(rng.integers(0, grid_h - h + 1))
        left = int(rng.integers(0, grid_w - w + 1))
        new = h * w - int(mask[top : top + h, left : left + w].sum())
        if 0 < new <= budget:
            mask[top : top + h, left : left + w] = True
            return new
    return 0


def block_mask(grid: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``count`` True patches, placed as BEiT blocks (topped up at random if blocks
    cannot reach the count, which happens only for near-full masks on small grids)."""
    mask = np.zeros((grid, grid), dtype=bool)
    total = 0
    while total < count:
        added = _add_block(mask, count - total, rng)
        if added == 0:
            break
        total += added
    if total < count:
        free = np.flatnonzero(~mask)
        mask.flat[rng.choice(free, size=count - total, replace=False)] = True
    return mask


def rectangle_sides(grid: int, area: int, rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) ceil(sqrt(area * a)) x ceil(sqrt(area / a)) of a rectangle covering
    ``area`` patches, the aspect ratio a log-uniform in [0.3, 1/0.3] narrowed so that both sides
    fit the grid (Franca's BlockMasking)."""
    if not 0 < area <= grid * grid:
        raise ValueError(f"a rectangle of {area} patches does not fit a {grid}x{grid} grid")
    low = max(math.log(MIN_ASPECT), math.log(area / grid**2))  # width <= grid
    high = min(math.log(1.0 / MIN_ASPECT), math.log(grid**2 / area))  # height <= grid
    aspect = math.exp(rng.uniform(min(low, high), high))
    return (
        min(grid, math.ceil(math.sqrt(area * aspect))),
        min(grid, math.ceil(math.sqrt(area / aspect))),
    )


def cut_rectangle(grid: int, area: int, width: int) -> np.ndarray:
    """The first ``area`` cells, row-major, of a ``width``-wide rectangle at the grid's top-left
    corner (Franca truncates its rectangle this way to hit the count exactly)."""
    cells = np.arange(area)
    mask = np.zeros((grid, grid), dtype=bool)
    mask[cells // width, cells % width] = True
    return mask


def inverse_block_mask(grid: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``count`` masked patches around ONE visible cut rectangle placed uniformly
    inside the grid (Franca's InverseBlockMasking with ``roll=False``)."""
    if count >= grid * grid:
        return np.ones((grid, grid), dtype=bool)
    area = grid * grid - count
    h, w = rectangle_sides(grid, area, rng)
    top, left = int(rng.integers(0, grid - h + 1)), int(rng.integers(0, grid - w + 1))
    return ~np.roll(cut_rectangle(grid, area, w), (top, left), axis=(0, 1))  # fits: no wrap


def cyclic_mask(grid: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``count`` masked patches around ONE visible cut rectangle rolled with wrap-around
    by a uniform offset on both axes (Franca's CyclicMask, arXiv 2507.14137 sec. 3; placing it
    inside the grid first, as the released code does, changes nothing after a uniform roll)."""
    if count >= grid * grid:
        return np.ones((grid, grid), dtype=bool)
    area = grid * grid - count
    _, w = rectangle_sides(grid, area, rng)
    shift = (int(rng.integers(0, grid)), int(rng.integers(0, grid)))
    return ~np.roll(cut_rectangle(grid, area, w), shift, axis=(0, 1))


def masked_crop_ratios(
    crops: int, ratio: tuple[float, float], sample_p: float
) -> list[tuple[float, float]]:
    """The (low, high) ratio interval of each masked crop of a batch of ``crops`` global crops:
    ``int(crops * sample_p)`` equal sub-intervals of ``ratio`` (Franca/DINOv2 collate)."""
    masked = int(crops * sample_p)
    edges = np.linspace(ratio[0], ratio[1], masked + 1)
    return [(float(edges[i]), float(edges[i + 1])) for i in range(masked)]


class MaskGenerator:
    """Draws the masks of one batch's global crops (Franca/DINOv2 ``collate_data_and_cast``)."""

    _MAKERS = {"block": block_mask, "inverse_block": inverse_block_mask, "cyclic": cyclic_mask}

    def __init__(self, kind: MaskKind, grid: int, ratio: tuple[float, float], sample_p: float):
        if kind not in (*self._MAKERS, "none"):
            raise ValueError(f"unknown mask kind '{kind}'")
        if not 0.0 <= ratio[0] <= ratio[1] < 1.0:
            raise ValueError(f"mask ratio {ratio} must satisfy 0 <= low <= high < 1")
        self.kind, self.grid, self.ratio, self.sample_p = kind, grid, ratio, sample_p
        self.num_patches = grid * grid

    def __call__(self, crops: int, rng: np.random.Generator) -> np.ndarray:
        """bool [crops, grid*grid]: exactly ``int(crops * sample_p)`` rows masked, in random order.

        A masked crop gets ``int(Np * U(low_i, high_i))`` patches, at least one so that a crop
        chosen for masking is masked (Franca's ``int`` gives 0 on grids under 10 patches).
        """
        masks = np.zeros((crops, self.num_patches), dtype=bool)
        if self.kind == "none":
            return masks
        maker = self._MAKERS[self.kind]
        for row, (low, high) in enumerate(masked_crop_ratios(crops, self.ratio, self.sample_p)):
            count = max(1, int(self.num_patches * rng.uniform(low, high)))
            masks[row] = maker(self.grid, count, rng).reshape(-1)
        return masks[rng.permutation(crops)]

    def for_batch(self, crops: int, mask_seeds: np.ndarray) -> np.ndarray:
        """The masks of a batch of ``crops`` global crops whose samples carry ``mask_seeds``
        (one per sample): the same samples give the same masks (resume, reruns)."""
        return self(crops, np.random.default_rng(np.asarray(mask_seeds, np.int64).tolist()))
