"""The cluster tree: levels of k-means with resampling, level l clustering level l-1's centroids.

Level 1 clusters the points (optionally splitting every cluster further, as the reference does to
reach 10M clusters); level l >= 2 clusters the centroids of level l-1, split into blocks on the
same executor as the points. The tree is what balanced sampling walks down.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import numpy as np

from ray_ssl.config import CurationConfig
from ray_ssl.curation.blocks import PointSet
from ray_ssl.curation.errors import CurationError
from ray_ssl.curation.hkmeans import (
    DEFAULT_INIT,
    InitSpec,
    LevelSpec,
    in_driver_if_small,
    kmeans_with_resampling,
)
from ray_ssl.curation.split import split_clusters

log = logging.getLogger(__name__)


@dataclass
class Level:
    """One level: its centroids and the assignment of the level's points to them."""

    centroids: np.ndarray  # float32 [k_l, d]
    labels: np.ndarray  # int64: cluster of every point of the level (data points, or the
    # previous level's centroids)
    sqdist: np.ndarray  # float32 squared distance of every point of the level to its centroid
    inertia: float


@dataclass
class Hierarchy:
    """The cluster tree: level 1 clusters data points, level l clusters level l-1's clusters."""

    levels: list[Level] = field(default_factory=list)

    @property
    def n_points(self) -> int:
        return len(self.levels[0].labels)

    def n_clusters(self, level: int) -> int:
        return len(self.levels[level - 1].centroids)

    def parents(self, level: int) -> np.ndarray:
        """The level-``level`` cluster of every level-(``level``-1) cluster (level >= 2)."""
        return self.levels[level - 1].labels

    def point_labels(self, level: int) -> np.ndarray:
        """The level-``level`` cluster (1-based level) of every data point."""
        labels = self.levels[0].labels
        for parent in self.levels[1:level]:
            labels = parent.labels[labels]
        return labels

    def sizes(self, level: int) -> np.ndarray:
        """Data points under every cluster of ``level``."""
        return np.bincount(self.point_labels(level), minlength=self.n_clusters(level))

    def to_bytes(self) -> bytes:
        arrays = {}
        for i, lvl in enumerate(self.levels, 1):
            arrays[f"centroids{i}"], arrays[f"labels{i}"] = lvl.centroids, lvl.labels
            arrays[f"sqdist{i}"], arrays[f"inertia{i}"] = lvl.sqdist, np.array(lvl.inertia)
        buffer = io.BytesIO()
        np.savez(buffer, n_levels=np.array(len(self.levels)), **arrays)
        return buffer.getvalue()


def level_specs(cfg: CurationConfig) -> list[LevelSpec]:
    """The levels of ``cfg``; one-line error when ``n_splits`` has the wrong length."""
    splits = cfg.n_splits or (1,) * len(cfg.n_clusters)
    if len(splits) != len(cfg.n_clusters):
        raise CurationError(
            f"curation.n_splits has {len(splits)} entries for {len(cfg.n_clusters)} levels; give "
            "one per level or none"
        )
    return [
        LevelSpec(*level)
        for level in zip(
            cfg.n_clusters, cfg.n_resampling_steps, cfg.sample_size, splits, strict=True
        )
    ]


def check_levels(specs: list[LevelSpec], n_points: int) -> None:
    """One-line errors for a hierarchy that cannot be built on ``n_points`` points."""
    if not specs:
        raise CurationError("curation.n_clusters is empty; give at least one level")
    available, what = n_points, "embeddings"
    for level, spec in enumerate(specs, 1):
        if spec.n_clusters > available:
            raise CurationError(
                f"level {level} asks for {spec.n_clusters} clusters of only {available} {what}; "
                f"each curation.n_clusters entry must be at most the previous one (and level 1 at "
                f"most the number of embeddings)"
            )
        if min(spec.n_clusters, spec.sample_size, spec.n_splits) < 1 or spec.n_resampling_steps < 0:
            raise CurationError(
                f"level {level}: n_clusters, sample_size and n_splits must be >= 1 and "
                f"n_resampling_steps >= 0, got {spec}"
            )
        if spec.n_splits > 1 and spec.n_resampling_steps > 0:
            raise CurationError(
                f"level {level} both splits clusters and resamples; use one of curation.n_splits "
                "> 1 and curation.n_resampling_steps > 0 per level (as the reference does)"
            )
        available, what = spec.n_clusters * spec.n_splits, f"level-{level} centroids"


def hierarchical_kmeans(
    points: PointSet,
    specs: list[LevelSpec],
    rng: np.random.Generator,
    iterations: int,
    strategy: str = "closest",
    n_blocks: int = 1,
    driver_max_points: int = 0,
    init: InitSpec = DEFAULT_INIT,
    n_init: int = 1,
) -> Hierarchy:
    """Build the hierarchy bottom-up; level l >= 2 clusters level l-1's centroids, split into
    ``n_blocks`` blocks on the same executor as ``points``. A level with ``n_splits`` > 1 splits
    each cluster by the best (lowest inertia) of ``n_init`` k-means runs."""
    check_levels(specs, points.n)
    executor = points.executor
    hierarchy = Hierarchy()
    current = points
    for level, spec in enumerate(specs, 1):
        current = in_driver_if_small(current, driver_max_points)
        log.info(
            "level %d: %d clusters of %d points (%s), %d resampling steps of %d per cluster",
            level,
            spec.n_clusters,
            current.n,
            "Ray tasks" if current.executor.distributed else "in the driver",
            spec.n_resampling_steps,
            spec.sample_size,
        )
        result = kmeans_with_resampling(
            current, spec, rng, iterations, strategy, driver_max_points, init
        )
        if spec.n_splits > 1:
            result = split_clusters(current, result, spec.n_splits, rng, iterations, init, n_init)
            log.info("level %d: split into %d clusters", level, len(result.centroids))
        hierarchy.levels.append(
            Level(
                result.centroids,
                current.concat(result.assignment.labels).astype(np.int64),
                current.concat(result.assignment.sqdist).astype(np.float32),
                result.assignment.inertia,
            )
        )
        current = PointSet.from_array(result.centroids, executor, n_blocks)
    return hierarchy
