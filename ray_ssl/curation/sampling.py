"""Balanced sampling down the cluster tree (Vo et al., arXiv 2405.15613; reference
facebookresearch/ssl-data-curation ``src/hierarchical_sampling.py``, multiplier 1).

The target size is split over the top-level clusters by a common cap c - the largest integer with
sum_i min(size_i, c) <= target, found by binary search - and the remainder goes one each to
randomly chosen clusters larger than c; each cluster's share is split the same way over its
sub-clusters, down to level 1, where the points are taken at random or closest to the centroid
first. Small clusters are kept whole and large ones are cut to the cap, which flattens the
distribution over clusters. All parents of a level are split at once (vectorised).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ray_ssl.curation.errors import CurationError
from ray_ssl.curation.hierarchy import Hierarchy
from ray_ssl.curation.kmeans import rank_in_group, smallest_per_group

NOT_ELIGIBLE_KEY = 2.0  # above every uniform [0, 1) key: children at their size get no extra


def split_targets(
    parents: np.ndarray, sizes: np.ndarray, targets: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split each parent's target over its children.

    ``parents[i]`` is the parent of child i, ``sizes[i]`` its size and ``targets[p]`` what parent
    p must deliver (at most the sum of its children's sizes). Returns every child's share and
    every parent's cap c: each share is min(size, c), plus one for ``targets[p] - sum min(size,
    c)`` children larger than c chosen uniformly at random.
    """
    n_parents = len(targets)
    sizes, targets = sizes.astype(np.int64), targets.astype(np.int64)
    capacity = np.bincount(parents, weights=sizes, minlength=n_parents)
    if np.any(targets > capacity):
        raise CurationError("a cluster's sample target exceeds its size; this is a bug")
    low = np.zeros(n_parents, np.int64)  # invariant: sum min(size, low) <= target
    high = np.zeros(n_parents, np.int64)
    np.maximum.at(high, parents, sizes)
    while np.any(low < high):
        mid = (low + high + 1) // 2
        taken = np.bincount(parents, weights=np.minimum(sizes, mid[parents]), minlength=n_parents)
        fits = taken <= targets
        low, high = np.where(fits, mid, low), np.where(fits, high, mid - 1)
    shares = np.minimum(sizes, low[parents])
    remainder = targets - np.bincount(parents, weights=shares, minlength=n_parents).astype(np.int64)
    eligible = sizes > low[parents]
    keys = np.where(eligible, rng.random(len(sizes)), NOT_ELIGIBLE_KEY)
    ranks = rank_in_group(parents, keys, np.arange(len(sizes)))
    shares += eligible & (ranks < remainder[parents])
    return shares, low


@dataclass
class Selection:
    """The sampled data points and how the target was split at every level."""

    points: np.ndarray  # sorted indices (rows of the embedding table) of the chosen points
    shares: list[np.ndarray]  # shares[l-1][j]: points allotted to level-l cluster j
    caps: list[np.ndarray]  # caps[l-1][p]: cap used to split parent p's share over its level-l
    # children (the parent is the level-(l+1) cluster; for the top level a single root)


def hierarchical_sample(
    hierarchy: Hierarchy,
    target_size: int,
    rng: np.random.Generator,
    leaf_selection: str = "random",
) -> Selection:
    """Exactly ``target_size`` distinct points, balanced top-down over the cluster tree."""
    n_levels, n_points = len(hierarchy.levels), hierarchy.n_points
    if not 1 <= target_size <= n_points:
        raise CurationError(
            f"curation.target_size={target_size} must be between 1 and the {n_points} embedded "
            "samples; lower it or curate a larger shard set"
        )
    shares: list[np.ndarray] = [np.zeros(0, np.int64)] * n_levels
    caps: list[np.ndarray] = [np.zeros(0, np.int64)] * n_levels
    parent_shares = np.array([target_size], np.int64)  # a single root above the top level
    for level in range(n_levels, 0, -1):
        sizes = hierarchy.sizes(level)
        parents = (
            np.zeros(len(sizes), np.int64) if level == n_levels else hierarchy.parents(level + 1)
        )
        shares[level - 1], caps[level - 1] = split_targets(parents, sizes, parent_shares, rng)
        parent_shares = shares[level - 1]
    labels = hierarchy.levels[0].labels
    if leaf_selection == "closest":
        keys = hierarchy.levels[0].sqdist.astype(np.float64)
    elif leaf_selection == "random":
        keys = rng.random(n_points)
    else:
        raise CurationError(f"curation.leaf_selection='{leaf_selection}'; use random or closest")
    chosen = smallest_per_group(labels, keys, np.arange(n_points), shares[0])
    return Selection(np.flatnonzero(chosen), shares, caps)
