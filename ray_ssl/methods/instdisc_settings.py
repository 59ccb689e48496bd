"""InstDisc's settings (config section ``instdisc``) and its registration as a method plug-in.

Torch-free, so that a config resolves and is checked before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ray_ssl.config import (
    VIT_BACKBONE,
    Config,
    ConfigError,
    MethodPlugin,
    ViewConfig,
    register_method,
)

NAME = "instdisc"


@dataclass
class InstDiscSettings:
    """InstDisc (arXiv 1805.01978) with a sharded memory bank."""

    backbone: str = VIT_BACKBONE  # "vit" (model section) or a timm name such as "resnet50"
    num_instances: int | None = None  # N = bank rows = the shard set's sample count (dense idx)
    feature_dim: int = 128
    negatives: int = 4096  # m, shared by the whole batch of a step
    temperature: float = 0.07
    bank_momentum: float = 0.5
    proximal_weight: float = 30.0  # lambda of the proximal term (paper sec. 3.3); 0 disables
    z_momentum: float = 0.99  # running average of the Monte-Carlo Z estimate
    exact_softmax: bool = False  # full non-parametric softmax over the bank (small N only)
    bank_shards: int = 2
    bank_dtype: Literal["float16", "float32"] = "float32"
    bank_cpus_per_shard: float = 0.5
    # A custom Ray resource each shard takes one unit of, so the shards run only on the nodes
    # started with it (`ray start --resources='{"bank": 2}'`); None: any node with the CPUs.
    bank_resource: str | None = None
    bank_max_restarts: int = 3  # Ray restarts of a dead shard (empty: the run resumes)
    max_inflight_updates: int = 4
    knn_k: int = 200
    knn_sigma: float = 0.07


def check_settings(inst: InstDiscSettings) -> None:
    if inst.negatives < 1 or inst.temperature <= 0 or not 0 <= inst.z_momentum < 1:
        raise ConfigError(
            f"instdisc.negatives={inst.negatives} must be >= 1, instdisc.temperature="
            f"{inst.temperature} > 0 and instdisc.z_momentum={inst.z_momentum} in [0, 1)"
        )


def view_spec(config: Config) -> ViewConfig:
    """One augmented view per sample (paper sec. 4: random crop, jitter, grayscale, flip)."""
    views = config.views
    if views.kind != "single":
        raise ConfigError(
            f"views.kind={views.kind}: InstDisc trains on one view per sample; "
            "set views.kind=single"
        )
    if views.mask != "none":
        raise ConfigError(f"views.mask={views.mask}: InstDisc uses no masks; set views.mask=none")
    inst = config.methods[NAME]
    if inst.backbone == VIT_BACKBONE and views.channels != config.model.in_chans:
        raise ConfigError(
            f"views.channels={views.channels} differs from model.in_chans="
            f"{config.model.in_chans}; set both to the same value"
        )
    return dataclasses.replace(views, global_crops=1, local_crops=0)


PLUGIN = register_method(
    MethodPlugin(
        name=NAME,
        settings=InstDiscSettings,
        implementation="ray_ssl.methods.instdisc:InstDiscMethod",
        view_spec=view_spec,
        shape_keys=("backbone", "feature_dim"),
        check_settings=check_settings,
    )
)
