"""Device-side normalisation of uint8 crops, called by methods on the training device."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (sum(IMAGENET_MEAN) / 3,)  # one channel: the channel average of the ImageNet stats
GRAY_STD = (sum(IMAGENET_STD) / 3,)


def normalize_crops(
    crops_uint8: torch.Tensor,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 [N,C,H,W] -> normalised float on the same device (ImageNet stats by channel count)."""
    channels = crops_uint8.shape[1]
    if mean is None or std is None:
        mean, std = (GRAY_MEAN, GRAY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"normalize_crops: {channels} channels but {len(mean)} mean values")
    shape = (1, channels, 1, 1)
    scale = torch.tensor([255.0 * s for s in std], device=crops_uint8.device).view(shape)
    shift = torch.tensor([255.0 * m for m in mean], device=crops_uint8.device).view(shape)
    return ((crops_uint8.float() - shift) / scale).to(dtype)
