"""k-means kernels and single-process k-means against brute force and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits, make_blobs
from sklearn.metrics import adjusted_rand_score

from ray_ssl.curation.blocks import LocalExecutor, PointSet
from ray_ssl.curation.hkmeans import kmeans, kmeans_plusplus
from ray_ssl.curation.kmeans import (
    TORCH_MIN_GEMM_FLOPS,
    assign_nearest,
    candidate_potentials,
    cluster_sums,
    n_local_trials,
    pick_weighted,
    smallest_per_group,
    squared_distances,
    uniform_keys,
    update_centroids,
    weighted_kmeans_plusplus,
)


def brute_sqdist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    return ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)


def local(x: np.ndarray, blocks: int = 1) -> PointSet:
    return PointSet.from_array(x, LocalExecutor(), blocks)


@pytest.mark.parametrize("n,k,d", [(500, 7, 5), (3000, 130, 50)])  # numpy / torch GEMM path
def test_assign_nearest_matches_brute_force(n: int, k: int, d: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    c = rng.standard_normal((k, d)).astype(np.float32)
    assert (n * k * d >= TORCH_MIN_GEMM_FLOPS) == (n == 3000)
    labels, sqdist = assign_nearest(x, c)
    dist = brute_sqdist(x, c)
    best = dist.min(1)
    # a label may differ from brute force only on a float32 near-tie
    assert np.all(dist[np.arange(n), labels] <= best + 1e-4 * (1 + best))
    np.testing.assert_allclose(sqdist, best, rtol=1e-4, atol=1e-3)


def test_squared_distances_and_candidate_potentials() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 6)).astype(np.float32)
    y = rng.standard_normal((5, 6)).astype(np.float32)
    np.testing.assert_allclose(squared_distances(x, y), brute_sqdist(y, x), rtol=1e-5, atol=1e-4)
    closest = rng.random(400) * 5
    dist, pots = candidate_potentials(x, closest, y)
    expected = np.minimum(brute_sqdist(y, x), closest[None])
    np.testing.assert_allclose(dist, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(pots, expected.sum(1), rtol=1e-6)


def test_pick_weighted_is_d2_sampling() -> None:
    x = np.arange(8, dtype=np.float32)[:, None]
    weights = np.array([0.0, 1.0, 0.0, 3.0, 0.0, 0.0, 2.0, 0.0])
    ids, rows = pick_weighted(x, weights, np.array([0.5, 1.0, 1.01, 3.99, 4.5, 6.0, 7.0]))
    assert ids.tolist() == [1, 1, 3, 3, 6, 6, 7]  # beyond the total: clipped to the last row
    assert rows[:, 0].tolist() == ids.tolist()


def test_cluster_sums_and_update_keep_empty_clusters() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1000, 4)).astype(np.float32)
    labels = rng.integers(0, 5, 1000)
    labels[labels == 3] = 4  # cluster 3 empty
    sums, counts = cluster_sums(x, labels, 6)
    expected = np.zeros((6, 4))
    np.add.at(expected, labels, x.astype(np.float64))
    np.testing.assert_allclose(sums, expected, rtol=1e-12, atol=1e-10)
    assert counts.tolist() == np.bincount(labels, minlength=6).tolist()
    previous = rng.standard_normal((6, 4)).astype(np.float32)
    means = update_centroids(sums, counts, previous)
    np.testing.assert_array_equal(means[[3, 5]], previous[[3, 5]])
    np.testing.assert_allclose(means[0], x[labels == 0].mean(0), rtol=1e-5, atol=1e-6)


def test_uniform_keys_are_counter_based_and_uniform() -> None:
    ids = np.arange(200_000)
    keys = uniform_keys(7, ids)
    assert keys.min() >= 0 and keys.max() < 1
    np.testing.assert_array_equal(keys[1000:1010], uniform_keys(7, ids[1000:1010]))
    assert not np.array_equal(keys[:100], uniform_keys(8, ids[:100]))
    counts = np.bincount((keys * 10).astype(int), minlength=10)
    assert np.all(np.abs(counts - 20_000) < 600)  # ~4 sigma of a binomial(200k, 0.1)


def test_smallest_per_group_matches_sorting() -> None:
    rng = np.random.default_rng(3)
    groups, keys = rng.integers(0, 20, 500), rng.random(500)
    ids = np.arange(500)
    quota = rng.integers(0, 6, 20)
    mask = smallest_per_group(groups, keys, ids, quota)
    for g in range(20):
        members = np.flatnonzero(groups == g)
        expected = members[np.argsort(keys[members])][: quota[g]]
        assert set(np.flatnonzero(mask & (groups == g))) == set(expected)


def test_kmeans_recovers_planted_clusters() -> None:
    x, truth = make_blobs(3000, n_features=10, centers=12, cluster_std=0.5, random_state=4)
    result = kmeans(local(x, 3), 12, np.random.default_rng(0), iterations=30)
    labels = np.concatenate(result.assignment.labels)
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    assert result.assignment.counts.sum() == 3000


def test_kmeans_plusplus_picks_distinct_data_points() -> None:
    x, _ = make_blobs(800, n_features=3, centers=5, random_state=5)
    x = x.astype(np.float32)
    centers = kmeans_plusplus(local(x), 40, np.random.default_rng(1))
    matches = (brute_sqdist(centers, x) == 0).any(1)
    assert matches.all() and len(np.unique(centers, axis=0)) == 40
    assert n_local_trials(40) == 2 + int(np.log(40))


def test_inertia_close_to_scikit_learn() -> None:
    x = load_digits().data.astype(np.float32)
    ours = [
        kmeans(local(x, 2), 10, np.random.default_rng(s), iterations=100).assignment.inertia
        for s in range(3)
    ]
    theirs = [KMeans(10, n_init=1, random_state=s).fit(x).inertia_ for s in range(3)]
    assert np.mean(ours) == pytest.approx(np.mean(theirs), rel=0.03)
    assert min(ours) <= 1.03 * min(theirs)


def test_weighted_kmeans_plusplus_gram_matrix_and_thin_products_agree() -> None:
    x, _ = make_blobs(600, n_features=16, centers=40, random_state=3)
    x = x.astype(np.float32)
    weights = np.random.default_rng(1).integers(1, 50, len(x))
    for seed in range(2):
        with_gram = weighted_kmeans_plusplus(x, weights, 40, np.random.default_rng(seed))
        thin = weighted_kmeans_plusplus(
            x, weights, 40, np.random.default_rng(seed), gram_max_bytes=0
        )
        np.testing.assert_array_equal(with_gram, thin)


def test_weighted_kmeans_plusplus_treats_weights_as_multiplicities() -> None:
    x, _ = make_blobs(120, n_features=4, centers=6, random_state=6)
    x = x.astype(np.float32)
    weights = np.random.default_rng(0).integers(1, 5, len(x))
    for seed in range(3):
        weighted = weighted_kmeans_plusplus(x, weights, 10, np.random.default_rng(seed))
        repeated = weighted_kmeans_plusplus(
            np.repeat(x, weights, axis=0), np.ones(weights.sum()), 10, np.random.default_rng(seed)
        )
        np.testing.assert_array_equal(weighted, repeated)
        assert (
            len(np.unique(weighted, axis=0)) == 10 and (brute_sqdist(weighted, x).min(1) == 0).all()
        )
