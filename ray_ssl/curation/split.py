"""Splitting every cluster of a level into at most ``n_splits`` sub-clusters.

This is how the reference implementation reaches 10M clusters at level 1 of its web-scale
hierarchy (facebookresearch/ssl-data-curation, ``scripts/split_clusters.py`` with
``configs/4levels_web_based_images.yaml``: k-means with 100k clusters, then k-means with
min(100, size) clusters inside each of them); k-means++ seeding of 10M centres directly would take
10M sequential steps. On Ray the points are regrouped by cluster without leaving the object store:
every block cuts its rows into buckets of clusters, one task per bucket runs the small k-means of
its clusters, and the driver only renumbers. Empty sub-clusters are dropped, as in the reference.
Each cluster's k-means draws from its own stream (seed, cluster), so the result does not depend on
how the clusters were bucketed. Each cluster keeps the best (lowest inertia) of ``n_init`` k-means
runs, as the reference's ``kmeans_gpu.kmeans`` (``num_init=10``) that ``split_clusters.py`` calls.
"""

from __future__ import annotations

import numpy as np

from ray_ssl.curation.blocks import LocalExecutor, PointSet
from ray_ssl.curation.hkmeans import (
    DEFAULT_INIT,
    SEED_BOUND,
    Assignment,
    InitSpec,
    KMeansResult,
    kmeans,
)

Bucket = tuple[np.ndarray, np.ndarray, np.ndarray]  # global ids, cluster labels, rows


def _bucket_block(
    x: np.ndarray, labels: np.ndarray, offset: int, n_buckets: int
) -> tuple[Bucket, ...] | Bucket:
    """This block's rows grouped by ``cluster % n_buckets``."""
    ids = offset + np.arange(len(labels), dtype=np.int64)
    bucket = labels % n_buckets
    parts = tuple(
        (ids[bucket == b], labels[bucket == b], np.asarray(x, np.float32)[bucket == b])
        for b in range(n_buckets)
    )
    return parts if n_buckets > 1 else parts[0]


def best_of(
    points: PointSet, k: int, rng: np.random.Generator, iterations: int, init: InitSpec, n_init: int
) -> KMeansResult:
    """The lowest-inertia result of ``n_init`` k-means runs drawn one after another from ``rng``
    (the first on a tie)."""
    runs = [kmeans(points, k, rng, iterations, init) for _ in range(n_init)]
    return min(runs, key=lambda run: run.assignment.inertia)


def _split_bucket(
    seed: int, n_splits: int, iterations: int, init: InitSpec, n_init: int, *parts: Bucket
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """k-means with min(n_splits, size) clusters inside every cluster of this bucket.

    Returns, per point: global id, cluster, sub-cluster, squared distance; per non-empty
    sub-cluster: its cluster and its centroid (ordered by cluster, then sub-cluster)."""
    ids = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    rows = np.concatenate([p[2] for p in parts])
    subs, sqdist = np.zeros(len(ids), np.int64), np.zeros(len(ids), np.float32)
    parents, centroids = [], []
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        members = members[np.argsort(ids[members])]  # global order, whatever the bucketing
        rng = np.random.default_rng([seed, int(cluster)])
        k = min(n_splits, len(members))
        points = PointSet.from_array(rows[members], LocalExecutor())
        result = best_of(points, k, rng, iterations, init, n_init)
        local_labels = np.concatenate(result.assignment.labels)
        kept = np.flatnonzero(result.assignment.counts > 0)
        renumber = np.full(k, -1, np.int64)
        renumber[kept] = np.arange(len(kept))
        subs[members] = renumber[local_labels]
        sqdist[members] = np.concatenate(result.assignment.sqdist)
        parents.append(np.full(len(kept), cluster, np.int64))
        centroids.append(result.centroids[kept])
    dim = rows.shape[1] if rows.ndim == 2 else 0
    return (
        ids,
        labels,
        subs,
        sqdist,
        np.concatenate(parents) if parents else np.zeros(0, np.int64),
        np.concatenate(centroids) if centroids else np.zeros((0, dim), np.float32),
    )


def split_clusters(
    points: PointSet,
    result: KMeansResult,
    n_splits: int,
    rng: np.random.Generator,
    iterations: int,
    init: InitSpec = DEFAULT_INIT,
    n_init: int = 1,
) -> KMeansResult:
    """Replace every cluster of ``result`` by the non-empty clusters of the best of ``n_init``
    k-means runs with min(n_splits, size) clusters on its points; clusters are numbered cluster
    by cluster."""
    ex = points.executor
    seed = int(rng.integers(SEED_BOUND))
    n_buckets = len(points.blocks)
    cut = points.map(
        _bucket_block,
        result.assignment.labels,
        points.offsets,
        shared=(n_buckets,),
        num_returns=n_buckets,
    )
    per_bucket = [
        [c[b] for c in cut] if n_buckets > 1 else [c for c in cut] for b in range(n_buckets)
    ]
    outs = ex.get(
        ex.map(_split_bucket, [(seed, n_splits, iterations, init, n_init, *p) for p in per_bucket])
    )
    ids, labels, subs, sqdist, parents, centroids = (
        np.concatenate([o[i] for o in outs]) for i in range(6)
    )
    order = np.argsort(parents, kind="stable")  # cluster by cluster, sub-clusters in order
    centroids, parents = centroids[order], parents[order]
    first_sub = np.searchsorted(parents, np.arange(len(result.centroids)))
    new_labels = np.empty(points.n, np.int64)
    new_labels[ids] = first_sub[labels] + subs
    new_sqdist = np.empty(points.n, np.float32)
    new_sqdist[ids] = sqdist
    bounds = np.r_[points.offsets, points.n]
    blocks = range(len(points.blocks))
    assignment = Assignment(
        [ex.put(new_labels[bounds[i] : bounds[i + 1]]) for i in blocks],
        [ex.put(new_sqdist[bounds[i] : bounds[i + 1]]) for i in blocks],
        np.bincount(new_labels, minlength=len(centroids)),
        float(new_sqdist.sum(dtype=np.float64)),
    )
    return KMeansResult(centroids, assignment, result.iterations)
