"""Pure k-means kernels on one block of points (float32 rows), shared by every driver.

Each function takes one block and returns per-point arrays of that block or small per-cluster /
per-candidate summaries, so a driver can run it on one in-memory array or on many object-store
blocks in parallel (:mod:`ray_ssl.curation.blocks`) and combine the results. Sums are float64, as
the reference implementation (facebookresearch/ssl-data-curation, ``high_precision: float64``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from ray_ssl.curation.blocks import as_points

DISTANCE_BLOCK_BYTES = 64 << 20  # one rows x k float32 block of scores per GEMM
MAX_DISTANCE_ROWS = 4096  # more rows per GEMM gain nothing (measured in benchmarks/kmeans.py)
# Rows converted to float64 and summed at a time by cluster_sums: a chunk that stays in cache
# (100k x 128 rows, k = 2000, one thread: 22 ms in chunks of 4096 rows, 64 ms in chunks of 65536).
SUM_CHUNK_ROWS = 4096
# Below this many multiply-adds numpy's BLAS call beats torch (MKL), whose OpenMP pool costs up to
# milliseconds per call on a busy machine; above it MKL's GEMM is faster (benchmarks/kmeans.py).
TORCH_MIN_GEMM_FLOPS = 1 << 24
# k-means++ steps up to this many multiply-adds run on one BLAS thread: these thin products are
# memory-bound and a thread pool costs more than it gains, far more on a busy machine (20000 x
# 128 by 9: 5 ms on one numpy thread, 32 ms through torch's pool, 61 ms numpy's, load ~20).
ONE_THREAD_MAX_MACS = 1 << 28
# weighted_kmeans_plusplus precomputes the points' Gram matrix up to this size (8192 points):
# k-means||'s candidates then recluster by row reads (5000 for k = 2000: 0.37 s, not 1.23 s of
# per-step thin GEMMs; RESULTS.md).
GRAM_MAX_BYTES = 256 << 20
FLOAT32_BYTES = 4
# splitmix64 constants (Steele et al., "Fast splittable pseudorandom number generators", 2014)
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_DOUBLE_BITS = 53


def squared_norms(x: np.ndarray) -> np.ndarray:
    """||x_i||^2 of every row as float64 (summed in x's dtype, as scikit-learn's row_norms)."""
    return np.einsum("ij,ij->i", x, x).astype(np.float64)


def _rows_per_gemm(k: int) -> int:
    return int(max(1, min(MAX_DISTANCE_ROWS, DISTANCE_BLOCK_BYTES // (4 * max(k, 1)))))


def assign_nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each row's nearest centroid (int64) and the squared distance to it (float32).

    argmin_j ||x - c_j||^2 = argmin_j (||c_j||^2 - 2 x.c_j), computed as one BLAS GEMM of [x, 1]
    with [-2c, ||c||^2]^T per block of rows, so the score matrix is written once and scanned once.
    """
    x = as_points(x)
    n, dim = x.shape
    k = centroids.shape[0]
    labels = np.empty(n, np.int64)
    best_scores = np.empty(n, np.float32)
    if n == 0:
        return labels, best_scores
    c = as_points(centroids)
    weights = np.ascontiguousarray(np.concatenate([-2.0 * c, (c * c).sum(1, keepdims=True)], 1).T)
    rows = min(_rows_per_gemm(k), n)
    augmented = np.ones((rows, dim + 1), np.float32)
    scores = np.empty((rows, k), np.float32)
    big = n * k * dim >= TORCH_MIN_GEMM_FLOPS
    for start in range(0, n, rows):
        m = min(rows, n - start)
        augmented[:m, :dim] = x[start : start + m]
        block = scores[:m]
        if big:
            torch.mm(_tensor(augmented[:m]), _tensor(weights), out=_tensor(block))
        else:
            np.matmul(augmented[:m], weights, out=block)
        best = block.argmin(axis=1)  # numpy's row argmin is vectorised; torch's is slower on CPU
        labels[start : start + m] = best
        best_scores[start : start + m] = block[np.arange(m), best]
    sqdist = best_scores.astype(np.float64) + squared_norms(x)
    return labels, np.maximum(sqdist, 0.0).astype(np.float32)


