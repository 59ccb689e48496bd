"""Ray Data pipelines from a shard set (local path, file:// or s3://) to training batches.

``build_train_dataset`` reads the shards in a per-epoch shuffled order, decodes each image and
builds the views the method asks for (``ViewConfig``) in Ray Data tasks. On each Train worker,
``WorkerBatchIterator`` turns its ``DataIterator`` (``ray.train.get_dataset_shard("train")`` or a
``streaming_split`` part) into the batch contract: crop-major uint8 crops, masks, idx, labels on
the training device. Corrupt samples are skipped and counted; when a pass holds more of them
than ``max_corrupt_fraction`` of its samples (the rule: :func:`corrupt_limit_exceeded`), the
iterator raises :class:`CorruptDataError` naming the set and the first bad keys.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray
import torch
from PIL import Image
from ray.data.block import BlockAccessor

from ray_ssl.config import DataConfig, StorageConfig, ViewConfig
from ray_ssl.data.checks import UNKNOWN_LABEL, sample_label, sample_problem
from ray_ssl.data.datasource import ShardSetDatasource, epoch_seed
from ray_ssl.data.decode import build_views_batch, decode_rows
from ray_ssl.data.errors import CorruptDataError, ShardError
from ray_ssl.data.position import ConsumedFilter
from ray_ssl.data.row_pool import FifoRows, Rows, ShuffledRows
from ray_ssl.data.shards import Manifest, check_pairs, iter_shard, read_manifest
from ray_ssl.data.tario import TruncatedShardError
from ray_ssl.data.views import CorruptImageError, crop_counts, decode_image, mask_generator
from ray_ssl.storage import pin_endpoint, resolve

log = logging.getLogger(__name__)

REPORTED_PROBLEMS = 3  # bad samples named in a CorruptDataError
TARGET_VIEW_BLOCK_BYTES = 32 << 20  # most output of one decode+views task
MIN_VIEW_BATCH, MAX_VIEW_BATCH = 8, 1024
MIN_TASKS_PER_CPU = 4  # per pass, so that CPUs idle at a pass's end waste at most 1/8 of it
CROP_COLUMNS = ("global_crops", "local_crops", "masks")


def view_batch_rows(views: ViewConfig, batch_rows: int, samples: int, cpus: int) -> int:
    """Rows per decode+views task.

    At most ``TARGET_VIEW_BLOCK_BYTES`` of output, and few enough rows that each of ``cpus`` gets
    ``MIN_TASKS_PER_CPU`` tasks in a pass of ``samples``; then a multiple or a divisor of the
    consumer's ``batch_rows``, so that whole blocks fill batches. Measured on 2 CPUs
    (benchmarks/data_throughput.py): 32-row tasks beat 16 by 4% on 960 images, and 16 beat 32
    by 11% on 160, where 5 tasks of 32 leave a CPU idle for the last one.
    """
    n_global, n_local = crop_counts(views)
    per_sample = views.channels * (n_global * views.global_size**2 + n_local * views.local_size**2)
    limit = min(
        TARGET_VIEW_BLOCK_BYTES // max(per_sample, 1),
        samples // max(MIN_TASKS_PER_CPU * cpus, 1),
        MAX_VIEW_BATCH,
    )
    limit = max(limit, MIN_VIEW_BATCH)
    if limit >= batch_rows:
        return batch_rows * (limit // batch_rows)
    divisor = max(d for d in range(1, limit + 1) if batch_rows % d == 0)
    return divisor if divisor >= MIN_VIEW_BATCH else limit


def _read_raw(
    uri: str,
    manifest: Manifest,
    storage: StorageConfig,
    reader: str,
    shuffle_seed: int | None,
    epoch: int,
    with_pairs: bool = False,
) -> ray.data.Dataset:
    """Raw rows from our block datasource (default: measured faster, and a truncated shard is
    counted as corrupt samples) or from ``ray.data.read_webdataset``, whose tar reader fails the
    whole read on a truncated shard. ``with_pairs``: the rows carry their semantic partners."""
    pinned = pin_endpoint(storage)
    if reader == "blocks":
        source = ShardSetDatasource(uri, manifest, pinned, shuffle_seed, epoch, with_pairs)
        return ray.data.read_datasource(source)
    if reader != "ray_webdataset":
        raise ShardError(f"unknown data.reader '{reader}'; choose blocks or ray_webdataset")
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    from ray.data import FileShuffleConfig

    loc = resolve(uri, pinned)
    shuffle = None
    if shuffle_seed is not None:
        shuffle = FileShuffleConfig(
            seed=epoch_seed(shuffle_seed, epoch), reseed_after_execution=True
        )
    return ray.data.read_webdataset(
        [f"{loc.path}/{s.name}" for s in manifest.shards],
        filesystem=PyFileSystem(FSSpecHandler(loc.fs)),
        decoder=None,
        shuffle=shuffle,
        include_paths=True,  # __url__: the shard whose idx range each row must be in
    )


def build_train_dataset(
    data: DataConfig,
    views: ViewConfig,
    storage: StorageConfig,
    epoch: int = 0,
    consumer_batch: int | None = None,
    consumed: ConsumedFilter | None = None,
) -> ray.data.Dataset:
    """Shards -> decoded views, shard order shuffled per epoch.

    The dataset can be iterated many times (one Train epoch each); the first iteration reads
    epoch ``epoch`` (pass the resume epoch here) and each later one the next epoch's order.
    ``consumer_batch`` is the batch each consumer takes (default ``data.batch_size``); decode
    blocks are sized to fill it evenly. ``consumed``: samples of the first epoch to leave out
    (a resumed pass; :mod:`ray_ssl.data.position`).
    """
    manifest = read_manifest(data.uri, storage)
    check_pairs(manifest, views.positives, data.uri)
    cpus = data.decode_concurrency or int(ray.cluster_resources().get("CPU", 1))
    rows = view_batch_rows(views, consumer_batch or data.batch_size, manifest.count, cpus)
    with_pairs = views.positives != "augment"  # otherwise partner bytes are never read
    raw = _read_raw(data.uri, manifest, storage, data.reader, data.shuffle_seed, epoch, with_pairs)
    ranges = {s.name: (s.first_idx, s.count) for s in manifest.shards}
    dataset = raw.map_batches(
        build_views_batch,
        fn_kwargs={
            "views": views,
            "shard_ranges": ranges,
            "num_classes": len(manifest.classes),
            "consumed": consumed,
        },
        batch_size=rows,
        batch_format="numpy",
        concurrency=data.decode_concurrency,
    )
    # Ray Data's per-operator reservation held decode+views to about one task at a time on a
    # 2-CPU node (benchmarks/data_throughput.py: 66 -> 99 img/s with it off). This pipeline is
    # one CPU-heavy operator behind a cheap read, so a reservation only idles CPUs; the global
    # CPU and object-store limits still hold. The dataset's own context scopes the change.
    dataset.context.op_resource_reservation_enabled = False
    return dataset


def corrupt_limit_exceeded(corrupt: int, pass_size: int, max_fraction: float) -> bool:
    """The corrupt-sample rule: a pass stops once its corrupt samples exceed ``max_fraction`` of
    the pass's size (the manifest's sample count).

    Judged on the count, not on a running rate: bad samples cluster by shard, so a rate over the
    first few hundred samples stops runs that are under the limit overall. A count can only
    grow, so a pass under the limit overall never stops, and one over it stops as soon as the
    count proves it (a 25%-corrupt set at a 1% limit stops 4% of the way in).
    """
    return corrupt > max_fraction * pass_size


@dataclass
class DataStats:
    """Samples this iterator has delivered in batches plus the corrupt ones it skipped, those
    corrupt samples, and the first few of them as ``shard:key (reason)``."""

    seen: int = 0
    corrupt: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def corrupt_fraction(self) -> float:
        return self.corrupt / self.seen if self.seen else 0.0

    def add_corrupt(self, problems: np.ndarray) -> None:
        self.seen += len(problems)
        self.corrupt += len(problems)
        room = REPORTED_PROBLEMS - len(self.problems)
        self.problems += [str(p) for p in problems[:room]] if room > 0 else []


def corrupt_data_error(
    uri: str, corrupt: int, pass_size: int, max_fraction: float, problems: list[str]
) -> CorruptDataError:
    """The one-line error: the set, how many and the limit, the first bad samples, the fix."""
    named = "; ".join(problems[:REPORTED_PROBLEMS]) or "none recorded"
    return CorruptDataError(
        f"{corrupt} corrupt samples in a pass over {uri} exceed {max_fraction * 100:.4g}% of the "
        f"{pass_size} samples in the pass (data.max_corrupt_fraction={max_fraction}); first: "
        f"{named}; check the set with `ray-ssl shards inspect {uri}` and rewrite it, or raise "
        "data.max_corrupt_fraction"
    )


class WorkerBatchIterator(Iterator[dict[str, torch.Tensor]]):
    """Batches of exactly ``batch_size`` good samples from one worker's DataIterator, in the batch
    contract; ``.stats`` counts seen and corrupt samples.

    ``pass_size`` is the number of samples in the whole pass (all workers together: the
    manifest's count); this worker's corrupt samples alone stop it once they exceed
    ``max_corrupt_fraction`` of it (:func:`corrupt_limit_exceeded`). Without it the pass is what
    this iterator reads, judged at its end. ``uri`` names the set in the error.
    ``consumed_idx`` and ``consumed_problems`` record what it delivered or met (the data
    position, :mod:`ray_ssl.data.position`): idx of the good samples in delivered batches, the
    corrupt samples as ``shard:key (reason)``. ``shuffle_buffer`` > 0 draws each batch at random
    from that many buffered rows (:class:`~ray_ssl.data.row_pool.ShuffledRows`, seeded by
    ``shuffle_seed``); 0 batches rows in arrival order.
    """

    def __init__(
        self,
        shard: ray.data.DataIterator,
        batch_size: int,
        views: ViewConfig,
        device: torch.device,
        max_corrupt_fraction: float,
        drop_last: bool = True,
        prefetch_batches: int = 2,
        pass_size: int | None = None,
        uri: str = "the shard set",
        shuffle_buffer: int = 0,
        shuffle_seed: int = 0,
    ):
        self.shard, self.batch_size, self.views = shard, batch_size, views
        self.shuffle_buffer, self.shuffle_seed = shuffle_buffer, shuffle_seed
        self.device = torch.device(device)
        self.max_corrupt_fraction = max_corrupt_fraction
        self.drop_last, self.prefetch_batches = drop_last, prefetch_batches
        self.pass_size, self.uri = pass_size, uri
        self.stats = DataStats()
        self.consumed_idx: list[np.ndarray] = []
        self.consumed_problems: list[str] = []
        self.masks = mask_generator(views)
        self._batches = self._generate()

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(self._batches)

    def _check_corrupt(self, final: bool) -> None:
        s = self.stats
        pass_size = self.pass_size if self.pass_size is not None else s.seen
        if (final or self.pass_size is not None) and corrupt_limit_exceeded(
            s.corrupt, pass_size, self.max_corrupt_fraction
        ):
            raise corrupt_data_error(
                self.uri, s.corrupt, pass_size, self.max_corrupt_fraction, s.problems
            )

    def _check_views(self, batch: dict[str, np.ndarray]) -> None:
        """The dataset must have been built for the same view spec as this iterator."""
        n_global, n_local = crop_counts(self.views)
        got = (
            batch["global_crops"].shape[1],
            batch["local_crops"].shape[1] if "local_crops" in batch else 0,
        )
        if got != (n_global, n_local) or ("mask_seed" in batch) != (self.views.mask != "none"):
            raise ValueError(
                f"dataset rows have {got[0]} global / {got[1]} local crops (masks: "
                f"{'mask_seed' in batch}) but the view spec asks for {n_global} / {n_local} "
                f"(mask: {self.views.mask}); build the dataset with the method's view spec"
            )

    def _blocks(self) -> Iterator[Rows]:
        """The shard's blocks as numpy columns, one per Arrow chunk: a block assembled from
        several chunks is not combined (a copy of every crop) before it is cut into batches."""
        for table in self.shard.iter_batches(
            batch_size=None, batch_format="pyarrow", prefetch_batches=self.prefetch_batches
        ):
            for chunk in table.to_batches():
                yield BlockAccessor.for_block(pa.Table.from_batches([chunk])).to_numpy()

    def _generate(self) -> Iterator[dict[str, torch.Tensor]]:
        # Whole blocks: cutting them into batches here, straight into the batch contract,
        # saves Ray's batcher a copy of every crop (profiled in the consumer).
        # Good rows count as seen when a batch delivers them, so that rows read ahead and
        # buffered here are not counted twice across a resume.
        pool = (
            ShuffledRows(self.shuffle_buffer, self.shuffle_seed)
            if self.shuffle_buffer
            else FifoRows()
        )
        for number, block in enumerate(self._blocks()):
            if number == 0:
                self._check_views(block)
            corrupt, problems = block.pop("corrupt"), block.pop("problem")
            bad = int(corrupt.sum())
            if bad:
                self.stats.add_corrupt(problems[corrupt])
                self.consumed_problems += [str(p) for p in problems[corrupt]]
                self._check_corrupt(final=False)
                block = {name: column[~corrupt] for name, column in block.items()}
            if len(corrupt) > bad:
                pool.add(block)
            while pool.ready(self.batch_size):
                yield self._deliver(pool.take(self.batch_size))
        self._check_corrupt(final=True)
        while len(pool) >= self.batch_size:  # a shuffle buffer drains at the pass's end
            yield self._deliver(pool.take(self.batch_size))
        if len(pool) and not self.drop_last:
            yield self._deliver(pool.take(len(pool)))

    def _deliver(self, rows: list[Rows]) -> dict[str, torch.Tensor]:
        """Count the rows as seen and consumed, then assemble their batch."""
        count = sum(len(part["idx"]) for part in rows)
        self.stats.seen += count
        self.consumed_idx.append(np.concatenate([part["idx"] for part in rows]))
        return self._contract(rows)

    def _contract(self, rows: list[Rows]) -> dict[str, torch.Tensor]:
        """The batch contract of ``rows`` plus the batch's masks, drawn together (Franca's
        collate) from a generator seeded by the batch's per-sample mask seeds."""
        out = to_batch_contract(rows, self.device)
        if self.masks is not None:
            seeds = np.concatenate([part["mask_seed"] for part in rows])
            masks = self.masks.for_batch(len(out["global_crops"]), seeds)
            out["masks"] = torch.from_numpy(masks).to(self.device)
        return out


