"""Balanced hierarchical sampling: exact size, caps found by binary search, leaf selection."""

from __future__ import annotations

import numpy as np
import pytest

from ray_ssl.curation.errors import CurationError
from ray_ssl.curation.hierarchy import Hierarchy, Level
from ray_ssl.curation.sampling import hierarchical_sample, split_targets


def brute_cap(sizes: np.ndarray, target: int) -> int:
    """Largest c with sum(min(sizes, c)) <= target, by scanning every c."""
    best = 0
    for c in range(int(sizes.max()) + 1):
        if np.minimum(sizes, c).sum() <= target:
            best = c
    return best


def test_split_targets_matches_a_scan_for_the_cap() -> None:
    rng = np.random.default_rng(0)
    parents = rng.integers(0, 6, 60)
    sizes = rng.integers(0, 40, 60)
    capacity = np.bincount(parents, weights=sizes, minlength=6).astype(int)
    targets = (capacity * rng.random(6)).astype(int)
    shares, caps = split_targets(parents, sizes, targets, np.random.default_rng(1))
    assert (
        np.bincount(parents, weights=shares, minlength=6).astype(int).tolist() == targets.tolist()
    )
    for p in range(6):
        members = parents == p
        assert caps[p] == brute_cap(sizes[members], targets[p])
        low, high = np.minimum(sizes[members], caps[p]), np.minimum(sizes[members], caps[p] + 1)
        assert np.all((shares[members] >= low) & (shares[members] <= high))


def test_split_targets_takes_everything_when_target_is_the_size() -> None:
    sizes = np.array([3, 0, 9, 1])
    shares, caps = split_targets(np.zeros(4, int), sizes, np.array([13]), np.random.default_rng(0))
    assert shares.tolist() == sizes.tolist() and caps.tolist() == [9]


def tree(rng: np.random.Generator) -> Hierarchy:
    """A 3-level hierarchy over 5000 points with very unequal clusters."""
    n, k1, k2, k3 = 5000, 60, 12, 3
    labels1 = np.minimum((rng.pareto(1.0, n) * 3).astype(int), k1 - 1)  # long-tailed sizes
    return Hierarchy(
        [
            Level(np.zeros((k1, 2), np.float32), labels1, rng.random(n).astype(np.float32), 0.0),
            Level(np.zeros((k2, 2), np.float32), rng.integers(0, k2, k1), np.zeros(k1), 0.0),
            Level(np.zeros((k3, 2), np.float32), np.arange(k2) % k3, np.zeros(k2), 0.0),
        ]
    )


@pytest.mark.parametrize("leaf_selection", ["random", "closest"])
def test_sample_has_the_target_size_and_respects_caps(leaf_selection: str) -> None:
    hierarchy = tree(np.random.default_rng(2))
    target = 900
    selection = hierarchical_sample(hierarchy, target, np.random.default_rng(3), leaf_selection)
    assert len(selection.points) == target == len(np.unique(selection.points))
    levels = len(hierarchy.levels)
    for level in range(levels, 0, -1):
        sizes, shares = hierarchy.sizes(level), selection.shares[level - 1]
        parents = np.zeros(len(sizes), int) if level == levels else hierarchy.parents(level + 1)
        parent_shares = [target] if level == levels else selection.shares[level]
        cap = selection.caps[level - 1][parents]
        assert np.all(shares >= np.minimum(sizes, cap)) and np.all(
            shares <= np.minimum(sizes, cap + 1)
        )
        assert np.bincount(parents, weights=shares, minlength=len(parent_shares)).tolist() == list(
            parent_shares
        )
        taken = np.bincount(hierarchy.point_labels(level)[selection.points], minlength=len(sizes))
        assert taken.tolist() == shares.tolist()
    top = hierarchy.sizes(levels)
    assert (
        np.minimum(top, selection.caps[-1][0]).sum()
        <= target
        < np.minimum(top, selection.caps[-1][0] + 1).sum()
    )
    if leaf_selection == "closest":
        labels, sqdist = hierarchy.levels[0].labels, hierarchy.levels[0].sqdist
        for cluster in np.unique(labels[selection.points]):
            chosen = np.intersect1d(np.flatnonzero(labels == cluster), selection.points)
            rest = np.setdiff1d(np.flatnonzero(labels == cluster), chosen)
            assert len(rest) == 0 or sqdist[chosen].max() <= sqdist[rest].min()


def test_sample_flattens_the_distribution_over_clusters() -> None:
    hierarchy = tree(np.random.default_rng(4))
    selection = hierarchical_sample(hierarchy, 600, np.random.default_rng(5))
    before = hierarchy.sizes(1) / hierarchy.n_points
    after = selection.shares[0] / 600
    assert after.max() < before.max() / 2  # the biggest cluster is cut down


def test_target_out_of_range_is_a_one_line_error() -> None:
    hierarchy = tree(np.random.default_rng(6))
    with pytest.raises(CurationError, match="target_size=5001") as err:
        hierarchical_sample(hierarchy, 5001, np.random.default_rng(0))
    assert "\n" not in str(err.value)
