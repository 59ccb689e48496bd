"""Dry-run plan of a curation run: per level, the Ray tasks, the bytes moved and an estimated time
on a given cluster, from a per-block cost measured on this machine (``ray-ssl curate --plan``).

Nothing here imports Ray or starts anything. The model follows what :mod:`hkmeans`,
:mod:`split` and :mod:`hierarchy` run: every k-means is its seeding (k-means||: 1 + rounds distance
passes over a uniform subsample of ``init_points_per_cluster`` * k points plus rounds sampling
waves, then weighted k-means++ on ~(1 + rounds * l) candidates in the driver; k-means++: two
waves per centre) and its Lloyd passes (all ``lloyd_iterations`` assumed), each pass one task per
block; resampling adds, per step, a sampling wave, a k-means on the sample
(in the driver when small) and a reassignment pass; a split moves every point once and runs
``n_init`` small k-means per cluster. Compute is multiply-adds of the distance GEMMs at the rate
measured here per core; bytes are what crosses the object store between nodes and the driver
(centroids broadcast to every node, partial sums and candidates gathered, a split's shuffle).
It is an estimate: it assumes all Lloyd iterations run, ideal load balance and the constants below.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np

from ray_ssl.config import Config, CurationConfig
from ray_ssl.curation.errors import CurationError
from ray_ssl.curation.hierarchy import level_specs
from ray_ssl.curation.hkmeans import KMEANS_PARALLEL, LevelSpec, init_sample_size
from ray_ssl.curation.kmeans import assign_nearest, n_local_trials

# Latency of one wave of tasks on Ray (scheduling + object-store round trip to the driver): issue
# 16 measured 67 ms per k-means++ step of two waves over 4 blocks on this machine.
WAVE_LATENCY_S = 0.034
NODE_BANDWIDTH_BYTES_S = 1.25e9  # 10 Gbit/s per node
FLOAT32_BYTES, FLOAT64_BYTES, INT64_BYTES = 4, 8, 8
PROBE_ROWS, PROBE_CLUSTERS, PROBE_REPEATS = 4096, 512, 3  # the measured Lloyd pass
EXPORT_SUFFIX = ".safetensors"


@dataclass
class Cost:
    """Work of one stage: waves of tasks, tasks, multiply-adds and bytes moved."""

    waves: int = 0
    tasks: int = 0
    parallel_macs: float = 0.0  # spread over the cluster's CPUs
    driver_macs: float = 0.0  # in the driver process (its node's CPUs)
    bytes_moved: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.waves + other.waves,
            self.tasks + other.tasks,
            self.parallel_macs + other.parallel_macs,
            self.driver_macs + other.driver_macs,
            self.bytes_moved + other.bytes_moved,
        )

    def scaled(self, times: float) -> Cost:
        return Cost(
            int(self.waves * times),
            int(self.tasks * times),
            self.parallel_macs * times,
            self.driver_macs * times,
            self.bytes_moved * times,
        )


@dataclass
class Cluster:
    nodes: int
    cpus_per_node: int
    macs_per_core_s: float  # measured

    def seconds(self, cost: Cost) -> float:
        cores = self.nodes * self.cpus_per_node
        return (
            cost.waves * WAVE_LATENCY_S
            + cost.parallel_macs / (cores * self.macs_per_core_s)
            + cost.driver_macs / (self.cpus_per_node * self.macs_per_core_s)
            + cost.bytes_moved / (self.nodes * NODE_BANDWIDTH_BYTES_S)
        )


@dataclass
class Planner:
    cfg: CurationConfig
    dim: int
    nodes: int

    def _blocks(self, n: int) -> int:
        """Blocks a point set of n rows is cut into; 0 = it is clustered in the driver."""
        return 0 if n <= self.cfg.driver_max_points else min(self.cfg.num_partitions, n)

    def _pass(self, n: int, k: int, broadcast_rows: int) -> Cost:
        """One distance pass of n points against k rows, one task per block."""
        blocks, d = self._blocks(n), self.dim
        macs = float(n) * k * d
        if blocks == 0:
            return Cost(driver_macs=macs)
        moved = self.nodes * broadcast_rows * d * FLOAT32_BYTES
        return Cost(1, blocks, macs, 0.0, moved)

    def seeding(self, n: int, k: int) -> Cost:
        d, cfg, blocks = self.dim, self.cfg, self._blocks(n)
        if cfg.init == KMEANS_PARALLEL:
            ell = cfg.init_oversampling * k
            sampled = init_sample_size(n, k, cfg.init_points_per_cluster)
            candidates = min(sampled, int(1 + cfg.init_rounds * ell))
            cost = Cost(1 if blocks else 0, 1 if blocks else 0)  # fetch the first (uniform) row
            if blocks and sampled < n:  # the subsample: one wave, its blocks stay put
                cost += Cost(1, blocks)
            for _ in range(cfg.init_rounds + 1):  # distance passes against each round's draws
                one = self._pass(n, int(ell), int(ell))
                cost += replace(
                    one,
                    parallel_macs=one.parallel_macs * sampled / n,
                    driver_macs=one.driver_macs * sampled / n,
                )
            if blocks:
                gather = candidates * d * FLOAT32_BYTES + blocks * candidates * INT64_BYTES
                cost += Cost(cfg.init_rounds, cfg.init_rounds * blocks, 0.0, 0.0, gather)
            recluster = float(k) * n_local_trials(k) * candidates * d if candidates > k else 0.0
            return cost + Cost(driver_macs=recluster)
        trials = n_local_trials(k)
        per_step = self._pass(n, trials, trials)
        return per_step.scaled(2 * k) if blocks else per_step.scaled(k)

    def lloyd(self, n: int, k: int) -> Cost:
        blocks, d = self._blocks(n), self.dim
        per_pass = self._pass(n, k, k)
        if blocks:  # float64 partial sums of every block reduced by a tree of tasks
            per_pass += Cost(0, blocks, 0.0, 0.0, blocks * k * d * FLOAT64_BYTES)
        return per_pass.scaled(self.cfg.lloyd_iterations + 1)

    def kmeans(self, n: int, k: int) -> Cost:
        return self.seeding(n, k) + self.lloyd(n, k)

    def level(self, n: int, spec: LevelSpec) -> tuple[Cost, Cost | None]:
        """Cost of the level's k-means with resampling, and of its split (None without)."""
        k, blocks = spec.n_clusters, self._blocks(n)
        cost = self.kmeans(n, k)
        sample = min(n, k * spec.sample_size)
        for _ in range(spec.n_resampling_steps):
            if blocks:  # the sampling wave gathers the sample's rows
                cost += Cost(1, blocks, 0.0, 0.0, sample * self.dim * FLOAT32_BYTES)
            cost += self.kmeans(sample, k) + self._pass(n, k, k)
        if spec.n_splits <= 1:
            return cost, None
        per_cluster = n / k
        sub = min(spec.n_splits, max(1.0, per_cluster))
        runs = self.cfg.n_init * (
            self.cfg.lloyd_iterations + 2 + self.cfg.init_rounds * self.cfg.init_oversampling
        )
        macs = runs * float(n) * sub * self.dim
        shuffle = float(n) * (self.dim * FLOAT32_BYTES + 2 * INT64_BYTES)
        if blocks:
            return cost, Cost(2, 2 * blocks, macs, 0.0, shuffle)
        return cost, Cost(driver_macs=macs)