def _crop_major(pieces: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Per-sample pieces ([b,V,H,W,C] crops or [b,V,Np] masks), in order -> one crop-major
    tensor on ``device`` ([V*B,C,H,W] or [V*B,Np]) with one copy on the host: on CPU each piece
    is permuted straight into the output; for CUDA the pieces are packed into pinned memory and
    permuted on the device."""
    first = pieces[0]
    total, views, inner = sum(len(p) for p in pieces), first.shape[1], first.shape[2:]
    image = first.ndim == 5
    with warnings.catch_warnings():  # Arrow-backed arrays are read-only; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        hosts = [torch.from_numpy(p) for p in pieces]
    if device.type == "cuda":
        packed = torch.empty((total, views, *inner), dtype=hosts[0].dtype, pin_memory=True)
        torch.cat(hosts, out=packed)
        moved = packed.to(device, non_blocking=True)
        layout = moved.permute(1, 0, 4, 2, 3) if image else moved.transpose(0, 1)
        return layout.reshape(views * total, *layout.shape[2:])
    shape = (views, total, inner[2], *inner[:2]) if image else (views, total, *inner)
    out = torch.empty(shape, dtype=hosts[0].dtype)
    start = 0
    for host in hosts:
        stop = start + len(host)
        out[:, start:stop] = host.permute(1, 0, 4, 2, 3) if image else host.transpose(0, 1)
        start = stop
    return out.reshape(views * total, *shape[2:]).to(device)


def to_batch_contract(batch: Rows | list[Rows], device: torch.device) -> dict[str, torch.Tensor]:
    """Per-sample numpy columns ([B,V,H,W,C] crops, [B,V,Np] masks), as one dict or as row
    pieces in order, -> the batch contract on ``device``: crop-major [V*B,C,H,W] uint8 crops
    (row v*B+b is view v of sample b), [V*B,Np] masks, int64 idx and label, and with semantic
    positives int64 pair_idx (the idx of the image the second view shows). The crops are new
    tensors, never views of the (read-only) input."""
    parts = [batch] if isinstance(batch, dict) else batch
    device = torch.device(device)
    out = {
        name: _crop_major([p[name] for p in parts], device)
        for name in CROP_COLUMNS
        if name in parts[0]
    }
    for name in ("idx", "label", "pair_idx"):
        if name not in parts[0]:
            continue
        values = np.concatenate([p[name] for p in parts])
        out[name] = torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)
    return out


def read_samples(uri: str, storage: StorageConfig) -> ray.data.Dataset:
    """Decoded rows {key, idx, label, image uint8 HWC} of a shard set, in shard order."""
    manifest = read_manifest(uri, storage)
    raw = ray.data.read_datasource(ShardSetDatasource(uri, manifest, pin_endpoint(storage)))
    return raw.map_batches(
        decode_rows, fn_kwargs={"channels": manifest.channels}, batch_format="numpy"
    )


def _fit(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop a square."""
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


@dataclass
class EvalSet:
    """Decoded samples for evaluation, and how many were left out: unlabelled ones (when only
    labelled ones were asked for) and corrupt ones (``ray_ssl.data.checks``)."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]; UNKNOWN_LABEL only when unlabelled samples are kept
    idx: np.ndarray  # int64 [N]
    unlabelled: int = 0
    corrupt: int = 0


def load_eval_set(
    uri: str,
    storage: StorageConfig,
    limit: int | None = None,
    size: int | None = None,
    labelled_only: bool = True,
) -> EvalSet:
    """The first ``limit`` usable samples in shard order, counting what is left out on the way.

    Reads sequentially in this process (no Ray), for small evaluation sets. With ``size`` every
    image is resized and centre-cropped to size x size; without it the images must share a shape.
    With ``labelled_only`` (kNN and linear evaluation) unlabelled samples are left out: a label
    of -1 would index no class.
    """
    manifest = read_manifest(uri, storage)
    loc = resolve(uri, storage)
    images, labels, indices = [], [], []
    unlabelled = corrupt = 0
    for info in manifest.shards:
        found = 0
        try:
            for sample in iter_shard(loc.join(info.name)):
                if limit is not None and len(images) >= limit:
                    break
                problem = sample_problem(sample, info, found)
                found += 1
                try:
                    image = None if problem else decode_image(sample.image, manifest.channels)
                except CorruptImageError:
                    image = None
                if image is None:
                    corrupt += 1
                    continue
                label = sample_label(sample, len(manifest.classes))
                unlabelled += label == UNKNOWN_LABEL
                if labelled_only and label == UNKNOWN_LABEL:
                    continue
                array = np.asarray(_fit(image, size) if size else image)
                images.append(array[:, :, None] if array.ndim == 2 else array)
                labels.append(label)
                indices.append(sample.int_field("idx"))
            else:
                corrupt += max(0, info.count - found)
        except (TruncatedShardError, FileNotFoundError) as err:
            log.warning("skipping the rest of %s: %s", info.name, err)
            corrupt += max(0, info.count - found)
        if limit is not None and len(images) >= limit:
            break
    if len({a.shape for a in images}) > 1:
        raise ShardError(f"images in {uri} differ in size; pass size= to resize them")
    if not images:
        what = "labelled samples" if labelled_only else "readable samples"
        raise ShardError(
            f"no {what} in {uri} ({unlabelled} unlabelled, {corrupt} corrupt); check it with "
            f"`ray-ssl shards inspect {uri}`"
        )
    if unlabelled or corrupt:
        log.warning(
            "%s: %d unlabelled samples (%s) and %d corrupt ones left out",
            uri,
            unlabelled,
            "left out" if labelled_only else "kept",
            corrupt,
        )
    return EvalSet(
        np.stack(images), np.asarray(labels, np.int64), np.asarray(indices, np.int64),
        unlabelled, corrupt,
    )  # fmt: skip


def load_labelled_arrays(
    uri: str,
    storage: StorageConfig,
    limit: int | None = None,
    size: int | None = None,
    labelled_only: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`load_eval_set` as (images uint8 [N,H,W,C], labels, idx)."""
    data = load_eval_set(uri, storage, limit, size, labelled_only)
    return data.images, data.labels, data.idx
