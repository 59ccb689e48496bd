"""Backbone features of a set of images, in batches, for kNN evaluation.

Works on any rank layout: the caller hands each rank its slice. Under DeepSpeed ZeRO-3 every rank
must make the same number of forward calls (each gathers parameters collectively), so the caller
gives every rank a slice of the same length (:func:`rank_slice` pads by repeating the last row).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

Preprocess = Callable[[torch.Tensor], torch.Tensor]  # uint8 [B,C,H,W] -> float [B,C,H,W]


def cls_features(output: object) -> torch.Tensor:
    """The CLS embedding [B, D] of a backbone output: a tensor or a (cls, patches) tuple."""
    if isinstance(output, torch.Tensor):
        return output if output.ndim == 2 else output[:, 0]
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot take CLS features from a backbone output of type {type(output)}")


def rank_slice(num_rows: int, rank: int, world_size: int) -> np.ndarray:
    """Row indices of ``rank``'s equal-length share of ``num_rows`` (the last row repeated)."""
    per_rank = math.ceil(num_rows / world_size)
    rows = np.arange(rank * per_rank, (rank + 1) * per_rank)
    return np.minimum(rows, num_rows - 1)


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: np.ndarray,
    batch_size: int,
    device: torch.device,
    preprocess: Preprocess,
) -> torch.Tensor:
    """CLS features (float32, CPU) [N, D] of uint8 images [N, H, W, C], in the backbone's dtype."""
    if len(images) == 0:
        raise ValueError("no images to extract features from")
    param = next(backbone.parameters())
    was_training = backbone.training
    backbone.eval()
    features = []
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        x = preprocess(chunk.to(device).permute(0, 3, 1, 2)).to(param.dtype)
        features.append(cls_features(backbone(x)).float().cpu())
    backbone.train(was_training)
    return torch.cat(features)