def measure_macs_per_core_s() -> float:
    """Multiply-adds per second per core of one Lloyd assignment pass on a small block here."""
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((PROBE_ROWS, 128), dtype=np.float32)
    c = rng.standard_normal((PROBE_CLUSTERS, 128), dtype=np.float32)
    best = math.inf
    for _ in range(PROBE_REPEATS):
        start = time.perf_counter()
        assign_nearest(x, c)
        best = min(best, time.perf_counter() - start)
    return PROBE_ROWS * PROBE_CLUSTERS * 128 / best / max(1, torch.get_num_threads())


def embedding_dim(config: Config, channels: int) -> int:
    """Dimension of the embeddings ``curation.backbone`` makes, without loading weights."""
    cfg = config.curation
    if cfg.backbone == "pixels":
        return channels * cfg.pixels_size**2
    import timm
    import torch

    try:
        with torch.device("meta"):
            if cfg.backbone.endswith(EXPORT_SUFFIX):
                with open(cfg.backbone[: -len(EXPORT_SUFFIX)] + ".json") as fh:
                    meta = json.load(fh)
                model = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
            else:
                model = timm.create_model(cfg.backbone, pretrained=False, num_classes=0)
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise CurationError(
            f"cannot tell the embedding size of curation.backbone='{cfg.backbone}' ({err}); pass "
            "--dim"
        ) from err
    return int(model.num_features)


