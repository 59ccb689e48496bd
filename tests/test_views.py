"""Views: shapes/dtypes per kind, colour ops against torchvision's PIL functional (the reference
DINO used), crop geometry, DINO/Franca per-crop probabilities, device-side normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from ray_ssl.config import ViewConfig
from ray_ssl.data.augment import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    resized_crop_box,
    solarize,
)
from ray_ssl.data.views import (
    CorruptImageError,
    ViewBuilder,
    crop_counts,
    crop_recipes,
    decode_image,
)
from ray_ssl.models.vit import normalize_images

SMALL = dict(global_size=28, local_size=16, patch_size=4, global_scale=(0.4, 1.0))


def _image(mode: str, size=(40, 30), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize(
    "kind, channels, mask, expect_global, expect_local",
    [
        ("multicrop", 3, "cyclic", 2, 3),
        ("multicrop", 1, "block", 2, 3),
        ("pair", 3, "none", 2, 0),
        ("single", 1, "inverse_block", 1, 0),
    ],
)
def test_view_shapes_and_dtypes(kind, channels, mask, expect_global, expect_local):
    views = ViewConfig(kind=kind, channels=channels, mask=mask, local_crops=3, **SMALL)
    out = ViewBuilder(views)(_image("RGB"), np.random.default_rng(0))
    assert crop_counts(views) == (expect_global, expect_local)
    assert out["global_crops"].shape == (expect_global, 28, 28, channels)
    assert out["global_crops"].dtype == np.uint8
    if expect_local:
        assert out["local_crops"].shape == (expect_local, 16, 16, channels)
        assert out["local_crops"].dtype == np.uint8
    else:
        assert "local_crops" not in out
    if mask == "none":
        assert "mask_seed" not in out
    else:  # masks are drawn per batch from the samples' seeds (tests/test_masking.py)
        assert out["mask_seed"].shape == () and out["mask_seed"].dtype == np.int64
    empty = ViewBuilder(views).empty()
    assert {k: (v.shape, v.dtype) for k, v in empty.items()} == {
        k: (v.shape, v.dtype) for k, v in out.items()
    }


def test_dino_crop_probabilities():
    globals_, locals_ = crop_recipes(ViewConfig(local_crops=8))
    assert [r.blur_p for r in globals_] == [1.0, 0.1]
    assert [r.solarize_p for r in globals_] == [0.0, 0.2]
    assert {(r.blur_p, r.solarize_p, r.size, r.scale) for r in locals_} == {
        (0.5, 0.0, 98, (0.05, 0.32))
    }
    assert len(locals_) == 8 and globals_[0].size == 224 and globals_[0].scale == (0.32, 1.0)


BOTH_MODES = [
    (adjust_brightness, TF.adjust_brightness, 1.35),
    (adjust_brightness, TF.adjust_brightness, 0.6),
    (adjust_contrast, TF.adjust_contrast, 0.7),
    (adjust_contrast, TF.adjust_contrast, 1.4),
]
RGB_ONLY = [  # saturation and hue are not applied to one-channel images
    (adjust_saturation, TF.adjust_saturation, 1.2),
    (adjust_hue, TF.adjust_hue, -0.08),
    (adjust_hue, TF.adjust_hue, 0.1),
]


@pytest.mark.parametrize(
    "mode, ours, reference, factor",
    [("RGB", *op) for op in BOTH_MODES + RGB_ONLY] + [("L", *op) for op in BOTH_MODES],
)
def test_colour_ops_match_torchvision(mode, ours, reference, factor):
    image = _image(mode)
    got = np.asarray(ours(image, factor)).astype(int)
    want = np.asarray(reference(image, factor)).astype(int)
    assert np.abs(got - want).max() <= 1  # rounding of the blend


def test_solarize_matches_torchvision():
    image = _image("RGB")
    np.testing.assert_array_equal(np.asarray(solarize(image)), np.asarray(TF.solarize(image, 128)))


def test_one_channel_jitter_uses_only_brightness_and_contrast():
    strength = (0.0, 0.0, 0.9, 0.5)  # brightness/contrast factors are exactly 1
    gray, rgb = _image("L"), _image("RGB")
    out = color_jitter(gray, strength, np.random.default_rng(1))
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(gray))
    assert not np.array_equal(
        np.asarray(color_jitter(rgb, strength, np.random.default_rng(1))), np.asarray(rgb)
    )


def test_resized_crop_box_respects_scale_and_bounds():
    rng = np.random.default_rng(5)
    for _ in range(500):
        left, top, right, bottom = resized_crop_box(300, 200, (0.05, 0.32), rng)
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        area = (right - left) * (bottom - top) / (300 * 200)
        assert 0.04 <= area <= 0.34  # rounding of w and h


def test_decode_rejects_bad_bytes_and_converts_channels():
    buffer = io.BytesIO()
    _image("RGB").save(buffer, "PNG")
    assert decode_image(buffer.getvalue(), 1).mode == "L"
    assert decode_image(buffer.getvalue(), 3).mode == "RGB"
    with pytest.raises(CorruptImageError):
        decode_image(b"not an image", 3)
    with pytest.raises(CorruptImageError):
        decode_image(buffer.getvalue()[:60], 3)  # truncated PNG


@pytest.mark.parametrize("channels", [1, 3])
def test_normalize_images_matches_torchvision_normalize(channels):
    crops = torch.randint(0, 256, (4, channels, 8, 8), dtype=torch.uint8)
    out = normalize_images(crops)
    mean = (0.485, 0.456, 0.406) if channels == 3 else (0.449,)
    std = (0.229, 0.224, 0.225) if channels == 3 else (0.226,)
    want = TF.normalize(crops.float() / 255.0, mean, std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=1e-3, rtol=1e-4)
