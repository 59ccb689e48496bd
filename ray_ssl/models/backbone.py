"""Backbones by name: the model section's ViT (``"vit"``) or any timm network (e.g. ResNet-50).

Both offer what evaluation and export need: a pooled feature per image (the CLS token of the ViT,
the global-average-pooled feature of a CNN) and ``timm_name_and_kwargs`` / ``timm_state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn

from ray_ssl.config import VIT_BACKBONE, ConfigError, ModelConfig
from ray_ssl.models.vit import build_vit


class TimmBackbone(nn.Module):
    """A timm network with its classifier removed (pooled features), e.g. ResNet-50, offering
    what the export path needs (``timm_name_and_kwargs``, ``timm_state_dict``)."""

    def __init__(self, name: str, in_chans: int, setting: str = "backbone") -> None:
        super().__init__()
        import timm

        self._name, self._kwargs = name, {"num_classes": 0, "in_chans": in_chans}
        try:
            self.net = timm.create_model(name, **self._kwargs)
        except RuntimeError as err:  # timm's "Unknown model"
            raise ConfigError(f"{setting}='{name}' is not 'vit' or a timm model") from err
        self.num_features = int(self.net.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def timm_name_and_kwargs(self) -> tuple[str, dict]:
        return self._name, dict(self._kwargs)

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()


def build_backbone(
    name: str, model: ModelConfig, in_chans: int, setting: str = "backbone"
) -> tuple[nn.Module, int]:
    """(backbone, feature width): the ViT of ``model`` for ``"vit"``, else timm network ``name``
    with ``in_chans`` input channels; ``setting`` names the config key in errors."""
    if name == VIT_BACKBONE:
        vit = build_vit(model)
        return vit, vit.embed_dim
    net = TimmBackbone(name, in_chans, setting)
    return net, net.num_features


def pooled_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """One feature vector per image: a timm network's pooled output, a ViT's CLS token."""
    out = backbone(images)
    return out if isinstance(out, torch.Tensor) else out[0]  # ViT: (cls, patches)