def _pool_size(config: Config, points: int | None) -> tuple[int, int, str]:
    """(points, image channels, where the count comes from)."""
    if points is not None:
        return points, 3, "--points"
    uri = config.data.uri
    if "://" not in uri or uri.startswith("file://"):
        from ray_ssl.data.errors import ShardError
        from ray_ssl.data.shards import read_manifest

        try:
            manifest = read_manifest(uri, config.storage)
        except ShardError:
            manifest = None
        if manifest is not None:
            n, how = manifest.count, f"the manifest at {uri}"
            exponent = config.curation.pool_zipf_exponent
            if exponent > 0 and manifest.classes:
                ranks = np.arange(1, len(manifest.classes) + 1, dtype=np.float64)
                n = int(n * np.mean(ranks**-exponent))
                how += f", Zipf pool (exponent {exponent}) of balanced classes"
            return n, manifest.channels, how
    raise CurationError(
        f"the plan needs the pool size: pass --points N (the planner reads no remote manifest and "
        f"found none at {uri})"
    )


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


@dataclass
class PlanRow:
    stage: str
    clusters: int
    points: int
    cost: Cost
    seconds: float


@dataclass
class Plan:
    header: list[str]
    rows: list[PlanRow] = field(default_factory=list)

    def text(self) -> str:
        lines = [*self.header]
        lines.append(
            f"{'stage':<10}{'clusters':>10}{'points':>15}{'waves':>10}{'tasks':>12}"
            f"{'bytes moved':>14}{'est. time':>12}"
        )
        for row in self.rows:
            lines.append(
                f"{row.stage:<10}{row.clusters:>10}{row.points:>15}{row.cost.waves:>10}"
                f"{row.cost.tasks:>12}{_human_bytes(row.cost.bytes_moved):>14}"
                f"{_human_seconds(row.seconds):>12}"
            )
        total = sum((r.cost for r in self.rows), Cost())
        seconds = sum(r.seconds for r in self.rows)
        lines.append(
            f"{'total':<10}{'':>10}{'':>15}{total.waves:>10}{total.tasks:>12}"
            f"{_human_bytes(total.bytes_moved):>14}{_human_seconds(seconds):>12}"
        )
        return "\n".join(lines)


def plan_curation(
    config: Config,
    nodes: int = 1,
    cpus_per_node: int | None = None,
    points: int | None = None,
    dim: int | None = None,
) -> Plan:
    """Per level of ``config``'s hierarchy: waves, tasks, bytes moved, estimated seconds."""
    cpus = cpus_per_node or os.cpu_count() or 1
    if nodes < 1 or cpus < 1 or (points is not None and points < 1):
        raise CurationError("--nodes, --cpus-per-node and --points must be >= 1")
    cfg = config.curation
    specs = level_specs(cfg)
    n, channels, how = _pool_size(config, points)
    d = dim or embedding_dim(config, channels)
    rate = measure_macs_per_core_s()
    cluster = Cluster(nodes, cpus, rate)
    planner = Planner(cfg, d, nodes)
    plan = Plan(
        [
            f"plan for preset '{config.preset}': {n} points ({how}) x {d} dims, "
            f"{cfg.num_partitions} blocks, init {cfg.init}, {cfg.lloyd_iterations} Lloyd "
            f"iterations, on {nodes} node(s) x {cpus} CPUs",
            f"measured here: {rate / 1e9:.1f} GMAC/s per core in a Lloyd pass on a "
            f"{PROBE_ROWS} x 128 block with k = {PROBE_CLUSTERS}; assumed "
            f"{WAVE_LATENCY_S * 1e3:.0f} ms per wave of tasks and "
            f"{NODE_BANDWIDTH_BYTES_S * 8 / 1e9:.0f} Gbit/s per node",
        ]
    )
    for level, spec in enumerate(specs, 1):
        cost, split = planner.level(n, spec)
        plan.rows.append(PlanRow(f"level {level}", spec.n_clusters, n, cost, cluster.seconds(cost)))
        if split is not None:
            k = spec.n_clusters * spec.n_splits
            plan.rows.append(PlanRow("  split", k, n, split, cluster.seconds(split)))
        n = spec.n_clusters * spec.n_splits
    return plan
