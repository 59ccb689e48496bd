"""What SimCLR and VICReg share: backbone -> MLP head on two views, SimCLR/VICReg's optimizer
rules (no weight decay and no LARS adaptation for biases and norms), global BatchNorm.

Batch: ``global_crops`` uint8 [2B, C, H, W], crop-major (rows b and B + b are the two views of
sample b).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ray_ssl.config import Config
from ray_ssl.methods.base import Batch, Method
from ray_ssl.models.backbone import build_backbone, pooled_features
from ray_ssl.models.heads import BatchNormMLP
from ray_ssl.models.vit import normalize_images

VIEWS = 2


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class TwoViewMethod(Method):
    """A backbone and an MLP head whose outputs of a sample's two views form a positive pair."""

    def __init__(
        self, config: Config, name: str, head_dims: list[int], sync_batchnorm: bool
    ) -> None:
        super().__init__(config)  # checks the views (pair_views.pair_view_spec)
        settings = config.methods[name]
        self.encoder, width = build_backbone(
            settings.backbone, config.model, config.views.channels, f"{name}.backbone"
        )
        self.head = BatchNormMLP([width, *head_dims])
        self.distributed = world_size() > 1
        if sync_batchnorm and self.distributed:  # statistics over the global batch
            self.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder)
            self.head = nn.SyncBatchNorm.convert_sync_batchnorm(self.head)

    def backbone(self) -> nn.Module:
        return self.encoder

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        """Biases and norm weights (1-d): no weight decay and, under LARS, no trust ratio
        (VICReg's exclude_bias_and_norm; SimCLR's LARS excludes BN and biases)."""
        return param.ndim <= 1

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """Head outputs (float32) of uint8 crops [N, C, H, W]."""
        dtype = next(self.head.parameters()).dtype
        return self.head(pooled_features(self.encoder, normalize_images(crops).to(dtype))).float()

    def pair_crops(self, batch: Batch) -> torch.Tensor:
        """The batch's crops [2B, C, H, W]: ``.chunk(2)`` gives the first and second views."""
        crops = batch["global_crops"]
        if crops.shape[0] % VIEWS:
            raise ValueError(
                f"batch has {crops.shape[0]} global crops; expected {VIEWS} per sample, crop-major"
            )
        return crops


def collapse_metric(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension standard deviation of L2-normalised embeddings (1/sqrt(D) if spread,
    0 when collapsed; Jing et al. 2022 use the same monitor)."""
    return nn.functional.normalize(z.detach(), dim=1).std(dim=0).mean()
