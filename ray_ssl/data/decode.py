"""Ray Data map functions: raw shard rows -> decoded images or augmented views.

They run inside Ray Data tasks and import no torch. Rows whose image does not decode are flagged
``corrupt`` (training views) or dropped (decoded samples), never fatal.
"""

from __future__ import annotations

import logging

import numpy as np

from ray_ssl.config import ViewConfig
from ray_ssl.data.datasource import UNKNOWN_LABEL
from ray_ssl.data.views import CorruptImageError, ViewBuilder, decode_image

log = logging.getLogger(__name__)


def _webdataset_to_raw(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of ``ray.data.read_webdataset(decoder=None)`` -> the raw-row columns of our reader."""
    n = len(batch["__key__"])

    def column(name: str) -> np.ndarray:
        return batch[name] if name in batch else np.full(n, None, dtype=object)

    images = [p if p is not None else j for p, j in zip(column("png"), column("jpg"), strict=True)]
    idx, label, corrupt = (
        np.full(n, -1, np.int64),
        np.full(n, UNKNOWN_LABEL, np.int64),
        np.zeros(n, bool),
    )
    for i, (raw_idx, raw_cls) in enumerate(zip(column("idx"), column("cls"), strict=True)):
        try:
            idx[i] = int(raw_idx)
        except (TypeError, ValueError):
            corrupt[i] = True
        try:
            label[i] = int(raw_cls)
        except (TypeError, ValueError):
            label[i] = UNKNOWN_LABEL
        corrupt[i] |= images[i] is None
    return {
        "key": batch["__key__"],
        "idx": idx,
        "label": label,
        "image": np.array([b if b is not None else b"" for b in images], dtype=object),
        "corrupt": corrupt,
        "seed": np.full(n, -1, np.int64),  # no epoch seed: fresh entropy per sample
    }


def build_views_batch(batch: dict[str, np.ndarray], views: ViewConfig) -> dict[str, np.ndarray]:
    """Raw rows -> decoded, augmented views; rows that fail to decode are flagged ``corrupt``."""
    if "__key__" in batch:
        batch = _webdataset_to_raw(batch)
    builder = ViewBuilder(views)
    corrupt = np.asarray(batch["corrupt"], dtype=bool).copy()
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