def _matmul_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b.T in float32: MKL through torch for large products, numpy's BLAS for small ones."""
    if a.shape[0] * b.shape[0] * a.shape[1] >= TORCH_MIN_GEMM_FLOPS:
        return (_tensor(a) @ _tensor(b).T).numpy()
    return a @ b.T


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A zero-copy tensor view of ``array``, also of the read-only arrays of Ray's object store
    (torch warns about those; the view is only read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [len(y), len(x)], float64 (float32 GEMM, float64 combine)."""
    x, y = as_points(x), as_points(y)
    dist = _matmul_t(y, x).astype(np.float64)
    dist *= -2.0
    dist += squared_norms(y)[:, None]
    dist += squared_norms(x)[None, :]
    return np.maximum(dist, 0.0, out=dist)


def candidate_potentials(
    x: np.ndarray, closest: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ local trials on one block: for each candidate centre, every point's new
    squared distance to its closest centre [t, n] and the block's potential (their sum) [t]."""
    dist = squared_distances(x, candidates)
    np.minimum(dist, closest[None, :], out=dist)
    return dist, dist.sum(axis=1)


def n_local_trials(k: int) -> int:
    """Candidates per k-means++ step: 2 + ln k (Arthur & Vassilvitskii 2007; scikit-learn)."""
    return 2 + int(np.log(k))


def locate(cumulative: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index i of the first ``cumulative[i] >= value`` (D^2 sampling), clipped to the last."""
    return np.minimum(np.searchsorted(cumulative, values), len(cumulative) - 1)


def pick_weighted(
    x: np.ndarray, closest: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows drawn with probability proportional to ``closest``: ``values`` are positions in
    [0, closest.sum()); returns their local indices and the rows."""
    ids = locate(np.cumsum(closest), values)
    return ids, as_points(x)[ids]


def weighted_kmeans_plusplus(
    x: np.ndarray,
    weights: np.ndarray,
    k: int,
    rng: np.random.Generator,
    gram_max_bytes: int = GRAM_MAX_BYTES,
) -> np.ndarray:
    """Greedy k-means++ on weighted points (scikit-learn's ``_kmeans_plusplus`` with
    ``sample_weight``): the first centre drawn with probability w / sum w, then per step 2 + ln k
    candidates with probability w D(x)^2 / sum w D^2, keeping the one that leaves the smallest
    weighted potential sum w min(D^2, d(x, candidate)^2). Runs in this process; when the points'
    float32 Gram matrix fits in ``gram_max_bytes`` it is computed once by one GEMM and each step
    reads its candidates' rows of it, else each step runs one thin GEMM."""
    x = as_points(x)
    w = np.asarray(weights, np.float64)
    trials = n_local_trials(k)
    norms = squared_norms(x)
    gram = _matmul_t(x, x) if len(x) ** 2 * FLOAT32_BYTES <= gram_max_bytes else None
    small = len(x) * x.shape[1] * trials < ONE_THREAD_MAX_MACS
    with threadpool_limits(limits=1 if small else None):

        def distances_to(ids: np.ndarray) -> np.ndarray:  # [len(ids), n] float64
            if gram is not None:
                dist = gram[ids].astype(np.float64)
            else:  # x @ x[ids].T: the faster orientation of this thin product
                thin = x @ x[ids].T if small else (_tensor(x) @ _tensor(x[ids]).T).numpy()
                dist = np.array(thin.T, dtype=np.float64, order="C")
            dist *= -2.0
            dist += norms[None, :]
            dist += norms[ids][:, None]
            return np.maximum(dist, 0.0, out=dist)

        chosen = np.empty(k, np.int64)
        chosen[0] = locate(np.cumsum(w), rng.random(1) * w.sum())[0]
        closest = distances_to(chosen[:1])[0]
        for c in range(1, k):
            potential = w * closest
            ids = locate(np.cumsum(potential), rng.random(trials) * potential.sum())
            dist = distances_to(ids)
            np.minimum(dist, closest[None, :], out=dist)
            best = int(np.argmin(dist @ w))
            chosen[c], closest = ids[best], dist[best]
    return x[chosen]


def cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float64 sums of the rows [k, d] and int64 counts [k].

    One float64 ``index_add_`` per chunk of rows: each sum accumulates its rows in row order, so
    the result is deterministic (15 -> 9 ms per 20k x 64 block against sorting then
    ``np.add.reduceat``, measured on one core).
    """
    x = as_points(x)
    sums = torch.zeros((k, x.shape[1]), dtype=torch.float64)
    index = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    for start in range(0, len(x), SUM_CHUNK_ROWS):
        rows = torch.from_numpy(x[start : start + SUM_CHUNK_ROWS]).double()
        sums.index_add_(0, index[start : start + SUM_CHUNK_ROWS], rows)
    return sums.numpy(), np.bincount(labels, minlength=k).astype(np.int64)


def update_centroids(sums: np.ndarray, counts: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Lloyd's update: cluster means; an empty cluster keeps its previous centroid (as the
    reference implementation does)."""
    means = previous.astype(np.float64, copy=True)
    filled = counts > 0
    means[filled] = sums[filled] / counts[filled, None]
    return means.astype(np.float32)


def uniform_keys(seed: int, ids: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) number per id from splitmix64(seed, id): counter-based, so a point gets
    the same key whichever block holds it."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) * _GOLDEN_GAMMA + (ids.astype(np.uint64) + np.uint64(1)) * _GOLDEN_GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(64 - _DOUBLE_BITS)).astype(np.float64) / float(2**_DOUBLE_BITS)


def rank_in_group(groups: np.ndarray, keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rank of every row within its group when ordered by (key, id); 0 = smallest."""
    order = np.lexsort((ids, keys, groups))
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    lengths = np.diff(np.r_[starts, len(order)])
    ranks = np.empty(len(order), np.int64)
    ranks[order] = np.arange(len(order)) - np.repeat(starts, lengths)
    return ranks


def smallest_per_group(
    groups: np.ndarray, keys: np.ndarray, ids: np.ndarray, quota: int | np.ndarray
) -> np.ndarray:
    """Mask of the rows among the ``quota`` (per group when an array) smallest (key, id) of
    their group: closest-to-centroid or uniformly random picks per cluster."""
    if len(groups) == 0:
        return np.zeros(0, bool)
    limit = quota[groups] if isinstance(quota, np.ndarray) else quota
    return rank_in_group(groups, keys, ids) < limit
