"""Seconds to k-means (initialisation + Lloyd to the same iteration count): ours against faiss.

Same data (N x d float32 Gaussian mixture), same k, same thread count, the same number T of Lloyd
iterations (no early stop on either side):
- ours on Ray, as ``ray-ssl curate`` runs it: the points in ``threads`` object-store blocks,
  k-means|| seeding (Bahmani et al., VLDB 2012: by default on a uniform subsample of 32 points
  per cluster, r = 5 rounds of l = k/2 expected draws, each one distance pass of tasks, then
  weighted greedy k-means++ on the ~2.5k candidates in the driver; ``--init-rounds``,
  ``--init-oversampling`` and ``--init-points-per-cluster`` change r, l / k and the subsample),
  then T Lloyd iterations on all points, each one wave of tasks;
- ``faiss.Kmeans`` with ``threads`` OpenMP threads: its default initialisation (k distinct random
  training points), exact L2 search, no subsampling, T iterations.
Both final inertias (sum of squared distances to the nearest final centroid) are computed by the
same code. Timings exclude Ray's start-up, putting the points in the object store and one untimed
assignment pass that starts the workers and their imports. The two
methods take turns over ``--rounds`` rounds (the order alternating) and the figures are medians
of the per-round ratios, so that load from other processes hits both alike.

Prints the inertia ratio (ours / faiss; target <= 1.01) and, last,
``init_ours_vs_faiss=<ours seconds / faiss seconds>`` (target <= 1.5).
Usage: ``python benchmarks/kmeans_init.py [--quick] [--threads 2] [--iterations T] [--rounds R]
[--init-rounds r] [--init-oversampling l/k] [--init-points-per-cluster s] [--size N D K]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import numpy as np

from ray_ssl.curation.blocks import PointSet, RayExecutor
from ray_ssl.curation.hkmeans import DEFAULT_INIT, InitSpec, assign, initial_centroids, lloyd
from ray_ssl.curation.kmeans import assign_nearest

# N, d, k (quick, full). The full size (2M x 128, k = 20k: 5.1e12 multiply-adds per Lloyd
# iteration) takes about 400 s per iteration on this shared 2-core machine (RESULTS.md: 1M x 10k
# took ~100 s), over 4 hours for both methods at 20 iterations; full mode is the largest size
# that runs in about 10 minutes here (N x k 100 times smaller). Quick mode halves k: its Lloyd
# wave is still ~0.25 s of arithmetic per block against Ray's ~0.03 s task round trip, as at the
# issue's size where the arithmetic dominates; the former quick size (40k x 64, k = 400: ~15 ms
# of arithmetic per block) measured mostly Ray's per-wave latency (RESULTS.md).
SIZES = {True: (200_000, 128, 1_000), False: (200_000, 128, 2_000)}
DEFAULT_ITERATIONS = 20  # curation.lloyd_iterations' default
DEFAULT_ROUNDS = {True: 2, False: 3}
COMPONENT_SPREAD = 4.0  # mixture centres ~ N(0, spread^2 I), unit-variance components
COMPONENTS_PER_CLUSTER = 0.5  # planted components per requested cluster


def mixture(n: int, d: int, components: int, seed: int) -> np.ndarray:
    """Points from ``components`` equally likely unit Gaussians."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((components, d)) * COMPONENT_SPREAD
    points = centres[rng.integers(components, size=n)] + rng.standard_normal((n, d))
    return points.astype(np.float32)


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    return float(assign_nearest(x, centroids)[1].sum(dtype=np.float64))


def ours(points: PointSet, k: int, iterations: int, seed: int, spec: InitSpec) -> dict[str, float]:
    x = points.gather()
    start = time.perf_counter()
    init = initial_centroids(points, k, np.random.default_rng(seed), spec)
    seeded = time.perf_counter()
    result = lloyd(points, init, iterations, until_stable=False)
    done = time.perf_counter()
    assert result.iterations == iterations
    return {
        "init": seeded - start,
        "lloyd": done - seeded,
        "total": done - start,
        "inertia": inertia(x, result.centroids),
    }


def faiss_kmeans(x: np.ndarray, k: int, iterations: int, seed: int) -> dict[str, float]:
    import faiss

    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        seed=seed,
        max_points_per_centroid=len(x),  # no subsampling: the same N as ours
        min_points_per_centroid=1,
        verbose=False,
    )
    start = time.perf_counter()
    km.train(x)
    done = time.perf_counter()
    return {
        "init": float("nan"),
        "lloyd": float("nan"),
        "total": done - start,
        "inertia": inertia(x, km.centroids),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("--rounds", type=int, default=None, help="turns of each method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init-rounds", type=int, default=DEFAULT_INIT.rounds, help="k-means|| rounds r"
    )
    parser.add_argument(
        "--init-oversampling",
        type=float,
        default=DEFAULT_INIT.oversampling,
        help="k-means|| oversampling l / k",
    )
    parser.add_argument(
        "--init-points-per-cluster",
        type=int,
        default=DEFAULT_INIT.points_per_cluster,
        help="k-means|| subsample size / k (0: all points)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=3,
        metavar=("N", "D", "K"),
        help="points, dimensions and clusters instead of the mode's (e.g. the issue's 2000000 128 "
        "20000)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import faiss
    import ray
    import torch

    n, d, k = args.size or SIZES[args.quick]
    spec = InitSpec(
        rounds=args.init_rounds,
        oversampling=args.init_oversampling,
        points_per_cluster=args.init_points_per_cluster,
    )
    rounds = args.rounds or DEFAULT_ROUNDS[args.quick]
    x = mixture(n, d, max(2, int(COMPONENTS_PER_CLUSTER * k)), args.seed)
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    points = PointSet.from_array(x, RayExecutor(), args.threads)
    assign(points, x[:k])  # warm-up: start the workers and their imports, untimed
    print(
        f"k-means, N={n} d={d} k={k}, {args.threads} threads/CPUs, {args.iterations} Lloyd "
        f"iterations each; k-means|| r={spec.rounds}, l={spec.oversampling:g}k on "
        f"{spec.points_per_cluster or 'all'} points per cluster (seconds):",
        flush=True,
    )
    speed, quality = [], []
    for turn in range(rounds):
        runs = {
            "faiss": lambda: faiss_kmeans(x, k, args.iterations, args.seed),
            "ours": lambda: ours(points, k, args.iterations, args.seed, spec),
        }
        order = list(runs) if turn % 2 == 0 else list(runs)[::-1]
        out = {name: runs[name]() for name in order}
        mine, theirs = out["ours"], out["faiss"]
        print(
            f"  round {turn + 1}: ours on Ray: k-means|| {mine['init']:.2f} + Lloyd "
            f"{mine['lloyd']:.2f} = {mine['total']:.2f} (inertia {mine['inertia']:.6g}); "
            f"faiss.Kmeans (random init) {theirs['total']:.2f} (inertia {theirs['inertia']:.6g})",
            flush=True,
        )
        speed.append(mine["total"] / theirs["total"])
        quality.append(mine["inertia"] / theirs["inertia"])
    ray.shutdown()
    print(f"inertia_ours_vs_faiss={statistics.median(quality):.4f}")
    print(f"init_ours_vs_faiss={statistics.median(speed):.3f}")


if __name__ == "__main__":
    main()
