"""A Ray Data datasource over a shard set that emits large Arrow blocks of raw samples.

``ray.data.read_webdataset`` builds pandas frames row by row (ray issue 65350); this reader parses
each tar once and emits blocks of up to ``TARGET_BLOCK_BYTES`` with columns ``key``, ``idx``,
``label``, ``image`` (encoded bytes), ``corrupt`` and ``seed`` (the augmentation seed of the
epoch). Shard order is shuffled per epoch, deterministically for (seed, epoch); the epoch advances
with each execution of the dataset, which is how Ray Train workers re-iterate it every epoch.
Unreadable parts of a shard (truncated tar, missing fields) become ``corrupt`` rows, so that the
consumer can count them against ``data.max_corrupt_fraction`` instead of failing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.data.context import DataContext

from ray_ssl.config import StorageConfig
from ray_ssl.data.shards import Manifest, ShardInfo, iter_shard
from ray_ssl.data.tario import TruncatedShardError
from ray_ssl.storage import resolve

log = logging.getLogger(__name__)

TARGET_BLOCK_BYTES = 32 << 20
MAX_BLOCK_ROWS = 4096
UNKNOWN_LABEL = -1
SEED_BITS = 63  # seeds stay non-negative int64 in Arrow

RAW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("idx", pa.int64()),
        ("label", pa.int64()),
        ("image", pa.binary()),
        ("corrupt", pa.bool_()),
        ("seed", pa.int64()),
    ]
)


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed non-negative seed for (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


def shard_order(count: int, seed: int, epoch: int) -> list[int]:
    """The order in which shards are read in ``epoch``: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng(epoch_seed(seed, epoch)).permutation(count).tolist()


class _Rows:
    """Column buffers for one block."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}
        self.nbytes = 0

    def add(self, key: str, idx: int, label: int, image: bytes, corrupt: bool, seed: int) -> None:
        for name, value in zip(
            RAW_SCHEMA.names, (key, idx, label, image, corrupt, seed), strict=True
        ):
            self.columns[name].append(value)
        self.nbytes += len(image) + len(key) + 32

    def __len__(self) -> int:
        return len(self.columns["key"])

    def table(self, order: np.ndarray | None = None) -> pa.Table:
        table = pa.Table.from_pydict(self.columns, schema=RAW_SCHEMA)
        return table.take(order) if order is not None else table


def read_shard_rows(
    shard_uri: str, info: ShardInfo, storage: StorageConfig, seed: int | None
) -> Iterator[pa.Table]:
    """Blocks of raw rows of one shard; rows the shard lacks (truncation) come back corrupt."""
    rows = _Rows()
    aug_seed = 0 if seed is None else seed
    found = 0
    try:
        for sample in iter_shard(resolve(shard_uri, storage)):
            found += 1
            idx, label, image = sample.int_field("idx"), sample.int_field("cls"), sample.image
            ok = idx is not None and image is not None
            rows.add(sample.key, idx if ok else -1, label if label is not None else UNKNOWN_LABEL,
                     image if ok else b"", not ok, aug_seed)  # fmt: skip
            if rows.nbytes >= TARGET_BLOCK_BYTES or len(rows) >= MAX_BLOCK_ROWS:
                yield _finish(rows, seed, info.first_idx + found)
                rows = _Rows()
    except (TruncatedShardError, FileNotFoundError) as err:
        log.warning("shard %s unreadable after %d samples: %s", shard_uri, found, err)
    for missing in range(max(0, info.count - found)):
        rows.add(f"{info.name}#missing{missing}", -1, UNKNOWN_LABEL, b"", True, aug_seed)
    if len(rows):
        yield _finish(rows, seed, info.first_idx + found)


def _finish(rows: _Rows, seed: int | None, salt: int) -> pa.Table:
    """The block, its rows shuffled when a seed is given (deterministic per block)."""
    if seed is None:
        return rows.table()
    order = np.random.default_rng([seed, salt]).permutation(len(rows))
    return rows.table(order)


def _read_shards(
    uri: str, shards: list[ShardInfo], storage: StorageConfig, seed: int | None
) -> Iterator[pa.Table]:
    for info in shards:
        yield from read_shard_rows(f"{uri.rstrip('/')}/{info.name}", info, storage, seed)


class ShardSetDatasource(Datasource):
    """Read tasks over the shards a manifest lists, in a per-epoch shuffled order."""

    def __init__(
        self,
        uri: str,
        manifest: Manifest,
        storage: StorageConfig,
        shuffle_seed: int | None = None,
        epoch: int = 0,
    ):
        super().__init__()
        self.uri, self.manifest, self.storage = uri, manifest, storage
        self.shuffle_seed, self.epoch = shuffle_seed, epoch

    def get_name(self) -> str:
        return "ReadShardSet"

    def estimate_inmemory_data_size(self) -> int:
        return sum(s.bytes for s in self.manifest.shards)

    def current_epoch(self, data_context: DataContext | None) -> int:
        """The first execution reads ``epoch``; each later execution the next epoch."""
        executions = getattr(data_context, "_execution_idx", 0) if data_context else 0
        return self.epoch + executions

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: DataContext | None = None,
    ) -> list[ReadTask]:
        shards = self.manifest.shards
        seed = None
        if self.shuffle_seed is not None:
            epoch = self.current_epoch(data_context)
            shards = [shards[i] for i in shard_order(len(shards), self.shuffle_seed, epoch)]
            seed = epoch_seed(self.shuffle_seed, epoch)
            log.debug("epoch %d reads shards in order %s", epoch, [s.name for s in shards])
        groups = np.array_split(np.arange(len(shards)), min(max(parallelism, 1), len(shards)))
        tasks = []
        for group in groups:
            members = [shards[i] for i in group]
            metadata = BlockMetadata(
                num_rows=sum(s.count for s in members),
                size_bytes=sum(s.bytes for s in members),
                input_files=[f"{self.uri.rstrip('/')}/{s.name}" for s in members],
                exec_stats=None,
            )
            read = functools.partial(_read_shards, self.uri, members, self.storage, seed)
            tasks.append(ReadTask(read, metadata, RAW_SCHEMA, per_task_row_limit))
        return tasks
