"""Hierarchical k-means: distributed (Ray tasks over object-store blocks) equals single-process,
the tree is consistent, resampling takes the right points, bad sizes are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from ray_ssl.curation.blocks import LocalExecutor, PointSet, RayExecutor
from ray_ssl.curation.errors import CurationError
from ray_ssl.curation.hierarchy import check_levels, hierarchical_kmeans
from ray_ssl.curation.hkmeans import (
    KMEANS_PLUSPLUS,
    SEED_BOUND,
    InitSpec,
    LevelSpec,
    assign,
    kmeans,
    kmeans_parallel,
    parallel_candidates,
    resample,
    rows_at,
    uniform_subsample,
)
from ray_ssl.curation.kmeans import uniform_keys
from ray_ssl.curation.split import best_of, split_clusters

SPECS = [LevelSpec(40, 2, 8), LevelSpec(10, 2, 2), LevelSpec(3, 1, 2)]


def blobs(n: int = 1200, seed: int = 0) -> np.ndarray:
    x, _ = make_blobs(n, n_features=8, centers=25, cluster_std=1.5, random_state=seed)
    return x.astype(np.float32)


@pytest.mark.parametrize(
    ("strategy", "init"),
    [("closest", InitSpec()), ("random", InitSpec()), ("closest", InitSpec(KMEANS_PLUSPLUS))],
)
def test_distributed_equals_single_process(ray_local: None, strategy: str, init: InitSpec) -> None:
    x = blobs()
    single = hierarchical_kmeans(
        PointSet.from_array(x, LocalExecutor(), 1),
        SPECS,
        np.random.default_rng(7),
        15,
        strategy,
        init=init,
    )
    distributed = hierarchical_kmeans(
        PointSet.from_array(x, RayExecutor(), 4),
        SPECS,
        np.random.default_rng(7),
        15,
        strategy,
        n_blocks=3,
        driver_max_points=0,  # every level and every resampled subset as Ray tasks
        init=init,
    )
    for a, b in zip(single.levels, distributed.levels, strict=True):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.centroids, b.centroids, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.sqdist, b.sqdist, rtol=1e-4, atol=1e-4)
        assert a.inertia == pytest.approx(b.inertia, rel=1e-6)


def test_tree_is_consistent_and_parents_are_nearest_centroids() -> None:
    x = blobs(seed=1)
    h = hierarchical_kmeans(
        PointSet.from_array(x, LocalExecutor(), 2), SPECS, np.random.default_rng(0), 15
    )
    assert [h.n_clusters(level) for level in (1, 2, 3)] == [40, 10, 3]
    for level in (2, 3):
        below, here = h.levels[level - 2], h.levels[level - 1]
        # every point's level-l cluster is the parent of its level-(l-1) cluster
        np.testing.assert_array_equal(
            h.point_labels(level), h.parents(level)[h.point_labels(level - 1)]
        )
        dist = ((below.centroids[:, None, :] - here.centroids[None]) ** 2).sum(-1)
        chosen = dist[np.arange(len(dist)), here.labels]
        assert np.all(chosen <= dist.min(1) + 1e-4)
        assert h.sizes(level).sum() == len(x)
    dist1 = ((x[:, None, :] - h.levels[0].centroids[None]) ** 2).sum(-1)
    assert np.all(dist1[np.arange(len(x)), h.levels[0].labels] <= dist1.min(1) + 1e-3)


@pytest.mark.parametrize("strategy", ["closest", "random"])
def test_resample_takes_sample_size_points_per_cluster(strategy: str) -> None:
    x = blobs(600, seed=2)
    points = PointSet.from_array(x, LocalExecutor(), 3)
    result = kmeans(points, 12, np.random.default_rng(0), 10)
    sample = resample(points, result.assignment, 5, strategy, np.random.default_rng(1))
    labels = np.concatenate(result.assignment.labels)
    sqdist = np.concatenate(result.assignment.sqdist)
    rows = sample.gather()
    picked = np.flatnonzero((x[:, None, :] == rows[None]).all(-1).any(1))
    assert len(picked) == sample.n == sum(min(5, c) for c in result.assignment.counts)
    for cluster in range(12):
        members = np.flatnonzero(labels == cluster)
        chosen = np.intersect1d(members, picked)
        assert len(chosen) == min(5, len(members))
        if strategy == "closest":
            expected = members[np.argsort(sqdist[members], kind="stable")][:5]
            np.testing.assert_array_equal(np.sort(chosen), np.sort(expected))


def test_rows_at_returns_rows_in_the_asked_order() -> None:
    x = blobs(100)
    ids = np.array([99, 0, 42, 57, 3])
    np.testing.assert_array_equal(rows_at(PointSet.from_array(x, LocalExecutor(), 4), ids), x[ids])


def test_too_many_clusters_is_a_one_line_error() -> None:
    points = PointSet.from_array(blobs(50), LocalExecutor(), 2)
    with pytest.raises(CurationError, match="51 clusters of only 50") as err:
        kmeans(points, 51, np.random.default_rng(0), 5)
    assert "\n" not in str(err.value)
    with pytest.raises(CurationError, match="level 2 asks for 30 clusters of only 20"):
        check_levels([LevelSpec(20), LevelSpec(30)], 50)
    with pytest.raises(CurationError, match="level 1 asks for 5 clusters of only 0"):
        check_levels([LevelSpec(5)], 0)
    with pytest.raises(CurationError, match="sample_size"):
        check_levels([LevelSpec(5, 1, 0)], 50)


def split_run(points: PointSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    result = kmeans(points, 6, rng, 10)
    split = split_clusters(points, result, 4, rng, 20)
    before = points.concat(result.assignment.labels)
    return before, points.concat(split.assignment.labels), split.centroids


def test_split_clusters_refines_each_cluster_alike_on_ray(ray_local: None) -> None:
    x = blobs(600, seed=3)
    before, after, centroids = split_run(PointSet.from_array(x, LocalExecutor(), 1))
    for new in range(len(centroids)):
        assert len(np.unique(before[after == new])) == 1  # inside one old cluster
    for old in range(6):
        subs = np.unique(after[before == old])
        assert 1 <= len(subs) <= 4
        members = np.flatnonzero(before == old)
        dist = ((x[members, None, :] - centroids[None, subs]) ** 2).sum(-1)
        chosen = dist[np.arange(len(members)), np.searchsorted(subs, after[members])]
        assert np.all(chosen <= dist.min(1) + 1e-3)  # nearest of its cluster's sub-centroids
    ray_before, ray_after, ray_centroids = split_run(PointSet.from_array(x, RayExecutor(), 3))
    np.testing.assert_array_equal(before, ray_before)
    np.testing.assert_array_equal(after, ray_after)
    np.testing.assert_allclose(centroids, ray_centroids, rtol=1e-5, atol=1e-5)


def test_split_level_feeds_the_next_level() -> None:
    x = blobs(500, seed=4)
    specs = [LevelSpec(5, 0, 1, n_splits=3), LevelSpec(8)]
    h = hierarchical_kmeans(
        PointSet.from_array(x, LocalExecutor(), 2), specs, np.random.default_rng(0), 10
    )
    assert 5 < h.n_clusters(1) <= 15 and h.sizes(1).min() > 0
    assert len(h.parents(2)) == h.n_clusters(1) and h.sizes(2).sum() == 500
    with pytest.raises(CurationError, match="both splits clusters and resamples"):
        check_levels([LevelSpec(5, 1, 2, n_splits=3)], 500)
    with pytest.raises(CurationError, match="level 2 asks for 16 clusters of only 15"):
        check_levels([LevelSpec(5, 0, 1, n_splits=3), LevelSpec(16)], 500)


def brute_sqdist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    return ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)


def test_parallel_candidates_follow_algorithm_2() -> None:
    """Lines 1-7 of k-means|| recomputed by brute force in float64 from the same draws."""
    x, k, rounds, oversampling = blobs(900, seed=5), 12, 3, 2.0
    found = parallel_candidates(
        PointSet.from_array(x, LocalExecutor(), 3), k, np.random.default_rng(11), rounds, 2.0
    )
    rng = np.random.default_rng(11)
    chosen = [int(rng.integers(len(x)))]
    for _ in range(rounds):
        d2 = brute_sqdist(x, x[chosen]).min(1)
        d2[chosen] = 0.0
        seed = int(rng.integers(SEED_BOUND))
        keys = uniform_keys(seed, np.arange(len(x)))
        chosen += np.flatnonzero(keys < oversampling * k * d2 / d2.sum()).tolist()
    assert found.ids.tolist() == chosen
    assert 2 * k < len(chosen) < 2 * k * rounds + 1 + 3 * np.sqrt(2 * k * rounds)  # ~ l per round
    np.testing.assert_array_equal(found.rows, x[chosen])
    nearest = brute_sqdist(x, x[chosen]).argmin(1)
    np.testing.assert_array_equal(found.weights, np.bincount(nearest, minlength=len(chosen)))


def test_kmeans_parallel_distributed_equals_single_process(ray_local: None) -> None:
    x = blobs(1500, seed=6)  # > 32 points per cluster: seeds on a subsample of ~960 rows
    for seed in (0, 1):
        single = kmeans_parallel(
            PointSet.from_array(x, LocalExecutor(), 1), 30, np.random.default_rng(seed)
        )
        on_ray = kmeans_parallel(
            PointSet.from_array(x, RayExecutor(), 5), 30, np.random.default_rng(seed)
        )
        np.testing.assert_array_equal(single, on_ray)
        assert len(np.unique(single, axis=0)) == 30
        assert (brute_sqdist(single, x).min(1) == 0).all()  # centres are data points


def test_uniform_subsample_keeps_the_rows_whose_keys_are_below_the_fraction() -> None:
    x = blobs(1000, seed=4)
    sample = uniform_subsample(
        PointSet.from_array(x, LocalExecutor(), 4), 300, np.random.default_rng(3)
    )
    keys = uniform_keys(int(np.random.default_rng(3).integers(SEED_BOUND)), np.arange(len(x)))
    np.testing.assert_array_equal(sample.gather(), x[keys < 0.3])
    assert 250 < sample.n < 350 and sample.n == sample.sizes.sum()


def test_kmeans_parallel_tops_up_with_few_distinct_points() -> None:
    x = np.repeat(blobs(8, seed=7), 10, axis=0)  # 8 distinct points, 80 rows
    centres = kmeans_parallel(
        PointSet.from_array(x, LocalExecutor(), 2), 12, np.random.default_rng(0)
    )
    assert centres.shape == (12, x.shape[1]) and len(np.unique(centres, axis=0)) == 8


def test_kmeans_parallel_matches_kmeans_plusplus_inertia() -> None:
    x = blobs(3000, seed=8)
    inertia = {
        method: np.mean(
            [
                kmeans(
                    PointSet.from_array(x, LocalExecutor(), 3),
                    60,
                    np.random.default_rng(s),
                    20,
                    InitSpec(method),
                ).assignment.inertia
                for s in range(3)
            ]
        )
        for method in ("kmeans||", KMEANS_PLUSPLUS)
    }
    assert inertia["kmeans||"] <= 1.02 * inertia[KMEANS_PLUSPLUS]


def test_n_init_keeps_the_lowest_inertia_run() -> None:
    x = blobs(400, seed=9)
    points = PointSet.from_array(x, LocalExecutor(), 2)
    best = best_of(points, 8, np.random.default_rng(5), 3, InitSpec(), 4)
    rng = np.random.default_rng(5)
    runs = [kmeans(points, 8, rng, 3, InitSpec()) for _ in range(4)]
    inertias = [run.assignment.inertia for run in runs]
    assert len(set(inertias)) > 1  # the runs differ, so the choice matters
    assert best.assignment.inertia == min(inertias)
    np.testing.assert_array_equal(best.centroids, runs[int(np.argmin(inertias))].centroids)

    # per cluster, run 1 of n_init=5 is the n_init=1 run: best of 5 is never worse
    result = kmeans(points, 4, np.random.default_rng(0), 10)
    one, five = (
        split_clusters(points, result, 6, np.random.default_rng(1), 3, InitSpec(), n_init)
        for n_init in (1, 5)
    )
    assert five.assignment.inertia < one.assignment.inertia


def test_one_lloyd_wave_sums_counts_and_inertia_match_brute_force() -> None:
    """assign's per-block summaries (sums, counts, inertia, changed in one vector) reduce to the
    whole set's, recomputed independently in float64."""
    x = blobs(700, seed=10)
    centroids = x[:9] + 0.5
    points = PointSet.from_array(x, LocalExecutor(), 4)
    first, sums, changed = assign(points, centroids)
    d2 = brute_sqdist(x, centroids)
    labels = d2.argmin(1)
    np.testing.assert_array_equal(points.concat(first.labels), labels)
    np.testing.assert_array_equal(first.counts, np.bincount(labels, minlength=9))
    expected = np.stack([x[labels == j].astype(np.float64).sum(0) for j in range(9)])
    np.testing.assert_allclose(sums, expected, rtol=1e-12, atol=1e-9)
    assert first.inertia == pytest.approx(d2.min(1).sum(), rel=1e-5)
    assert changed == len(x)
    moved = centroids.copy()
    moved[0] += 3.0
    second, _, changed = assign(points, moved, first)
    assert changed == int(np.count_nonzero(points.concat(second.labels) != labels)) > 0
