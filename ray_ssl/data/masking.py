"""Patch masks for masked image modelling (iBOT/Franca): block, inverse-block and CyclicMask.

Masks are boolean [grid, grid] arrays, True = masked patch. Block masks follow BEiT's blockwise
generator (arXiv 2106.08254, Alg. 1, as used by DINOv2): rectangles of random area and aspect
ratio added until the target count is reached. Inverse-block masks keep blocks visible and mask the
rest (data2vec 2.0, arXiv 2212.07525); because blocks must fit inside the grid their visible area
is biased towards the centre. CyclicMask (Franca, arXiv 2507.14137 sec. 3) rolls the inverse-block
mask by uniform random offsets along both patch axes, so every position is masked equally often.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

MaskKind = Literal["none", "block", "inverse_block", "cyclic"]

MIN_BLOCK_PATCHES = 4  # BEiT / DINOv2 MaskingGenerator min_num_patches
MAX_BLOCK_FRACTION = 0.5  # DINOv2: max_num_patches = 0.5 * patches per image
MIN_ASPECT = 0.3  # BEiT: aspect ratio log-uniform in [0.3, 1/0.3]
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


def inverse_block_mask(grid: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``count`` masked patches: the complement of visible blocks."""
    return ~block_mask(grid, grid * grid - count, rng)


def cyclic_mask(grid: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Inverse-block mask rolled by uniform random offsets along both axes (Franca sec. 3)."""
    shift = (int(rng.integers(0, grid)), int(rng.integers(0, grid)))
    return np.roll(inverse_block_mask(grid, count, rng), shift, axis=(0, 1))


def masked_count_range(num_patches: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """Smallest and largest whole patch counts whose fraction lies in ``ratio``."""
    low = math.ceil(ratio[0] * num_patches - 1e-9)
    high = math.floor(ratio[1] * num_patches + 1e-9)
    if low > high:
        raise ValueError(f"no whole number of {num_patches} patches has a ratio in {ratio}")
    return low, high


class MaskGenerator:
    """Draws one mask per global crop: with probability ``sample_p`` a mask of the given kind
    with ratio uniform in ``ratio``, else all False (the crop is not masked)."""

    _MAKERS = {"block": block_mask, "inverse_block": inverse_block_mask, "cyclic": cyclic_mask}

    def __init__(self, kind: MaskKind, grid: int, ratio: tuple[float, float], sample_p: float):
        if kind not in (*self._MAKERS, "none"):
            raise ValueError(f"unknown mask kind '{kind}'")
        self.kind, self.grid, self.ratio, self.sample_p = kind, grid, ratio, sample_p
        self.num_patches = grid * grid
        self.count_range = masked_count_range(self.num_patches, ratio)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """A flat bool [grid*grid] mask."""
        if self.kind == "none" or rng.random() >= self.sample_p:
            return np.zeros(self.num_patches, dtype=bool)
        target = int(round(rng.uniform(*self.ratio) * self.num_patches))
        count = min(max(target, self.count_range[0]), self.count_range[1])
        return self._MAKERS[self.kind](self.grid, count, rng).reshape(-1)
