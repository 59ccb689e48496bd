"""Distributed k-means with resampling: one level of hierarchical k-means (Vo et al., arXiv
2405.15613; :mod:`ray_ssl.curation.hierarchy` stacks the levels).

A level runs k-means (k-means|| seeding by default - Bahmani et al., "Scalable K-Means++", VLDB
2012 - or the reference's greedy k-means++ with 2 + ln k local trials, then Lloyd iterations)
followed by R resampling steps: take ``sample_size`` points of every cluster (closest to the
centroid or at random), run k-means on them alone, and reassign all points to the new centroids -
which moves centroids from dense regions towards a uniform cover of the data's support. The order
of steps follows the reference implementation, facebookresearch/ssl-data-curation
(``src/hierarchical_kmeans_gpu.py``, ``src/distributed_kmeans_gpu.py``).

Everything here is written against :class:`~ray_ssl.curation.blocks.PointSet`: with a
RayExecutor the points stay in the object store as blocks, assignment runs as one task per block,
per-cluster float64 sums and counts are reduced by a tree of tasks, so a Lloyd iteration is one
wave of tasks and one fetch. k-means|| runs on a uniform subsample of about
``curation.init_points_per_cluster`` points per cluster (one wave; its blocks stay put) and takes
a fixed number of rounds (``curation.init_rounds``, 5 by default as in the paper's experiments) of
l = ``curation.init_oversampling`` * k expected draws, each one distance pass of tasks over the
blocks plus one cheap sampling wave, then reclusters the ~rounds * l weighted candidates in this
process; the greedy k-means++ instead takes two waves of tasks per centre (k sequential steps),
which is why it does not scale on Ray. Random draws happen in this process or come from
counter-based keys of the global row ids, so a distributed run reproduces a single-process run
with the same seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ray_ssl.curation.blocks import Handle, LocalExecutor, PointSet
from ray_ssl.curation.errors import CurationError
from ray_ssl.curation.kmeans import (
    assign_nearest,
    candidate_potentials,
    cluster_sums,
    locate,
    n_local_trials,
    pick_weighted,
    smallest_per_group,
    squared_distances,
    uniform_keys,
    update_centroids,
    weighted_kmeans_plusplus,
)

log = logging.getLogger(__name__)

SEED_BOUND = 2**63  # seeds of the counter-based random keys are drawn below this
KMEANS_PARALLEL, KMEANS_PLUSPLUS = "kmeans||", "kmeans++"
INIT_METHODS = (KMEANS_PARALLEL, KMEANS_PLUSPLUS)
# k-means|| rounds r and oversampling l / k. Bahmani et al. 2012, Section 5 (Tables 1-2): r = 5
# rounds with l = k/2 or l = 2k seed as well as k-means++. l = k/2: each round's distance pass
# costs half a Lloyd iteration (2k: two) and the driver reclusters ~2.5k candidates, not ~10k
# (benchmarks/kmeans_init.py, RESULTS.md: same final inertia, a third of the seeding time).
# Apache Spark uses r = 2 (SPARK-17389, apache/spark#14956), but the local curation demo's
# per-level "curated beats random" check failed with r = 2 and l = 2k, so r stays 5.
PARALLEL_ROUNDS, PARALLEL_OVERSAMPLING = 5, 0.5
# k-means|| seeds on a uniform subsample of about this many points per cluster when the data has
# more (0: on all points), as scikit-learn's MiniBatchKMeans seeds on init_size = 3k points and
# faiss trains on at most 256 points per centroid: the seeding's distance passes then cost a
# fixed k x (this) x l per round, not n x l, while Lloyd still runs on all points.
PARALLEL_POINTS_PER_CLUSTER = 32


@dataclass(frozen=True)
class LevelSpec:
    """One level of the hierarchy."""

    n_clusters: int
    n_resampling_steps: int = 0
    sample_size: int = 1
    n_splits: int = 1  # > 1: then split every cluster in at most this many (ray_ssl.curation.split)


@dataclass(frozen=True)
class InitSpec:
    """How k-means picks its initial centroids."""

    method: str = KMEANS_PARALLEL  # "kmeans||" (scales on Ray) or "kmeans++" (the reference's)
    rounds: int = PARALLEL_ROUNDS  # k-means||: oversampling rounds r
    oversampling: float = PARALLEL_OVERSAMPLING  # k-means||: l / k, expected draws per round
    points_per_cluster: int = PARALLEL_POINTS_PER_CLUSTER  # k-means||: subsample size / k (0: all)


DEFAULT_INIT = InitSpec()


@dataclass
class Assignment:
    """Nearest-centroid assignment of a PointSet: per-block handles plus global summaries."""

    labels: list[Handle]  # int64 per block
    sqdist: list[Handle]  # float32 squared distance to the assigned centroid, per block
    counts: np.ndarray  # points per cluster
    inertia: float  # sum of squared distances


@dataclass
class KMeansResult:
    centroids: np.ndarray  # float32 [k, d]
    assignment: Assignment
    iterations: int  # Lloyd updates run (the last k-means of the level)


def _check_k(k: int, n: int, what: str = "points") -> None:
    if k < 1:
        raise CurationError(f"k-means needs at least 1 cluster, got {k}")
    if k > n:
        raise CurationError(
            f"k-means asked for {k} clusters of only {n} {what}; use at most {n} clusters "
            "(curation.n_clusters) or more data"
        )


# ---- kernels run per block (module-level so that Ray pickles them by reference) ----


def _assign_block(
    x: np.ndarray, previous: np.ndarray | None, centroids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Lloyd step on one block: labels, squared distances and the block's summary
    (:func:`pack_summary`), so that a Lloyd iteration is one wave of tasks and one fetch."""
    labels, sqdist = assign_nearest(x, centroids)
    sums, counts = cluster_sums(x, labels, len(centroids))
    changed = len(labels) if previous is None else int(np.count_nonzero(labels != previous))
    return labels, sqdist, pack_summary(sums, counts, sqdist.sum(dtype=np.float64), changed)


