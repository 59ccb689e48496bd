"""A worker's stream of batches over successive passes of the data.

Pass ``p`` is ``build_train_dataset(..., epoch=p)``: its shard order and augmentation seeds are
fixed by (``data.shuffle_seed``, p). A pass gives ``steps_per_pass = dataset size // global
batch`` steps, so the pass is a function of the step alone: pass ``step // steps_per_pass``,
``step % steps_per_pass`` global batches already taken. At the start of each pass, rank 0 builds
that pass's dataset and ``streaming_split``s it over the workers (what Ray Train's
``DataConfig`` does: equal shares, locality hints) and broadcasts the split iterators, so every
rank opens the pass at the same step.

The data position within the pass is global, not per rank (:mod:`ray_ssl.data.position`): at a
checkpoint the ranks pool the samples they consumed into a :class:`PassProgress`; resuming
mid-pass, at any world size, rebuilds the pass without those samples (nothing is read twice or
skipped), and the global batch stays ``data.batch_size`` (each of ``n`` workers takes
``batch_size / n``).

Corrupt samples are judged against the whole pass (``corrupt_limit_exceeded``): each worker
stops as soon as its own count exceeds the limit, and at the end of a pass the ranks add up
their counts, so bad samples spread over the workers are judged together.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
import torch

from ray_ssl.config import Config, ViewConfig
from ray_ssl.data.datasource import epoch_seed
from ray_ssl.data.position import ConsumedFilter, PassProgress
from ray_ssl.data.shards import read_manifest
from ray_ssl.data.stream import (
    WorkerBatchIterator,
    build_train_dataset,
    corrupt_data_error,
    corrupt_limit_exceeded,
)
from ray_ssl.train.safe_load import CheckpointError

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def _broadcast_object(obj: Any, world_size: int) -> Any:
    if world_size == 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def _all_gather_object(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _all_node_ids(world_size: int) -> list[str]:
    return _all_gather_object(ray.get_runtime_context().get_node_id(), world_size)


class PassStream:
    """Exactly one batch of ``batch_size / world_size`` samples per call, pass after pass."""

    def __init__(
        self,
        config: Config,
        views: ViewConfig,
        steps_per_pass: int,
        device: torch.device,
        rank: int,
        world_size: int,
        start_step: int = 0,
        progress: PassProgress | None = None,
    ):
        self.config, self.views, self.device = config, views, device
        self.steps_per_pass = steps_per_pass
        self.rank, self.world_size = rank, world_size
        self.per_worker_batch = config.data.batch_size // world_size
        self.pass_index, self.position = divmod(start_step, steps_per_pass)
        # What earlier launches consumed of the pass this launch starts in.
        self.carried = PassProgress(self.pass_index)
        if self.position:
            if progress is None or progress.pass_index != self.pass_index:
                raise CheckpointError(
                    f"resuming at step {start_step} (pass {self.pass_index}) needs that pass's "
                    f"consumed samples; the checkpoint holds those of pass "
                    f"{progress.pass_index if progress else None}"
                )
            self.carried = progress
        self.node_ids = _all_node_ids(world_size)
        self._iterator: Any = None
        self._pass_size = 0
        self._last: Batch | None = None
        self.finished_seen = self.finished_corrupt = 0
        self.repeated_batches = 0

    @property
    def seen(self) -> int:
        """Samples trained on by this worker in this launch, corrupt ones included."""
        current = self._iterator.stats.seen if self._iterator else 0
        return self.finished_seen + current

    @property
    def corrupt(self) -> int:
        current = self._iterator.stats.corrupt if self._iterator else 0
        return self.finished_corrupt + current

    def progress(self) -> PassProgress:
        """The current pass's consumed samples over all ranks and launches (all ranks call)."""
        mine: tuple[list[Any], list[str]] = ([], [])
        if self._iterator is not None:
            mine = (self._iterator.consumed_idx, self._iterator.consumed_problems)
        gathered = _all_gather_object(mine, self.world_size)
        idx = [part for parts, _ in gathered for part in parts]
        problems = [p for _, named in gathered for p in named]
        return self.carried.merged(idx, problems)

    def _judge_pass(self) -> None:
        """All ranks, at the end of a pass: stop when the pass's corrupt samples, added up over
        the workers, exceed the limit."""
        stats = self._iterator.stats
        counts = _all_gather_object((stats.corrupt, stats.problems), self.world_size)
        corrupt = sum(count for count, _ in counts) + len(self.carried.corrupt)
        limit = self.config.data.max_corrupt_fraction
        if corrupt_limit_exceeded(corrupt, self._pass_size, limit):
            problems = self.carried.corrupt + [p for _, named in counts for p in named]
            raise corrupt_data_error(
                self.config.data.uri, corrupt, self._pass_size, limit, problems
            )

    def _open_pass(self) -> None:
        if self._iterator is not None:
            self._judge_pass()
            self.finished_seen += self._iterator.stats.seen
            self.finished_corrupt += self._iterator.stats.corrupt
        if self.carried.pass_index != self.pass_index:
            self.carried = PassProgress(self.pass_index)
        splits = None
        if self.rank == 0:
            dataset = build_train_dataset(
                self.config.data,
                self.views,
                self.config.storage,
                epoch=self.pass_index,
                consumer_batch=self.per_worker_batch,
                consumed=ConsumedFilter.of(self.carried) if self.carried.consumed else None,
            )
            # The order within a pass is then a function of (seed, pass) for exact resumes.
            dataset.context.execution_options.preserve_order = True
            dataset.context.enable_progress_bars = False  # the training bar reports progress
            splits = dataset.streaming_split(
                self.world_size, equal=True, locality_hints=self.node_ids
            )
            pass_size = read_manifest(self.config.data.uri, self.config.storage).count
            splits = (splits, pass_size)
        splits, self._pass_size = _broadcast_object(splits, self.world_size)
        self._iterator = WorkerBatchIterator(
            splits[self.rank],
            self.per_worker_batch,
            self.views,
            self.device,
            self.config.data.max_corrupt_fraction,
            prefetch_batches=self.config.data.prefetch_batches,
            pass_size=self._pass_size,
            uri=self.config.data.uri,
            shuffle_buffer=self.config.data.shuffle_buffer,
            shuffle_seed=epoch_seed(self.config.data.shuffle_seed, self.pass_index) + self.rank,
        )
        if self.carried.consumed:
            log.info(
                "pass %d: resuming after %d consumed samples (%d steps)",
                self.pass_index,
                self.carried.consumed,
                self.position,
            )

    def _next_or_repeat(self) -> Batch:
        try:
            self._last = next(self._iterator)
        except StopIteration:
            # Corrupt samples left this worker's share short of a full pass: keep step with
            # the other ranks by reusing the last batch (counted in ``repeated_batches``).
            if self._last is None:
                raise
            self.repeated_batches += 1
            log.warning(
                "pass %d ran short on rank %d; repeating a batch", self.pass_index, self.rank
            )
        return self._last

    def next_batch(self) -> Batch:
        """The next batch; opens the next pass when the current one is used up."""
        if self._iterator is None:
            self._open_pass()
        elif self.position == self.steps_per_pass:
            self.pass_index, self.position = self.pass_index + 1, 0
            self._open_pass()
        batch = self._next_or_repeat()
        self.position += 1
        return batch
