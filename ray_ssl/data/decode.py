"""Ray Data map functions: raw shard rows -> decoded images or augmented views.

They run inside Ray Data tasks and import no torch. Rows whose image does not decode are flagged
``corrupt`` with their ``problem`` (training views) or dropped (decoded samples), never fatal.
"""

from __future__ import annotations

import logging

import numpy as np

from ray_ssl.config import ViewConfig
from ray_ssl.data.checks import (
    IDX_OUT_OF_RANGE,
    NO_IMAGE_OR_IDX,
    UNDECODABLE,
    UNKNOWN_LABEL,
    describe,
)
from ray_ssl.data.views import CorruptImageError, ViewBuilder, decode_image

ShardRanges = dict[str, tuple[int, int]]  # shard file name -> (first idx, sample count)

log = logging.getLogger(__name__)


def _webdataset_to_raw(
    batch: dict[str, np.ndarray], shard_ranges: ShardRanges, num_classes: int
) -> dict[str, np.ndarray]:
    """Rows of ``ray.data.read_webdataset(decoder=None)`` -> the raw-row columns of our reader;
    a row without image or integer idx, or with an idx outside its shard's range, is corrupt."""
    n = len(batch["__key__"])

    def column(name: str) -> np.ndarray:
        return batch[name] if name in batch else np.full(n, None, dtype=object)

    images = [p if p is not None else j for p, j in zip(column("png"), column("jpg"), strict=True)]
    idx, label = np.full(n, -1, np.int64), np.full(n, UNKNOWN_LABEL, np.int64)
    problem = np.full(n, "", dtype=object)
    whole_set = (0, max((first + count for first, count in shard_ranges.values()), default=0))
    for i, (raw_idx, raw_cls, url) in enumerate(
        zip(column("idx"), column("cls"), column("__url__"), strict=True)
    ):
        shard = str(url).rsplit("/", 1)[-1]
        key = str(batch["__key__"][i])
        try:
            idx[i] = int(raw_idx)
        except (TypeError, ValueError):
            problem[i] = describe(shard, key, NO_IMAGE_OR_IDX, "no integer idx")
        if images[i] is None:
            problem[i] = describe(shard, key, NO_IMAGE_OR_IDX, "no image")
        first, count = shard_ranges.get(shard, whole_set)  # no __url__: the set's range
        if shard_ranges and not problem[i] and not first <= idx[i] < first + count:
            detail = f"idx {idx[i]} outside {shard}'s {first}..{first + count - 1}"
            problem[i] = describe(shard, key, IDX_OUT_OF_RANGE, detail)
        try:
            label[i] = int(raw_cls)
        except (TypeError, ValueError):
            label[i] = UNKNOWN_LABEL
        if label[i] < 0 or (num_classes and label[i] >= num_classes):
            label[i] = UNKNOWN_LABEL
    return {
        "key": batch["__key__"],
        "idx": idx,
        "label": label,
        "image": np.array([b if b is not None else b"" for b in images], dtype=object),
        "corrupt": problem != "",
        "seed": np.full(n, -1, np.int64),  # no epoch seed: fresh entropy per sample
        "problem": problem,
        "shard": np.array([str(u).rsplit("/", 1)[-1] for u in column("__url__")], dtype=object),
    }


def build_views_batch(
    batch: dict[str, np.ndarray],
    views: ViewConfig,
    shard_ranges: ShardRanges | None = None,
    num_classes: int = 0,
) -> dict[str, np.ndarray]:
    """Raw rows -> decoded, augmented views; rows that fail to decode are flagged ``corrupt``
    with their ``problem``. Rows of ``read_webdataset`` are checked against ``shard_ranges``."""
    if "__key__" in batch:
        batch = _webdataset_to_raw(batch, shard_ranges or {}, num_classes)
    builder = ViewBuilder(views)
    corrupt = np.asarray(batch["corrupt"], dtype=bool).copy()
    n = len(corrupt)
    problem = np.array(batch["problem"] if "problem" in batch else [""] * n, dtype=object)
    outputs = []
    for i, (data, idx, seed) in enumerate(
        zip(batch["image"], batch["idx"], batch["seed"], strict=True)
    ):
        if not corrupt[i]:
            try:
                image = decode_image(data, views.channels)
            except CorruptImageError as err:
                log.warning("skipping sample %s: undecodable image (%s)", batch["key"][i], err)
                corrupt[i] = True
                shard = str(batch["shard"][i]) if "shard" in batch else "?"
                problem[i] = describe(shard, str(batch["key"][i]), UNDECODABLE, str(err))
        if corrupt[i]:
            outputs.append(builder.empty())
            continue
        rng = np.random.default_rng([int(seed), int(idx)] if seed >= 0 else None)
        outputs.append(builder(image, rng))
    result = {name: np.stack([o[name] for o in outputs]) for name in outputs[0]}
    result.update(
        idx=np.asarray(batch["idx"], np.int64),
        label=np.asarray(batch["label"], np.int64),
        corrupt=corrupt,
        problem=problem,
    )
    return result


def decode_rows(batch: dict[str, np.ndarray], channels: int) -> dict[str, np.ndarray]:
    """Raw rows -> {key, idx, label, image uint8 HWC}; corrupt rows are dropped."""
    keep, images = [], []
    for i, (data, corrupt) in enumerate(zip(batch["image"], batch["corrupt"], strict=True)):
        if corrupt:
            continue
        try:
            array = np.asarray(decode_image(data, channels))
        except CorruptImageError as err:
            log.warning("skipping sample %s: undecodable image (%s)", batch["key"][i], err)
            continue
        keep.append(i)
        images.append(array[:, :, None] if array.ndim == 2 else array)
    shapes = {a.shape for a in images}
    image_column = (
        np.stack(images) if len(shapes) == 1 else np.array(images + [None], dtype=object)[:-1]
    )
    return {
        "key": np.asarray(batch["key"])[keep],
        "idx": np.asarray(batch["idx"], np.int64)[keep],
        "label": np.asarray(batch["label"], np.int64)[keep],
        "image": image_column,
    }
