"""``ray-ssl curate``: embed a shard set, build the k-means hierarchy, sample it, report.

Outputs under ``curation.output_uri`` (each written atomically):
``curated.parquet`` (key, idx, label and the cluster of every level of each chosen sample),
``curated.json`` (summary and resolved config), ``hierarchy.npz`` (centroids and assignments of
every level), ``report.json`` and ``report.png`` (class balance and balance over every level's
clusters, against a random subset and a flat-k-means balanced sample of the same size), and with
``curation.write_shards`` a shard set of the chosen samples under ``<output_uri>/shards``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_ssl.config import Config, CurationConfig, StorageConfig, to_dict
from ray_ssl.curation.blocks import PointSet, RayExecutor
from ray_ssl.curation.embed import embed_shard_set
from ray_ssl.curation.errors import CurationError
from ray_ssl.curation.hierarchy import (
    Hierarchy,
    Level,
    check_levels,
    hierarchical_kmeans,
    level_specs,
)
from ray_ssl.curation.hkmeans import InitSpec, in_driver_if_small, kmeans
from ray_ssl.curation.pool import zipf_subsample
from ray_ssl.curation.report import FLAT_BALANCED, RANDOM_SUBSET, CurationReport
from ray_ssl.curation.sampling import Selection, hierarchical_sample
from ray_ssl.curation.table import EmbeddingTable, load_embeddings
from ray_ssl.data.errors import ShardError
from ray_ssl.data.shards import Manifest, ensure_shard_set, read_manifest
from ray_ssl.storage import read_bytes, resolve, write_bytes_atomic

log = logging.getLogger(__name__)

CURATED_TABLE, CURATED_SUMMARY = "curated.parquet", "curated.json"
HIERARCHY_FILE, REPORT_JSON, REPORT_PNG = "hierarchy.npz", "report.json", "report.png"
CURATED_SHARDS_DIR = "shards"
# Each baseline and the pool draw from their own streams: seed + these offsets.
FLAT_SEED_OFFSET, RANDOM_SEED_OFFSET, POOL_SEED_OFFSET = 1, 2, 3
EXPORT_EMBEDDINGS, PIXELS_EMBEDDINGS = "export", "backbone"  # sub-dirs with backbone_export set


def init_spec(cfg: CurationConfig) -> InitSpec:
    return InitSpec(cfg.init, cfg.init_rounds, cfg.init_oversampling, cfg.init_points_per_cluster)


def choose_backbone(cfg: CurationConfig, storage: StorageConfig) -> tuple[CurationConfig, str]:
    """``cfg`` embedding with ``backbone_export`` when that file exists, else with ``backbone``,
    and a description of the embedding for the report. With ``backbone_export`` set the two
    kinds of embeddings live in sub-directories of ``embeddings_uri``, so that a rerun after a
    training run has exported its backbone does not meet the older embeddings."""
    if not cfg.backbone_export:
        return cfg, cfg.backbone
    export = _absolute(cfg.backbone_export)
    if resolve(export, storage).exists():
        uri = f"{cfg.embeddings_uri.rstrip('/')}/{EXPORT_EMBEDDINGS}"
        return dataclasses.replace(cfg, backbone=export, embeddings_uri=uri), f"export {export}"
    log.warning("no exported backbone at %s; embedding with '%s'", export, cfg.backbone)
    uri = f"{cfg.embeddings_uri.rstrip('/')}/{PIXELS_EMBEDDINGS}"
    return (
        dataclasses.replace(cfg, embeddings_uri=uri),
        f"{cfg.backbone} (no pretrained export at {cfg.backbone_export})",
    )


def _source_manifest(config: Config) -> Manifest:
    """The shard set to curate; a missing one is written from the shards section first."""
    try:
        return read_manifest(config.data.uri, config.storage)
    except ShardError:
        log.info("no shard set at %s; writing it from %s", config.data.uri, config.shards.source)
        return ensure_shard_set(config.shards, config.data.uri, config.storage)


def flat_kmeans(points: PointSet, k: int, cfg: CurationConfig, rng: np.random.Generator) -> Level:
    """One flat k-means (no resampling) on the points, as a level."""
    points = in_driver_if_small(points, cfg.driver_max_points)
    result = kmeans(points, k, rng, cfg.lloyd_iterations, init_spec(cfg))
    return Level(
        result.centroids,
        points.concat(result.assignment.labels).astype(np.int64),
        points.concat(result.assignment.sqdist).astype(np.float32),
        result.assignment.inertia,
    )


def flat_baselines(
    points: PointSet, hierarchy: Hierarchy, cfg: CurationConfig
) -> tuple[dict[int, np.ndarray], dict[str, np.ndarray]]:
    """Per level (``flat_baseline``): cluster sizes of flat k-means with that level's k. And
    (``sample_baselines``) two samples of ``target_size`` points: a uniform random subset, and
    a balanced sample from flat k-means with level 1's k (the level-1 run of the first part
    when there is one, else one k-means)."""
    rng = np.random.default_rng(cfg.seed + FLAT_SEED_OFFSET)
    flat = (
        {
            level: flat_kmeans(points, hierarchy.n_clusters(level), cfg, rng)
            for level in range(1, len(hierarchy.levels) + 1)
        }
        if cfg.flat_baseline
        else {}
    )
    sizes = {
        level: np.bincount(lvl.labels, minlength=len(lvl.centroids)) for level, lvl in flat.items()
    }
    if not cfg.sample_baselines:
        return sizes, {}
    level1 = flat.get(1) or flat_kmeans(points, hierarchy.n_clusters(1), cfg, rng)
    balanced = hierarchical_sample(Hierarchy([level1]), cfg.target_size, rng, cfg.leaf_selection)
    random_rows = np.random.default_rng(cfg.seed + RANDOM_SEED_OFFSET).choice(
        points.n, cfg.target_size, replace=False
    )
    return sizes, {RANDOM_SUBSET: np.sort(random_rows), FLAT_BALANCED: balanced.points}


def curated_table(table: EmbeddingTable, hierarchy: Hierarchy, selection: Selection) -> pa.Table:
    chosen = selection.points
    columns = {
        "key": pa.array(table.keys[chosen].tolist(), pa.string()),
        "idx": pa.array(table.idx[chosen]),
        "label": pa.array(table.labels[chosen].astype(np.int64)),
    }
    for level in range(1, len(hierarchy.levels) + 1):
        columns[f"cluster_level{level}"] = pa.array(hierarchy.point_labels(level)[chosen])
    return pa.table(columns)


def _write_parquet(uri: str, table: pa.Table, storage: StorageConfig) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(resolve(uri, storage), buffer.getvalue())


def _write_json(uri: str, value: dict, storage: StorageConfig) -> None:
    write_bytes_atomic(resolve(uri, storage), json.dumps(value, indent=1).encode())


def _absolute(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def long_tailed_pool(table: EmbeddingTable, cfg: CurationConfig) -> EmbeddingTable:
    """The Zipf subsample of the labelled table that the demo curates (``pool_zipf_exponent``)."""
    rng = np.random.default_rng(cfg.seed + POOL_SEED_OFFSET)
    pool = table.subset(zipf_subsample(table.labels, cfg.pool_zipf_exponent, rng))
    log.info("long-tailed pool: %d of %d samples", pool.points.n, table.points.n)
    if cfg.target_size > pool.points.n:
        raise CurationError(
            f"curation.target_size={cfg.target_size} exceeds the {pool.points.n} samples of the "
            f"long-tailed pool (pool_zipf_exponent={cfg.pool_zipf_exponent}); lower either"
        )
    return pool


@dataclass
class CurationOutcome:
    output_uri: str
    selected: int
    report: dict


def run_curation(config: Config) -> CurationOutcome:
    """Embed ``data.uri``, cluster, sample ``curation.target_size`` samples, write the outputs."""
    import ray

    cfg = dataclasses.replace(
        config.curation,
        embeddings_uri=_absolute(config.curation.embeddings_uri),
        output_uri=_absolute(config.curation.output_uri),
    )
    cfg, embedding = choose_backbone(cfg, config.storage)
    config = dataclasses.replace(
        config, curation=cfg, data=dataclasses.replace(config.data, uri=_absolute(config.data.uri))
    )
    specs = level_specs(cfg)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    manifest = _source_manifest(config)
    check_levels(specs, manifest.count)  # fail before embedding; rechecked on what was embedded
    if cfg.target_size > manifest.count:
        raise CurationError(
            f"curation.target_size={cfg.target_size} exceeds the {manifest.count} samples of "
            f"{config.data.uri}; lower it"
        )
    names = embed_shard_set(config.data.uri, manifest, cfg, config.storage).names
    executor = RayExecutor()
    table = load_embeddings(cfg.embeddings_uri, names, config.storage, executor, cfg.num_partitions)
    if cfg.pool_zipf_exponent > 0:
        table = long_tailed_pool(table, cfg)
    rng = np.random.default_rng(cfg.seed)
    hierarchy = hierarchical_kmeans(
        table.points,
        specs,
        rng,
        cfg.lloyd_iterations,
        cfg.resample_strategy,
        cfg.num_partitions,
        cfg.driver_max_points,
        init_spec(cfg),
        cfg.n_init,
    )
    selection = hierarchical_sample(hierarchy, cfg.target_size, rng, cfg.leaf_selection)
    flat, baselines = flat_baselines(table.points, hierarchy, cfg)
    report = CurationReport(
        hierarchy,
        selection,
        flat,
        table.labels,
        baselines,
        list(manifest.classes),
        embedding,
        extra={
            "source_uri": config.data.uri,
            "backbone": cfg.backbone,
            "pool": {"source_count": manifest.count, "zipf_exponent": cfg.pool_zipf_exponent},
        },
    )
    out = resolve(cfg.output_uri, config.storage)
    write_bytes_atomic(out.join(HIERARCHY_FILE), hierarchy.to_bytes())
    _write_parquet(
        out.join(CURATED_TABLE).uri, curated_table(table, hierarchy, selection), config.storage
    )
    report_dict = report.to_dict()
    _write_json(out.join(REPORT_JSON).uri, report_dict, config.storage)
    write_bytes_atomic(out.join(REPORT_PNG), report.plot_png())
    summary = {
        "source_uri": config.data.uri,
        "count": len(selection.points),
        "table": CURATED_TABLE,
        "config": to_dict(config),
    }
    if cfg.write_shards:
        from ray_ssl.curation.export import write_curated_shards

        summary["shards"] = write_curated_shards(
            config.data.uri,
            manifest,
            table.idx[selection.points],
            out.join(CURATED_SHARDS_DIR).uri,
            config.storage,
            config.shards.samples_per_shard,
        )
    _write_json(out.join(CURATED_SUMMARY).uri, summary, config.storage)
    log.info("curated %d of %d samples into %s", len(selection.points), hierarchy.n_points, out.uri)
    return CurationOutcome(out.uri, len(selection.points), report_dict)


def read_curated(uri: str, storage: StorageConfig | None = None) -> pa.Table:
    """The curated table written by :func:`run_curation` under ``uri``."""
    return pq.read_table(io.BytesIO(read_bytes(resolve(uri, storage).join(CURATED_TABLE))))
