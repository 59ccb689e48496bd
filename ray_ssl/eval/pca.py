"""PCA pictures of patch features, Franca's recipe (valeoai/Franca ``eval/visualize_PCA.py``).

Per image: a PCA of its patch tokens; the first component, min-max scaled, separates foreground
from background (above ``BACKGROUND_THRESHOLD`` is background). Franca hard-codes the sign of that
component; here the sign is chosen so that the image border is background (its patches score
higher on average than the interior's). A second PCA on the foreground patches alone gives three
components, each min-max scaled to one of R, G, B; the background is black. The pictures are laid
out as a grid of (image, PCA map) pairs in one PNG.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

BACKGROUND_THRESHOLD = 0.35  # Franca visualize_PCA.py: scaled first component > 0.35
RGB_COMPONENTS = 3
PAIRS_PER_ROW = 4  # (image, PCA map) pairs in one row of the grid
MIN_CELL = 112  # pixels per side of one picture in the grid (small images are enlarged)


def principal_projections(x: np.ndarray, components: int) -> np.ndarray:
    """Projections [n, components] of the rows of ``x`` on its top principal components."""
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projections = centred @ vt[:components].T
    if projections.shape[1] < components:  # fewer rows or dims than components
        pad = np.zeros((len(x), components - projections.shape[1]), projections.dtype)
        projections = np.concatenate((projections, pad), axis=1)
    return projections


def _min_max(values: np.ndarray) -> np.ndarray:
    span = values.max(axis=0) - values.min(axis=0)
    return (values - values.min(axis=0)) / np.where(span > 0, span, 1.0)


def border_mask(grid: int) -> np.ndarray:
    """bool [grid * grid], row-major: True on the outermost ring of patches."""
    ring = np.ones((grid, grid), dtype=bool)
    ring[1:-1, 1:-1] = False
    return ring.reshape(-1)


def foreground_mask(patches: np.ndarray, grid: int) -> np.ndarray:
    """bool [grid * grid]: the patches whose first principal component, signed so that the
    border scores high and min-max scaled, is at most ``BACKGROUND_THRESHOLD``."""
    first = principal_projections(patches.astype(np.float64), 1)[:, 0]
    border = border_mask(grid)
    if grid > 2 and first[border].mean() < first[~border].mean():
        first = -first
    return _min_max(first) <= BACKGROUND_THRESHOLD


def pca_rgb(patches: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB in [0, 1] [grid, grid, 3] with a black background, foreground bool [grid, grid]) of
    one image's patch tokens [grid * grid, D]. With fewer foreground patches than components the
    first PCA's three components are shown for every patch."""
    if patches.shape[0] != grid * grid:
        raise ValueError(f"{patches.shape[0]} patch tokens do not form a {grid}x{grid} grid")
    x = patches.astype(np.float64)
    foreground = foreground_mask(x, grid)
    rgb = np.zeros((grid * grid, RGB_COMPONENTS))
    if foreground.sum() > RGB_COMPONENTS:
        rgb[foreground] = _min_max(principal_projections(x[foreground], RGB_COMPONENTS))
    else:
        rgb = _min_max(principal_projections(x, RGB_COMPONENTS))
        foreground = np.ones_like(foreground)
    return rgb.reshape(grid, grid, RGB_COMPONENTS), foreground.reshape(grid, grid)


def pca_picture(rgb: np.ndarray, foreground: np.ndarray, side: int) -> Image.Image:
    """The PCA map enlarged to ``side`` pixels: colours bilinear, the background cut-out nearest
    (as Franca's script)."""
    colours = Image.fromarray((rgb * 255).round().astype(np.uint8)).resize(
        (side, side), Image.BILINEAR
    )
    keep = Image.fromarray(foreground.astype(np.uint8) * 255).resize((side, side), Image.NEAREST)
    black = Image.new("RGB", (side, side))
    return Image.composite(colours, black, keep)


def picture_grid(images: np.ndarray, maps: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """PNG bytes: (image, PCA map) pairs of uint8 images [N, H, W, C], ``PAIRS_PER_ROW`` pairs to
    a row, each picture a square cell of ``max(MIN_CELL, H)`` pixels."""
    if len(images) != len(maps) or not len(images):
        raise ValueError(f"{len(images)} images and {len(maps)} PCA maps; need as many, >= 1")
    cell = max(MIN_CELL, images.shape[1])
    columns = min(PAIRS_PER_ROW, len(images))
    rows = math.ceil(len(images) / columns)
    canvas = Image.new("RGB", (2 * cell * columns, cell * rows), "white")
    for i, (image, (rgb, foreground)) in enumerate(zip(images, maps, strict=True)):
        top, left = cell * (i // columns), 2 * cell * (i % columns)
        picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        canvas.paste(picture.convert("RGB").resize((cell, cell), Image.NEAREST), (left, top))
        canvas.paste(pca_picture(rgb, foreground, cell), (left + cell, top))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
