"""Seconds per Lloyd iteration: our k-means against faiss's CPU k-means, side by side.

Same data (N x d float32 Gaussian mixture), same k, same initial centroids, same thread count:
- ours on Ray: the points in ``threads`` object-store blocks, one assignment task per block (one
  thread each), per-cluster float64 sums reduced, centroids updated in the driver - what
  ``ray-ssl curate`` runs;
- ours in one process: the same kernels on one block with ``threads`` torch/BLAS threads;
- ``faiss.Kmeans`` with ``threads`` OpenMP threads (exact L2 search, no subsampling); its
  per-iteration time comes from its own ``iteration_stats``.
The methods take turns every iteration (ours on Ray, faiss, ours in-process, again ...) and the
median iteration is reported, so that load from other processes hits all alike. At full size
(N=1M, d=128, k=10k) only a few iterations are timed, not a whole run.

Also: the balance of 1 level of k-means against 4 levels of hierarchical k-means with resampling
on the same long-tailed mixture (Vo et al., arXiv 2405.15613): KL to uniform of the top level's
cluster sizes, and of the planted components in a balanced sample drawn from each tree.

Last line: ``ours_vs_faiss=<ours (Ray) seconds / faiss seconds per iteration>``.
Usage: ``python benchmarks/kmeans.py [--quick] [--threads 2] [--steps N]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import numpy as np

from ray_ssl.curation.blocks import LocalExecutor, PointSet, RayExecutor
from ray_ssl.curation.hierarchy import hierarchical_kmeans
from ray_ssl.curation.hkmeans import LevelSpec, assign
from ray_ssl.curation.kmeans import update_centroids
from ray_ssl.curation.report import kl_to_uniform
from ray_ssl.curation.sampling import hierarchical_sample

DEFAULT_STEPS = {True: 5, False: 2}  # timed iterations per method (quick, full)
SIZES = {True: (100_000, 64, 1_000), False: (1_000_000, 128, 10_000)}  # N, d, k (quick, full)
BALANCE = {  # points, dims, planted components, levels of the 4-level tree (quick, full)
    True: (20_000, 16, 30, (600, 200, 80, 30)),
    False: (100_000, 32, 100, (4000, 1000, 300, 100)),
}
BALANCE_SAMPLE_FRACTION = 0.1  # balanced sample drawn from each tree
ZIPF_EXPONENT = 1.2  # component weights ~ rank^-1.2: a long tail
RESAMPLING = (1, 3, 3, 3)  # steps after the first k-means per level (reference: 0/9/9/9)
SAMPLE_SIZE_FRACTION = 0.5  # resample about half the mean cluster size (reference configs)


def mixture(n: int, d: int, components: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points from ``components`` unit Gaussians with Zipf weights; returns (points, component)."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, components + 1, dtype=np.float64) ** -ZIPF_EXPONENT
    labels = rng.choice(components, n, p=weights / weights.sum())
    centers = rng.standard_normal((components, d)) * 4.0
    points = centers[labels] + rng.standard_normal((n, d))
    return points.astype(np.float32), labels


class OursLloyd:
    """Our Lloyd iterations on a PointSet; ``step`` times one (update + assignment)."""

    def __init__(self, points: PointSet, init: np.ndarray):
        self.points, self.centroids = points, init
        self.assignment, self.sums, _ = assign(points, init)  # the first assignment, untimed

    def step(self) -> float:
        start = time.perf_counter()
        self.centroids = update_centroids(self.sums, self.assignment.counts, self.centroids)
        self.assignment, self.sums, _ = assign(self.points, self.centroids, self.assignment)
        return time.perf_counter() - start


class FaissLloyd:
    """faiss.Kmeans continued from the current centroids; ``step`` returns the time faiss
    records for one iteration (the second of a 2-iteration train, so setup is excluded)."""

    def __init__(self, x: np.ndarray, init: np.ndarray, seed: int):
        self.x, self.centroids, self.seed = x, init, seed

    def step(self) -> float:
        import faiss

        km = faiss.Kmeans(
            self.x.shape[1],
            len(self.centroids),
            niter=2,
            seed=self.seed,
            max_points_per_centroid=len(self.x),  # no subsampling: the same N as ours
            min_points_per_centroid=1,
            verbose=False,
        )
        km.train(self.x, init_centroids=self.centroids)
        self.centroids = km.centroids
        stats = km.iteration_stats  # cumulative seconds since the start of training
        return stats[1]["time"] - stats[0]["time"]


def speed(quick: bool, threads: int, steps: int, seed: int) -> dict[str, list[float]]:
    """Seconds of each timed iteration per method, the methods taking turns every iteration."""
    import faiss
    import torch

    n, d, k = SIZES[quick]
    x, _ = mixture(n, d, max(k // 10, 2), seed)
    init = x[np.random.default_rng(seed).choice(n, k, replace=False)].copy()
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    methods = {
        "ours_ray": OursLloyd(PointSet.from_array(x, RayExecutor(), threads), init),
        "faiss": FaissLloyd(x, init, seed),
        "ours_local": OursLloyd(PointSet.from_array(x, LocalExecutor(), 1), init),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for step in range(steps):
        for name, method in methods.items():
            times[name].append(method.step())
        print(
            f"  iteration {step + 1}: " + ", ".join(f"{m} {t[-1]:.3f}s" for m, t in times.items()),
            flush=True,
        )
    return times


def balance(quick: bool, seed: int) -> dict[str, float]:
    n, d, components, levels = BALANCE[quick]
    x, truth = mixture(n, d, components, seed + 1)
    points = PointSet.from_array(x, LocalExecutor(), 1)
    specs, above = [], n
    for k, steps in zip(levels, RESAMPLING, strict=True):
        specs.append(LevelSpec(k, steps, max(1, int(SAMPLE_SIZE_FRACTION * above / k))))
        above = k
    trees = {
        "1 level": [LevelSpec(levels[-1])],
        "4 levels": specs,
    }
    out = {"raw components": kl_to_uniform(np.bincount(truth, minlength=components))}
    for name, tree in trees.items():
        hierarchy = hierarchical_kmeans(points, tree, np.random.default_rng(seed), 20)
        top = hierarchy.sizes(len(tree))
        sample = hierarchical_sample(
            hierarchy, int(BALANCE_SAMPLE_FRACTION * n), np.random.default_rng(seed)
        )
        out[f"{name} cluster sizes"] = kl_to_uniform(top)
        out[f"{name} sample components"] = kl_to_uniform(
            np.bincount(truth[sample.points], minlength=components)
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed iterations per method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    n, d, k = SIZES[args.quick]
    steps = args.steps or DEFAULT_STEPS[args.quick]
    times = speed(args.quick, args.threads, steps, args.seed)
    ray.shutdown()
    med = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"Lloyd iteration, N={n} d={d} k={k}, {args.threads} threads/CPUs, "
        f"median of {steps} timed iterations each (seconds):"
    )
    print(f"  ours on Ray ({args.threads} blocks, 1 task each) {med['ours_ray']:.3f}")
    print(f"  ours in one process ({args.threads} threads)      {med['ours_local']:.3f}")
    print(f"  faiss.Kmeans ({args.threads} OpenMP threads)        {med['faiss']:.3f}")
    kl = balance(args.quick, args.seed)
    n_b, _, components, levels = BALANCE[args.quick]
    print(
        f"KL to uniform (nats), {n_b} points from {components} Zipf-weighted components, "
        f"top level k={levels[-1]}; 4 levels = {list(levels)}:"
    )
    for name, value in kl.items():
        print(f"  {name:28s} {value:.4f}")
    print(f"ours_in_process_vs_faiss={med['ours_local'] / med['faiss']:.3f}")
    print(f"ours_vs_faiss={med['ours_ray'] / med['faiss']:.3f}")


if __name__ == "__main__":
    main()
