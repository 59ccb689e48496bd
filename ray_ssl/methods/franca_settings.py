"""Franca's settings (config section ``franca``) and its registration as a method plug-in.

Torch-free, so that a config resolves and is checked before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ray_ssl.config import Config, ConfigError, MethodPlugin, ViewConfig, register_method

NAME = "franca"
MASKS = ("block", "inverse_block", "cyclic")  # iBOT needs masked patches; Franca uses cyclic


@dataclass
class FrancaSettings:
    """Franca (arXiv 2507.14137) objective and teacher."""

    prototypes: int = 131072  # DINO (CLS) prototypes of the largest Matryoshka level (ViT-G)
    ibot_prototypes: int = 131072  # iBOT (patch) prototypes of the largest level (DINOv2 ViT-g)
    nesting_levels: int = 5  # dims D/16, D/8, D/4, D/2, D
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 384  # DINO head (DINOv2 vitg14.yaml)
    ibot_head_bottleneck_dim: int = 256  # iBOT head (DINOv2 default)
    head_layers: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.04
    teacher_temp_warmup_epochs: int = 30
    sinkhorn_iterations: int = 3
    dino_weight: float = 1.0  # weight of the DINO CLS loss (each Matryoshka level weighs 1)
    ibot_weight: float = 1.0  # weight of the iBOT masked-patch loss
    koleo_weight: float = 0.1  # weight of KoLeo on the student's global-crop CLS tokens
    momentum_start: float = 0.994
    momentum_end: float = 1.0
    freeze_last_layer_epochs: int = 1


def check_settings(franca: FrancaSettings) -> None:
    for name in ("student_temp", "teacher_temp", "teacher_temp_warmup"):
        if getattr(franca, name) <= 0:
            raise ConfigError(f"franca.{name}={getattr(franca, name)} must be > 0")
    if not 0.0 <= franca.momentum_start <= franca.momentum_end <= 1.0:
        raise ConfigError(
            f"franca.momentum_start={franca.momentum_start} and franca.momentum_end="
            f"{franca.momentum_end} must satisfy 0 <= start <= end <= 1"
        )


def view_spec(config: Config) -> ViewConfig:
    """Multi-crop views, masks on the global crops (the user's mask kind: cyclic, block or
    inverse block)."""
    views, model = config.views, config.model
    if views.kind != "multicrop":
        raise ConfigError(
            f"views.kind={views.kind}: Franca trains on multi-crop views; set views.kind=multicrop"
        )
    if views.global_crops < 2:
        raise ConfigError(
            f"views.global_crops={views.global_crops}: Franca needs at least 2 global crops"
        )
    if views.mask not in MASKS:
        raise ConfigError(
            f"views.mask={views.mask}: Franca's iBOT loss predicts masked patches; set views.mask "
            f"to one of {', '.join(MASKS)}"
        )
    if views.channels != model.in_chans:
        raise ConfigError(
            f"views.channels={views.channels} differs from model.in_chans={model.in_chans}; "
            "set both to the same value"
        )
    return dataclasses.replace(views)


PLUGIN = register_method(
    MethodPlugin(
        name=NAME,
        settings=FrancaSettings,
        implementation="ray_ssl.methods.franca:FrancaMethod",
        view_spec=view_spec,
        shape_keys=(
            "prototypes",
            "ibot_prototypes",
            "nesting_levels",
            "head_hidden_dim",
            "head_bottleneck_dim",
            "ibot_head_bottleneck_dim",
            "head_layers",
        ),  # fmt: skip
        check_settings=check_settings,
    )
)
