"""SAG-VICReg's settings (config section ``sag_vicreg``) and its registration as a plug-in.

Torch-free, so that a config resolves and is checked before anything heavy is imported. The
graph, walk and weighting choices are ours (see :mod:`ray_ssl.losses.random_walk` and
:mod:`ray_ssl.losses.sag_vicreg`): the paper's exact values are not available to us.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ray_ssl.config import Config, ConfigError, MethodPlugin, ViewConfig, register_method
from ray_ssl.methods.pair_views import pair_view_spec
from ray_ssl.methods.vicreg_settings import VICRegSettings
from ray_ssl.methods.vicreg_settings import check_settings as check_vicreg_settings

NAME = "sag_vicreg"


@dataclass
class SAGVICRegSettings(VICRegSettings):
    """VICReg's settings plus the batch graph, the walk and the weight of its pairs."""

    graph_features: Literal["backbone", "expander"] = "backbone"  # what the affinity is built on
    neighbors: int = 10  # k of the kNN-sparsified affinity (SpectralNet sec. 4.1 uses small k)
    scale_neighbor: int = 7  # sigma_i = distance to this neighbour (Zelnik-Manor & Perona use 7)
    walk_steps: int = 2  # t of P^t: partners two hops away, beyond the nearest neighbours
    walk_weight: float = 0.5  # w: share of the invariance term given to walk pairs
    walk_warmup_epochs: float = 1.0  # w rises linearly from 0 over this many epochs


def check_settings(sag: SAGVICRegSettings) -> None:
    check_vicreg_settings(sag, NAME)
    if not 1 <= sag.scale_neighbor <= sag.neighbors:
        raise ConfigError(
            f"{NAME}.scale_neighbor={sag.scale_neighbor} must be within 1..{NAME}.neighbors="
            f"{sag.neighbors}"
        )
    if sag.walk_steps < 1:
        raise ConfigError(f"{NAME}.walk_steps={sag.walk_steps} must be >= 1")
    if not 0.0 <= sag.walk_weight <= 1.0:
        raise ConfigError(f"{NAME}.walk_weight={sag.walk_weight} must be within [0, 1]")
    if sag.walk_warmup_epochs < 0:
        raise ConfigError(f"{NAME}.walk_warmup_epochs={sag.walk_warmup_epochs} must be >= 0")


def view_spec(config: Config) -> ViewConfig:
    """Two views per sample, as VICReg; the global batch must have more nodes than neighbours."""
    sag = config.methods[NAME]
    nodes = 2 * config.data.batch_size
    if nodes <= sag.neighbors:
        raise ConfigError(
            f"{NAME}.neighbors={sag.neighbors} needs more than that many views per step; "
            f"data.batch_size={config.data.batch_size} gives {nodes}: lower the neighbours or "
            "raise the batch"
        )
    return pair_view_spec(config, "SAG-VICReg", NAME)


PLUGIN = register_method(
    MethodPlugin(
        name=NAME,
        settings=SAGVICRegSettings,
        implementation="ray_ssl.methods.sag_vicreg:SAGVICRegMethod",
        view_spec=view_spec,
        shape_keys=("backbone", "expander_dims"),
        check_settings=check_settings,
    )
)
