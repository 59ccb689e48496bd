"""Per-crop image augmentations on PIL images (uint8, mode "L" or "RGB").

The DINO/DINOv2/Franca recipe: RandomResizedCrop (bicubic) -> horizontal flip -> colour jitter
(p=0.8, brightness/contrast/saturation/hue in random order, as torchvision's ColorJitter) ->
grayscale (p=0.2) -> Gaussian blur (sigma ~ U(0.1, 2), DINO's PIL blur) -> solarize (threshold 128).
PIL was measured faster than torchvision.transforms.v2 on uint8 tensors for this recipe
(benchmarks/data_throughput.py prints both). Single-channel images get brightness/contrast only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop default aspect ratios
CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop tries before the centre-crop fallback
BLUR_SIGMA = (0.1, 2.0)  # DINO GaussianBlur radius_min / radius_max
SOLARIZE_THRESHOLD = 128  # DINO Solarization: PIL ImageOps.solarize default
HUE_SCALE = 255  # torchvision PIL adjust_hue: shift = int(hue_factor * 255) on the uint8 H band


@dataclass(frozen=True)
class CropRecipe:
    """Everything that varies between the crops of a multi-crop view set."""

    size: int
    scale: tuple[float, float]
    flip_p: float
    jitter_p: float
    jitter_strength: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    grayscale_p: float
    blur_p: float
    solarize_p: float


def resized_crop_box(
    width: int, height: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a RandomResizedCrop region (torchvision's algorithm)."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height  # fallback: the largest centre crop with a ratio in range
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _blend_with(image: Image.Image, level: float, factor: float) -> Image.Image:
    """``level + factor * (x - level)`` clipped to uint8: PIL's blend with a flat image."""
    flat = Image.new(image.mode, image.size, (int(round(level)),) * len(image.getbands()))
    return Image.blend(flat, image, factor)


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
    return _blend_with(image, 0.0, factor)


def adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
    gray = image if image.mode == "L" else image.convert("L")
    return _blend_with(image, float(np.asarray(gray).mean()), factor)  # torchvision: gray mean


def adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
    gray = image.convert("L").convert("RGB")
    return Image.blend(gray, image, factor)


def adjust_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate hue by ``shift`` turns in HSV, as torchvision's PIL adjust_hue."""
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] += np.uint8(int(shift * HUE_SCALE) % 256)  # uint8 addition wraps around
    return Image.fromarray(hsv, "HSV").convert("RGB")


def color_jitter(
    image: Image.Image, strength: tuple[float, float, float, float], rng: np.random.Generator
) -> Image.Image:
    """torchvision ColorJitter semantics: factors drawn per call, ops in random order."""
    brightness, contrast, saturation, hue = strength
    ops = [
        (adjust_brightness, rng.uniform(max(0.0, 1 - brightness), 1 + brightness)),
        (adjust_contrast, rng.uniform(max(0.0, 1 - contrast), 1 + contrast)),
    ]
    if image.mode == "RGB":  # saturation and hue have no meaning for one channel
        ops += [
            (adjust_saturation, rng.uniform(max(0.0, 1 - saturation), 1 + saturation)),
            (adjust_hue, rng.uniform(-hue, hue)),
        ]
    for position in rng.permutation(len(ops)):
        op, factor = ops[position]
        image = op(image, factor)
    return image


def solarize(image: Image.Image, threshold: int = SOLARIZE_THRESHOLD) -> Image.Image:
    table = [i if i < threshold else 255 - i for i in range(256)]
    return image.point(table * len(image.getbands()))


def augment_crop(image: Image.Image, recipe: CropRecipe, rng: np.random.Generator) -> np.ndarray:
    """One augmented crop as a uint8 HWC array."""
    box = resized_crop_box(image.width, image.height, recipe.scale, rng)
    crop = image.resize((recipe.size, recipe.size), Image.BICUBIC, box=box)
    if rng.random() < recipe.flip_p:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < recipe.jitter_p:
        crop = color_jitter(crop, recipe.jitter_strength, rng)
    if rng.random() < recipe.grayscale_p and crop.mode == "RGB":
        crop = crop.convert("L").convert("RGB")
    if rng.random() < recipe.blur_p:
        crop = crop.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*BLUR_SIGMA)))
    if rng.random() < recipe.solarize_p:
        crop = solarize(crop)
    array = np.asarray(crop)
    return array[:, :, None] if array.ndim == 2 else array
