"""Embeddings from their Parquet files into object-store blocks (a PointSet) plus row ids.

Kept apart from the embedding code so that the Ray workers that read the files import only numpy,
pyarrow and the storage layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from ray_ssl.config import StorageConfig
from ray_ssl.curation.blocks import Executor, PointSet
from ray_ssl.curation.errors import CurationError
from ray_ssl.storage import pin_endpoint, resolve


@dataclass
class EmbeddingTable:
    """The embeddings as object-store blocks plus the per-row ids, in shard order."""

    points: PointSet
    keys: np.ndarray
    idx: np.ndarray
    labels: np.ndarray

    def subset(self, rows: np.ndarray) -> EmbeddingTable:
        """The rows with sorted global indices ``rows`` (their blocks stay where they are)."""
        bounds = np.r_[self.points.offsets, self.points.n]
        cuts = np.searchsorted(rows, bounds)
        local = [rows[cuts[i] : cuts[i + 1]] - bounds[i] for i in range(len(self.points.blocks))]
        return EmbeddingTable(
            self.points.subset(local), self.keys[rows], self.idx[rows], self.labels[rows]
        )


def _load_group(uris: list[str], storage: StorageConfig) -> tuple[np.ndarray | None, dict]:
    """One block from consecutive Parquet files; ``None`` (and the dims) when they disagree."""
    tables = []
    for uri in uris:
        loc = resolve(uri, storage)
        with loc.fs.open(loc.path, "rb") as fh:
            tables.append(pq.read_table(fh))
    dims = [t.schema.field("embedding").type.list_size for t in tables]
    info = {
        "dims": dims,
        "keys": np.concatenate([t.column("key").to_numpy(zero_copy_only=False) for t in tables]),
        "idx": np.concatenate([t.column("idx").to_numpy() for t in tables]),
        "label": np.concatenate([t.column("label").to_numpy() for t in tables]),
    }
    if len(set(dims)) > 1:
        return None, info
    flat = [t.column("embedding").combine_chunks().flatten().to_numpy() for t in tables]
    return np.concatenate(flat).reshape(-1, dims[0]).astype(np.float32), info


def load_embeddings(
    uri: str, names: list[str], storage: StorageConfig, executor: Executor, n_blocks: int
) -> EmbeddingTable:
    """Read the Parquet files ``names`` under ``uri`` into ``n_blocks`` blocks (tasks on Ray)."""
    loc = resolve(uri, storage)
    missing = [n for n in names if not loc.join(n).exists()]
    if not names or missing:
        raise CurationError(
            f"no embeddings at {uri}"
            + (f" for {missing[:3]}" if missing else "")
            + "; run the embedding step (ray-ssl curate) or fix curation.embeddings_uri"
        )
    groups = [g for g in np.array_split(np.array(names), min(n_blocks, len(names))) if len(g)]
    pinned = pin_endpoint(storage)
    outs = executor.map(
        _load_group, [([loc.join(n).uri for n in g], pinned) for g in groups], num_returns=2
    )
    infos = executor.get([o[1] for o in outs])
    dims = sorted({d for info in infos for d in info["dims"]})
    if len(dims) > 1:
        raise CurationError(
            f"embeddings under {uri} have different dimensions {dims}; they come from different "
            "backbones - delete them and embed again"
        )
    sizes = np.array([len(info["idx"]) for info in infos], np.int64)
    if sizes.sum() == 0:
        raise CurationError(f"the embeddings under {uri} hold no samples; check the shard set")
    keep = [i for i, n in enumerate(sizes) if n]
    points = PointSet(executor, [outs[i][0] for i in keep], sizes[keep], dims[0])
    cat = lambda name: np.concatenate([info[name] for info in infos])  # noqa: E731
    return EmbeddingTable(points, cat("keys"), cat("idx").astype(np.int64), cat("label"))
