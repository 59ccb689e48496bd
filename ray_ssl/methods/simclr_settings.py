"""SimCLR's settings (config section ``simclr``) and its registration as a method plug-in.

Torch-free, so that a config resolves and is checked before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_ssl.config import ConfigError, MethodPlugin, register_method
from ray_ssl.methods.pair_views import pair_view_spec

NAME = "simclr"


@dataclass
class SimCLRSettings:
    """SimCLR (Chen et al., ICML 2020): NT-Xent over two views, negatives from the global batch."""

    backbone: str = "resnet50"  # "vit" (model section) or a timm name
    projection_hidden_dim: int = 2048  # the ResNet-50 feature width (paper sec. 2.1)
    projection_dim: int = 128  # z, where the loss is computed (paper sec. 2.1)
    temperature: float = 0.1  # tau of NT-Xent (paper eq. 1; 0.1 at batch 4096, sec. 5.1)
    sync_batchnorm: bool = True  # global BatchNorm statistics over every rank (paper sec. 2.2)


def check_settings(simclr: SimCLRSettings) -> None:
    if simclr.temperature <= 0:
        raise ConfigError(f"simclr.temperature={simclr.temperature} must be > 0")
    if simclr.projection_hidden_dim < 1 or simclr.projection_dim < 1:
        raise ConfigError(
            f"simclr.projection_hidden_dim={simclr.projection_hidden_dim} and "
            f"simclr.projection_dim={simclr.projection_dim} must be >= 1"
        )


PLUGIN = register_method(
    MethodPlugin(
        name=NAME,
        settings=SimCLRSettings,
        implementation="ray_ssl.methods.simclr:SimCLRMethod",
        view_spec=lambda config: pair_view_spec(config, "SimCLR", NAME),
        shape_keys=("backbone", "projection_hidden_dim", "projection_dim"),
        check_settings=check_settings,
    )
)