def pack_summary(sums: np.ndarray, counts: np.ndarray, inertia: float, changed: int) -> np.ndarray:
    """Per-cluster float64 sums [k, d], counts [k], inertia and changed labels as one float64
    vector, whose elementwise sum over blocks is the summary of their union (counts stay exact
    below 2^53 points)."""
    return np.concatenate([sums.ravel(), counts.astype(np.float64), [inertia, changed]])


def unpack_summary(summary: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    """The inverse of :func:`pack_summary`: sums [k, d], counts [k], inertia, changed."""
    dim = (len(summary) - k - 2) // k
    sums = summary[: k * dim].reshape(k, dim)
    counts = summary[k * dim : k * dim + k].astype(np.int64)
    return sums, counts, float(summary[-2]), int(summary[-1])


def _kpp_start(x: np.ndarray, center: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    closest = squared_distances(x, center)  # [1, n]
    return closest, closest.sum(axis=1)


def _kpp_try(
    x: np.ndarray, stack: np.ndarray, row: int, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    return candidate_potentials(x, stack[row], candidates)


def _kpp_pick(
    x: np.ndarray, stack: np.ndarray, row: int, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    return pick_weighted(x, stack[row], values)


def _parallel_update(
    x: np.ndarray,
    closest: np.ndarray | None,
    nearest: np.ndarray | None,
    offset: int,
    new_rows: np.ndarray,
    new_ids: np.ndarray,
    first_index: int,
    n_candidates: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """k-means|| distance pass on one block: d^2(x, C) and x's nearest candidate after adding
    ``new_rows`` (candidates ``first_index``...), the block's potential, and with
    ``n_candidates`` > 0 the points per candidate (the weights of Algorithm 2, line 7)."""
    n = len(x)
    if closest is None:
        closest, nearest = np.full(n, np.inf, np.float32), np.zeros(n, np.int64)
    if len(new_rows):
        labels, sqdist = assign_nearest(x, new_rows)
        local = new_ids - offset  # a candidate is in C: distance 0 exactly, not GEMM round-off
        mine = (local >= 0) & (local < n)
        sqdist[local[mine]], labels[local[mine]] = 0.0, np.flatnonzero(mine)
        closer = sqdist < closest
        closest = np.where(closer, sqdist, closest)
        nearest = np.where(closer, first_index + labels, nearest)
    counts = np.bincount(nearest, minlength=n_candidates) if n_candidates else np.zeros(0, np.int64)
    return closest, nearest, np.array([closest.sum(dtype=np.float64)]), counts


def _parallel_sample(
    x: np.ndarray, closest: np.ndarray, offset: int, seed: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """This block's draws of one k-means|| round: every point independently with probability
    ``scale`` * d^2(x, C), scale = l / phi_X(C), using its counter-based key."""
    ids = offset + np.arange(len(closest), dtype=np.int64)
    # Algorithm 2, line 4: sample x with probability p_x = l d^2(x, C) / phi_X(C)
    picked = uniform_keys(seed, ids) < scale * closest.astype(np.float64)
    return ids[picked], np.asarray(x, np.float32)[picked]


def _sample_block(
    x: np.ndarray, offset: int, seed: int, fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """The block's rows whose counter-based key is below ``fraction``, and how many there are."""
    ids = offset + np.arange(len(x), dtype=np.int64)
    rows = np.asarray(x, np.float32)[uniform_keys(seed, ids) < fraction]
    return rows, np.array([len(rows)])


def _take_rows(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32)[ids]


def _resample_block(
    labels: np.ndarray, sqdist: np.ndarray, offset: int, quota: int, strategy: str, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This block's candidates for the per-cluster sample: its own ``quota`` best per cluster."""
    ids = offset + np.arange(len(labels), dtype=np.int64)
    keys = sqdist.astype(np.float64) if strategy == "closest" else uniform_keys(seed, ids)
    keep = smallest_per_group(labels, keys, ids, quota)
    return labels[keep], keys[keep], ids[keep]


# ---- drivers ----


def _split_by_block(points: PointSet, global_ids: np.ndarray) -> list[np.ndarray]:
    """Sorted global row ids -> local ids per block."""
    bounds = np.r_[points.offsets, points.n]
    cuts = np.searchsorted(global_ids, bounds)
    return [global_ids[cuts[i] : cuts[i + 1]] - bounds[i] for i in range(len(points.blocks))]


def rows_at(points: PointSet, global_ids: np.ndarray) -> np.ndarray:
    """The rows with the given global indices, in the given order."""
    order = np.argsort(global_ids, kind="stable")
    local = _split_by_block(points, global_ids[order])
    hit = [i for i, ids in enumerate(local) if len(ids)]
    ex = points.executor
    parts = ex.get(ex.map(_take_rows, [(points.blocks[i], local[i]) for i in hit]))
    rows = np.empty((len(global_ids), points.dim), np.float32)
    rows[order] = np.concatenate(parts)
    return rows


def assign(
    points: PointSet, centroids: np.ndarray, previous: Assignment | None = None
) -> tuple[Assignment, np.ndarray, int]:
    """Assign every point to its nearest centroid; also returns the float64 per-cluster sums
    (for the next Lloyd update) and how many labels changed since ``previous``."""
    prev = previous.labels if previous is not None else [None] * len(points.blocks)
    outs = points.map(_assign_block, prev, shared=(centroids,), num_returns=3)
    sums, counts, inertia, changed = unpack_summary(
        points.executor.sum([o[2] for o in outs]), len(centroids)
    )
    return Assignment([o[0] for o in outs], [o[1] for o in outs], counts, inertia), sums, changed


def init_sample_size(n: int, k: int, points_per_cluster: int) -> int:
    """Expected size of the subsample k-means|| seeds on: n when it is all the points."""
    return n if points_per_cluster <= 0 else min(n, points_per_cluster * k)


def uniform_subsample(points: PointSet, size: int, rng: np.random.Generator) -> PointSet:
    """About ``size`` of the points, each kept independently with probability size / n by its
    counter-based key (the same rows whichever block holds them), in global row order, as a
    PointSet whose blocks stay where the points are: one wave of tasks."""
    ex = points.executor
    seed = int(rng.integers(SEED_BOUND))
    outs = points.map(_sample_block, points.offsets, shared=(seed, size / points.n), num_returns=2)
    sizes = np.array([int(c[0]) for c in ex.get([o[1] for o in outs])], dtype=np.int64)
    kept = np.flatnonzero(sizes)
    return PointSet(ex, [outs[i][0] for i in kept], sizes[kept], points.dim)


def kmeans_plusplus(points: PointSet, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (scikit-learn's ``_kmeans_plusplus``), distributed over blocks.

    Each step draws 2 + ln k candidates with probability D(x)^2 / sum D^2 - the block from the
    per-block totals, the row inside it by a task on that block - then every block returns the
    potential each candidate would leave on it, and the candidate with the smallest total wins.
    """
    _check_k(k, points.n)
    ex = points.executor
    trials = n_local_trials(k)
    centers = np.empty((k, points.dim), np.float32)
    centers[0] = rows_at(points, np.array([rng.integers(points.n)]))[0]
    outs = points.map(_kpp_start, shared=(centers[:1],), num_returns=2)
    stacks = [o[0] for o in outs]  # per block: candidate-distance stack of the last step
    row = 0  # the stack row of the chosen candidate
    totals = np.array([p[0] for p in ex.get([o[1] for o in outs])])  # potential per block
    for c in tqdm(range(1, k), desc="k-means++", unit="centre", disable=None, leave=False):
        values = rng.random(trials) * totals.sum()
        cumulative = np.cumsum(totals)
        block_of = locate(cumulative, values)
        residual = values - np.r_[0.0, cumulative[:-1]][block_of]
        hit = np.unique(block_of)
        picks = ex.get(
            ex.map(
                _kpp_pick,
                [(points.blocks[b], stacks[b], row, residual[block_of == b]) for b in hit],
            )
        )
        candidates = np.empty((trials, points.dim), np.float32)
        for b, (_, rows) in zip(hit, picks, strict=True):
            candidates[block_of == b] = rows
        outs = points.map(
            _kpp_try, stacks, [row] * len(stacks), shared=(candidates,), num_returns=2
        )
        potentials = np.stack(ex.get([o[1] for o in outs]))  # [blocks, trials]
        best = int(np.argmin(potentials.sum(axis=0)))
        centers[c] = candidates[best]
        stacks, row, totals = [o[0] for o in outs], best, potentials[:, best]
    return centers


@dataclass
class Candidates:
    """What k-means|| oversampling gathers: rows, their global ids and their weights."""

    rows: np.ndarray  # float32 [m, d], in the order drawn (round by round, global row order)
    ids: np.ndarray  # int64 [m]
    weights: np.ndarray  # int64 [m]: points nearest to each candidate (ties: the earlier one)


def parallel_candidates(
    points: PointSet,
    k: int,
    rng: np.random.Generator,
    rounds: int = PARALLEL_ROUNDS,
    oversampling: float = PARALLEL_OVERSAMPLING,
) -> Candidates:
    """Lines 1-7 of k-means|| (Bahmani et al., VLDB 2012, Algorithm 2) over the blocks.

    ``rounds`` times, every point joins the candidates independently with probability
    l d^2(x, C) / phi_X(C), l = ``oversampling`` * k: one sampling wave (counter-based keys of
    the global row ids) and one distance pass of tasks per round, about l new candidates each;
    the last pass also counts the points nearest to every candidate.
    """
    ex = points.executor
    n_blocks = len(points.blocks)
    ell = oversampling * k
    first = np.array([rng.integers(points.n)])  # Algorithm 2, line 1: C <- one uniform point
    ids, rows = [first], [rows_at(points, first)]
    closest: list[Handle] = [None] * n_blocks
    nearest: list[Handle] = [None] * n_blocks
    new_ids, new_rows, total = first, rows[0], 1
    for step in range(rounds + 1):
        last = step == rounds
        outs = points.map(
            _parallel_update,
            closest,
            nearest,
            points.offsets,
            shared=(new_rows, new_ids, total - len(new_ids), total if last else 0),
            num_returns=4,
        )
        closest, nearest = [o[0] for o in outs], [o[1] for o in outs]
        if last:
            break
        # Algorithm 2, lines 2-3: phi_X(C), the potential of the candidates so far
        phi = float(np.sum(ex.get([o[2] for o in outs])))
        seed = int(rng.integers(SEED_BOUND))
        if phi <= 0.0:  # every point coincides with a candidate: nothing left to draw
            new_ids, new_rows = np.zeros(0, np.int64), np.zeros((0, points.dim), np.float32)
            continue
        drawn = ex.get(
            points.map(_parallel_sample, closest, points.offsets, shared=(seed, ell / phi))
        )
        # Algorithm 2, line 5: C <- C u C' (block order = global row order)
        new_ids = np.concatenate([d[0] for d in drawn])
        new_rows = np.concatenate([d[1] for d in drawn])
        ids.append(new_ids)
        rows.append(new_rows)
        total += len(new_ids)
        log.debug("k-means|| round %d: potential %.6g, %d new candidates", step + 1, phi, total)
    # Algorithm 2, line 7: w_x = the number of points nearer to candidate x than to the others
    weights = ex.sum([o[3] for o in outs])
    return Candidates(np.concatenate(rows), np.concatenate(ids), weights)


def kmeans_parallel(
    points: PointSet,
    k: int,
    rng: np.random.Generator,
    rounds: int = PARALLEL_ROUNDS,
    oversampling: float = PARALLEL_OVERSAMPLING,
    points_per_cluster: int = PARALLEL_POINTS_PER_CLUSTER,
) -> np.ndarray:
    """k-means|| seeding: :func:`parallel_candidates` - on a :func:`uniform_subsample` of about
    ``points_per_cluster`` * k points when there are more (and it has at least k) - then the
    weighted candidates reclustered into k centres by greedy k-means++ in this process
    (Algorithm 2, line 8). Fewer than k candidates (data with fewer distinct points) are topped
    up with uniformly drawn points."""
    _check_k(k, points.n)
    size = init_sample_size(points.n, k, points_per_cluster)
    if size < points.n:
        sample = uniform_subsample(points, size, rng)
        points = sample if sample.n >= k else points
    found = parallel_candidates(points, k, rng, rounds, oversampling)
    log.debug("k-means||: %d weighted candidates for %d centres", len(found.ids), k)
    if len(found.ids) <= k:
        return _top_up(points, found.rows, found.ids, k, rng)
    return weighted_kmeans_plusplus(found.rows, found.weights, k, rng)


def _top_up(
    points: PointSet, rows: np.ndarray, ids: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """The candidates plus uniformly drawn other points, k rows in all."""
    if len(rows) == k:
        return rows
    drawn = rng.choice(points.n, size=min(points.n, k + len(ids)), replace=False)
    extra = np.sort(drawn[~np.isin(drawn, ids)][: k - len(rows)])
    return np.concatenate([rows, rows_at(points, extra)])


def initial_centroids(
    points: PointSet, k: int, rng: np.random.Generator, init: InitSpec = DEFAULT_INIT
) -> np.ndarray:
    """k initial centroids by ``init.method``."""
    if init.method == KMEANS_PARALLEL:
        return kmeans_parallel(
            points, k, rng, init.rounds, init.oversampling, init.points_per_cluster
        )
    if init.method == KMEANS_PLUSPLUS:
        return kmeans_plusplus(points, k, rng)
    raise CurationError(f"curation.init='{init.method}'; use one of {', '.join(INIT_METHODS)}")


def lloyd(
    points: PointSet, centroids: np.ndarray, iterations: int, until_stable: bool = True
) -> KMeansResult:
    """Lloyd iterations from ``centroids``; with ``until_stable`` stops early once no label
    changes (a fixed point), else runs all ``iterations`` (as faiss and the reference do)."""
    assignment, sums, _ = assign(points, centroids)
    done = 0
    for _ in tqdm(range(iterations), desc="Lloyd", unit="iter", disable=None, leave=False):
        centroids = update_centroids(sums, assignment.counts, centroids)
        assignment, sums, changed = assign(points, centroids, assignment)
        done += 1
        if until_stable and changed == 0:
            break
    log.debug("Lloyd: %d iterations, inertia %.6g", done, assignment.inertia)
    return KMeansResult(centroids, assignment, done)


def kmeans(
    points: PointSet,
    k: int,
    rng: np.random.Generator,
    iterations: int,
    init: InitSpec = DEFAULT_INIT,
) -> KMeansResult:
    """Seeding by ``init`` then Lloyd."""
    return lloyd(points, initial_centroids(points, k, rng, init), iterations)


def resample(
    points: PointSet,
    assignment: Assignment,
    sample_size: int,
    strategy: str,
    rng: np.random.Generator,
) -> PointSet:
    """``sample_size`` points of every cluster - the closest to its centroid or a uniform random
    subset - as a new PointSet whose blocks stay where the points are."""
    ex = points.executor
    seed = int(rng.integers(SEED_BOUND)) if strategy == "random" else 0
    args = list(zip(assignment.labels, assignment.sqdist, points.offsets, strict=True))
    parts = ex.get(ex.map(_resample_block, args, shared=(sample_size, strategy, seed)))
    labels, keys, ids = (np.concatenate([p[i] for p in parts]) for i in range(3))
    chosen = np.sort(ids[smallest_per_group(labels, keys, ids, sample_size)])
    return points.subset(_split_by_block(points, chosen))


def in_driver_if_small(points: PointSet, driver_max_points: int) -> PointSet:
    """A point set of at most ``driver_max_points`` rows moves to this process: below that size
    Ray's per-task overhead costs more than the work."""
    if points.executor.distributed and points.n <= driver_max_points:
        return PointSet.from_array(points.gather(), LocalExecutor())
    return points


def kmeans_with_resampling(
    points: PointSet,
    spec: LevelSpec,
    rng: np.random.Generator,
    iterations: int,
    strategy: str = "closest",
    driver_max_points: int = 0,
    init: InitSpec = DEFAULT_INIT,
) -> KMeansResult:
    """k-means, then ``spec.n_resampling_steps`` times: k-means on ``spec.sample_size`` points per
    cluster and reassignment of all points to its centroids (Vo et al., arXiv 2405.15613)."""
    result = kmeans(points, spec.n_clusters, rng, iterations, init)
    for step in range(spec.n_resampling_steps):
        sample = resample(points, result.assignment, spec.sample_size, strategy, rng)
        if sample.n < spec.n_clusters:
            log.warning(
                "resampling step %d: %d points sampled for %d clusters (empty clusters); "
                "keeping the previous centroids",
                step + 1,
                sample.n,
                spec.n_clusters,
            )
            break
        sub = kmeans(
            in_driver_if_small(sample, driver_max_points), spec.n_clusters, rng, iterations, init
        )
        assignment, _, changed = assign(points, sub.centroids, result.assignment)
        log.debug("resampling step %d: %d points changed cluster", step + 1, changed)
        result = KMeansResult(sub.centroids, assignment, sub.iterations)
    return result
