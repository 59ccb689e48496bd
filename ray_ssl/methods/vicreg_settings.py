"""VICReg's settings (config section ``vicreg``) and its registration as a method plug-in.

Torch-free, so that a config resolves and is checked before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_ssl.config import ConfigError, MethodPlugin, register_method
from ray_ssl.methods.pair_views import pair_view_spec

NAME = "vicreg"


@dataclass
class VICRegSettings:
    """VICReg (Bardes et al., ICLR 2022): variance-invariance-covariance regularisation."""

    backbone: str = "resnet50"  # "vit" (model section) or a timm name
    expander_dims: tuple[int, ...] = (8192, 8192, 8192)  # paper sec. 4.2
    sim_coeff: float = 25.0  # lambda, invariance (paper eq. 6)
    std_coeff: float = 25.0  # mu, variance
    cov_coeff: float = 1.0  # nu, covariance
    sync_batchnorm: bool = True  # BatchNorm statistics over every rank (official code)


def check_settings(vicreg: VICRegSettings, section: str = NAME) -> None:
    """VICReg's checks; ``section`` names the config section in errors (SAG-VICReg reuses them)."""
    if not vicreg.expander_dims or min(vicreg.expander_dims) < 1:
        raise ConfigError(
            f"{section}.expander_dims={list(vicreg.expander_dims)} must list at least one "
            "width >= 1"
        )
    for name in ("sim_coeff", "std_coeff", "cov_coeff"):
        if getattr(vicreg, name) < 0:
            raise ConfigError(f"{section}.{name}={getattr(vicreg, name)} must be >= 0")


PLUGIN = register_method(
    MethodPlugin(
        name=NAME,
        settings=VICRegSettings,
        implementation="ray_ssl.methods.vicreg:VICRegMethod",
        view_spec=lambda config: pair_view_spec(config, "VICReg", NAME),
        shape_keys=("backbone", "expander_dims"),
        check_settings=check_settings,
    )
)
