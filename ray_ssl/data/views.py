"""Per-sample view builders driven by ``ViewConfig``: multi-crop, two-view pair, single view.

A sample's views leave the pipeline as uint8 HWC crops (4x smaller than float32); methods call
:func:`ray_ssl.models.vit.normalize_images` on the training device. No torch here: Ray Data
tasks that build views need not import it. Crop-specific probabilities follow DINO/Franca:
Gaussian blur p=blur_p[0] on global crop 1 and blur_p[1] on the others, solarize only on global
crop 2, local crops blur with local_blur_p and never solarize. ``pair`` is two global crops with
no locals (BYOL/VICReg-style asymmetric blur/solarize), ``single`` one global crop.

Semantic positives (Alkhalefi et al., arXiv 2510.08722): in a pair view the second crop is cut
from the sample's semantic partner (another image of its class) instead of the sample itself,
always (``positives=semantic``) or with probability ``semantic_p`` (``mixed``); each crop still
gets its own augmentation.

Masks are a batch-level draw (:class:`ray_ssl.data.masking.MaskGenerator`, made where the batch
is assembled); a sample only carries ``mask_seed``, drawn from its own generator, so that the
batch's masks are fixed by its samples' seeds.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from ray_ssl.config import ViewConfig
from ray_ssl.data.augment import CropRecipe, augment_crop
from ray_ssl.data.masking import MaskGenerator

SOLARIZED_GLOBAL_CROP = 1  # DINO: solarize only the second global crop
MASK_SEED_BITS = 63  # mask seeds stay non-negative int64 in Arrow
PARTNER_CROP = 1  # semantic positives: the second crop of a pair view shows the partner


class CorruptImageError(ValueError):
    """Image bytes that do not decode; the pipeline skips and counts the sample."""


def crop_counts(views: ViewConfig) -> tuple[int, int]:
    """(global crops, local crops) per sample for the view kind."""
    if views.kind == "pair":
        return 2, 0
    if views.kind == "single":
        return 1, 0
    return views.global_crops, views.local_crops


def num_patches(views: ViewConfig) -> int:
    return (views.global_size // views.patch_size) ** 2


def mask_generator(views: ViewConfig) -> MaskGenerator | None:
    """The batch-level mask generator of the global crops, or None when nothing is masked."""
    if views.mask == "none":
        return None
    grid = views.global_size // views.patch_size
    return MaskGenerator(views.mask, grid, views.mask_ratio, views.mask_sample_p)


def crop_recipes(views: ViewConfig) -> tuple[list[CropRecipe], list[CropRecipe]]:
    """The recipe of every global and local crop, in crop order."""
    n_global, n_local = crop_counts(views)
    common = dict(
        flip_p=views.flip_p,
        jitter_p=views.jitter_p,
        jitter_strength=views.jitter_strength,
        grayscale_p=views.grayscale_p,
    )
    global_recipes = [
        CropRecipe(
            size=views.global_size,
            scale=views.global_scale,
            blur_p=views.blur_p[min(g, 1)],
            solarize_p=views.solarize_p if g == SOLARIZED_GLOBAL_CROP else 0.0,
            **common,
        )
        for g in range(n_global)
    ]
    local_recipe = CropRecipe(
        size=views.local_size,
        scale=views.local_scale,
        blur_p=views.local_blur_p,
        solarize_p=0.0,
        **common,
    )
    return global_recipes, [local_recipe] * n_local


def decode_image(data: bytes, channels: int) -> Image.Image:
    """PNG/JPEG bytes -> PIL image in mode "L" (1 channel) or "RGB" (3 channels)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
        return image.convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as err:
        raise CorruptImageError(str(err)) from err


def uses_partner(views: ViewConfig, rng: np.random.Generator) -> bool:
    """Whether this sample's pair is semantic: always, never, or with p = ``semantic_p``."""
    if views.positives == "mixed":
        return bool(rng.random() < views.semantic_p)
    return views.positives == "semantic"


class ViewBuilder:
    """Builds one sample's crops (and the seed of its share of the batch's masks)."""

    def __init__(self, views: ViewConfig):
        self.views = views
        self.global_recipes, self.local_recipes = crop_recipes(views)
        self.masked = views.mask != "none"

    def __call__(
        self, image: Image.Image, rng: np.random.Generator, partner: Image.Image | None = None
    ) -> dict[str, np.ndarray]:
        """``global_crops`` [G,H,W,C], ``local_crops`` [L,h,w,C] if any, ``mask_seed`` if masked.

        With ``partner`` (a pair view with a semantic positive) the second global crop is cut
        from the partner image.
        """
        mode = "L" if self.views.channels == 1 else "RGB"
        image = image if image.mode == mode else image.convert(mode)
        sources = [image] * len(self.global_recipes)
        if partner is not None:
            if self.views.kind != "pair":
                raise ValueError(f"a semantic partner needs a pair view, not {self.views.kind}")
            sources[PARTNER_CROP] = partner if partner.mode == mode else partner.convert(mode)
        crops = [augment_crop(s, r, rng) for s, r in zip(sources, self.global_recipes, strict=True)]
        out = {"global_crops": np.stack(crops)}
        if self.local_recipes:
            out["local_crops"] = np.stack([augment_crop(image, r, rng) for r in self.local_recipes])
        if self.masked:
            out["mask_seed"] = np.asarray(rng.integers(0, 1 << MASK_SEED_BITS), np.int64)
        return out

    def empty(self) -> dict[str, np.ndarray]:
        """All-zero outputs with the shapes of a real sample (placeholders for corrupt rows)."""
        c, n_global = self.views.channels, len(self.global_recipes)
        g, loc = self.views.global_size, self.views.local_size
        out = {"global_crops": np.zeros((n_global, g, g, c), np.uint8)}
        if self.local_recipes:
            out["local_crops"] = np.zeros((len(self.local_recipes), loc, loc, c), np.uint8)
        if self.masked:
            out["mask_seed"] = np.asarray(0, np.int64)
        return out
