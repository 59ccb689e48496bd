"""The view spec of two-view joint-embedding methods (SimCLR, VICReg); torch-free.

Each sample gives two augmented global crops (``views.kind=pair``: BYOL/VICReg-style asymmetric
blur and solarization), and no masks.
"""

from __future__ import annotations

import dataclasses

from ray_ssl.config import VIT_BACKBONE, Config, ConfigError, ViewConfig


def pair_view_spec(config: Config, method: str, section: str) -> ViewConfig:
    """``config.views`` if a two-view method can train on them, else a one-line ConfigError.

    Also refuses global BatchNorm across CPU workers, which torch's SyncBatchNorm cannot do.
    """
    views, settings, t = config.views, config.methods[section], config.train
    if settings.sync_batchnorm and t.num_workers > 1 and not t.use_gpu:
        raise ConfigError(
            f"{section}.sync_batchnorm needs GPUs (torch's SyncBatchNorm) but train.num_workers="
            f"{t.num_workers} on CPU; set {section}.sync_batchnorm=false for per-worker statistics"
        )
    if views.kind != "pair":
        raise ConfigError(
            f"views.kind={views.kind}: {method} trains on two views per sample; set views.kind=pair"
        )
    if views.mask != "none":
        raise ConfigError(f"views.mask={views.mask}: {method} uses no masks; set views.mask=none")
    if settings.backbone == VIT_BACKBONE and views.channels != config.model.in_chans:
        raise ConfigError(
            f"views.channels={views.channels} differs from model.in_chans="
            f"{config.model.in_chans}; set both to the same value"
        )
    return dataclasses.replace(views, global_crops=2, local_crops=0)
