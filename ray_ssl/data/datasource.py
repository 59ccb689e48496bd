"""A Ray Data datasource over a shard set that emits large Arrow blocks of raw samples.

``ray.data.read_webdataset`` builds pandas frames row by row (ray issue 65350); this reader parses
each tar once and emits blocks of up to ``TARGET_BLOCK_BYTES`` with columns ``key``, ``idx``,
``label``, ``image`` (encoded bytes), ``corrupt`` and ``seed`` (the augmentation seed of the
epoch). Shard order is shuffled per epoch, deterministically for (seed, epoch); the epoch advances
with each execution of the dataset, which is how Ray Train workers re-iterate it every epoch.
Unusable samples (``ray_ssl.data.checks``: truncated tar, missing fields, idx outside the
shard's range, more samples than the manifest lists) become ``corrupt`` rows whose ``problem``
says which shard, key and why, so that the consumer can count them against
``data.max_corrupt_fraction`` instead of failing. For semantic positives (``with_pairs``) the rows
also carry ``pair_idx`` and ``pair_image`` (the partner's idx and encoded bytes), and a sample
without a usable partner is corrupt; otherwise those are -1 and empty, and partner bytes are
never copied into blocks.
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
from ray_ssl.data.checks import (
    MISSING,
    NO_PAIR,
    UNKNOWN_LABEL,
    describe,
    partner_fields,
    partner_problem,
    sample_label,
    sample_problem,
)
from ray_ssl.data.shards import Manifest, ShardInfo, iter_shard
from ray_ssl.data.tario import TruncatedShardError
from ray_ssl.storage import resolve

log = logging.getLogger(__name__)

TARGET_BLOCK_BYTES = 32 << 20
MAX_BLOCK_ROWS = 4096
SEED_BITS = 63  # seeds stay non-negative int64 in Arrow

RAW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("idx", pa.int64()),
        ("label", pa.int64()),
        ("image", pa.binary()),
        ("corrupt", pa.bool_()),
        ("seed", pa.int64()),
        ("problem", pa.string()),  # "" for a good row; else shard:key (kind: detail)
        ("shard", pa.string()),  # file name of the row's shard
        ("pair_idx", pa.int64()),  # idx of the semantic partner; NO_PAIR when not read
        ("pair_image", pa.binary()),  # the partner's encoded image; empty when not read
    ]
)


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed non-negative seed for (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


def shard_order(count: int, seed: int, epoch: int) -> list[int]:
    """The order in which shards are read in ``epoch``: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng(epoch_seed(seed, epoch)).permutation(count).tolist()


class _Rows:
    """Column buffers for one block of one shard."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.columns: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}
        self.nbytes = 0

    def add(
        self,
        key: str,
        idx: int,
        label: int,
        image: bytes,
        seed: int,
        pair_idx: int = NO_PAIR,
        pair_image: bytes = b"",
    ) -> None:
        values = (key, idx, label, image, False, seed, "", self.shard, pair_idx, pair_image)
        for name, value in zip(RAW_SCHEMA.names, values, strict=True):
            self.columns[name].append(value)
        self.nbytes += len(image) + len(pair_image) + len(key) + 40

    def add_corrupt(self, key: str, seed: int, problem: str) -> None:
        values = (key, -1, UNKNOWN_LABEL, b"", True, seed, problem, self.shard, NO_PAIR, b"")
        for name, value in zip(RAW_SCHEMA.names, values, strict=True):
            self.columns[name].append(value)
        self.nbytes += len(key) + len(problem) + 32

    def __len__(self) -> int:
        return len(self.columns["key"])

    def table(self, order: np.ndarray | None = None) -> pa.Table:
        table = pa.Table.from_pydict(self.columns, schema=RAW_SCHEMA)
        return table.take(order) if order is not None else table


def read_shard_rows(
    shard_uri: str,
    info: ShardInfo,
    storage: StorageConfig,
    seed: int | None,
    num_classes: int = 0,
    pairs_of: int | None = None,
) -> Iterator[pa.Table]:
    """Blocks of raw rows of one shard; unusable samples and the samples a truncated shard lacks
    come back corrupt (see ``ray_ssl.data.checks``); ``num_classes`` bounds valid labels. With
    ``pairs_of`` (the paired set's sample count) the rows carry their semantic partners."""
    rows = _Rows(info.name)
    aug_seed = 0 if seed is None else seed
    found = 0
    why_short = "the shard ended early"
    try:
        for sample in iter_shard(resolve(shard_uri, storage)):
            problem = sample_problem(sample, info, found)
            if problem is None and pairs_of is not None:
                problem = partner_problem(sample, pairs_of)
            found += 1
            if problem is None:
                label = sample_label(sample, num_classes)
                idx = sample.int_field("idx")
                if pairs_of is None:
                    rows.add(sample.key, idx, label, sample.image, aug_seed)
                else:
                    pair_idx, pair_image = partner_fields(sample)
                    rows.add(sample.key, idx, label, sample.image, aug_seed, pair_idx, pair_image)
            else:
                rows.add_corrupt(sample.key, aug_seed, describe(info.name, sample.key, *problem))
            if rows.nbytes >= TARGET_BLOCK_BYTES or len(rows) >= MAX_BLOCK_ROWS:
                yield _finish(rows, seed, info.first_idx + found)
                rows = _Rows(info.name)
    except (TruncatedShardError, FileNotFoundError) as err:
        log.warning("shard %s unreadable after %d samples: %s", shard_uri, found, err)
        why_short = f"{type(err).__name__}: {err}"
    for missing in range(found, info.count):
        key = f"#{missing}"  # the sample's position in the shard: its key was never read
        rows.add_corrupt(key, aug_seed, describe(info.name, key, MISSING, why_short))
    if len(rows):
        yield _finish(rows, seed, info.first_idx + found)


def _finish(rows: _Rows, seed: int | None, salt: int) -> pa.Table:
    """The block, its rows shuffled when a seed is given (deterministic per block)."""
    if seed is None:
        return rows.table()
    order = np.random.default_rng([seed, salt]).permutation(len(rows))
    return rows.table(order)


def _read_shards(
    uri: str,
    shards: list[ShardInfo],
    storage: StorageConfig,
    seed: int | None,
    num_classes: int,
    pairs_of: int | None,
) -> Iterator[pa.Table]:
    for info in shards:
        shard_uri = f"{uri.rstrip('/')}/{info.name}"
        yield from read_shard_rows(shard_uri, info, storage, seed, num_classes, pairs_of)


class ShardSetDatasource(Datasource):
    """Read tasks over the shards a manifest lists, in a per-epoch shuffled order; with
    ``with_pairs`` the rows carry their semantic partners (the set must have them)."""

    def __init__(
        self,
        uri: str,
        manifest: Manifest,
        storage: StorageConfig,
        shuffle_seed: int | None = None,
        epoch: int = 0,
        with_pairs: bool = False,
    ):
        super().__init__()
        self.uri, self.manifest, self.storage = uri, manifest, storage
        self.shuffle_seed, self.epoch, self.with_pairs = shuffle_seed, epoch, with_pairs

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
            pairs_of = self.manifest.count if self.with_pairs else None
            read = functools.partial(
                _read_shards, self.uri, members, self.storage, seed, len(self.manifest.classes),
                pairs_of,
            )  # fmt: skip
            tasks.append(ReadTask(read, metadata, RAW_SCHEMA, per_task_row_limit))
        return tasks
