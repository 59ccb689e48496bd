"""Ray Data map functions: raw shard rows -> decoded images or augmented views.

They run inside Ray Data tasks and import no torch. Rows whose image does not decode are flagged
``corrupt`` with their ``problem`` (training views) or dropped (decoded samples), never fatal.
With semantic positives (``views.positives`` semantic or mixed) every row's partner image is
decoded too (a partner that does not decode makes its row corrupt, whether or not the pair uses
it), and the output's ``pair_idx`` names the image the second view shows (the row's own idx for
an augmentation pair).
"""

from __future__ import annotations

import logging

import numpy as np

from ray_ssl.config import ViewConfig
from ray_ssl.data.checks import (
    IDX_OUT_OF_RANGE,
    NO_IMAGE_OR_IDX,
    NO_PAIR,
    UNDECODABLE,
    UNDECODABLE_PARTNER,
    UNKNOWN_LABEL,
    describe,
    partner_fields,
    partner_problem,
)
from ray_ssl.data.position import ConsumedFilter
from ray_ssl.data.tario import TarSample
from ray_ssl.data.views import CorruptImageError, ViewBuilder, decode_image, uses_partner

ShardRanges = dict[str, tuple[int, int]]  # shard file name -> (first idx, sample count)

log = logging.getLogger(__name__)


PARTNER_COLUMNS = ("pair.idx", "pair.png", "pair.jpg")  # read_webdataset's partner columns


def _webdataset_to_raw(
    batch: dict[str, np.ndarray], shard_ranges: ShardRanges, num_classes: int, with_pairs: bool
) -> dict[str, np.ndarray]:
    """Rows of ``ray.data.read_webdataset(decoder=None)`` -> the raw-row columns of our reader;
    a row without image or integer idx, or with an idx outside its shard's range, is corrupt, and
    so is one without a usable partner ``with_pairs``."""
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
    pair_idx, pair_image = np.full(n, NO_PAIR, np.int64), np.full(n, b"", dtype=object)
    for i in range(n) if with_pairs else ():
        fields = {name: column(name)[i] for name in ("idx", *PARTNER_COLUMNS)}
        present = {k: v for k, v in fields.items() if isinstance(v, bytes)}  # absent: None/NaN
        sample = TarSample(str(batch["__key__"][i]), present)
        missing = partner_problem(sample, whole_set[1])
        if missing is not None and not problem[i]:
            problem[i] = describe(
                str(column("__url__")[i]).rsplit("/", 1)[-1], sample.key, *missing
            )
        elif missing is None:
            pair_idx[i], pair_image[i] = partner_fields(sample)
    return {
        "key": batch["__key__"],
        "idx": idx,
        "label": label,
        "image": np.array([b if b is not None else b"" for b in images], dtype=object),
        "corrupt": problem != "",
        "seed": np.full(n, -1, np.int64),  # no epoch seed: fresh entropy per sample
        "problem": problem,
        "shard": np.array([str(u).rsplit("/", 1)[-1] for u in column("__url__")], dtype=object),
        "pair_idx": pair_idx,
        "pair_image": pair_image,
    }


def build_views_batch(
    batch: dict[str, np.ndarray],
    views: ViewConfig,
    shard_ranges: ShardRanges | None = None,
    num_classes: int = 0,
    consumed: ConsumedFilter | None = None,
) -> dict[str, np.ndarray]:
    """Raw rows -> decoded, augmented views; rows that fail to decode are flagged ``corrupt``
    with their ``problem``. Rows of ``read_webdataset`` are checked against ``shard_ranges``.
    With semantic positives the second crop of a pair is cut from the row's partner (always, or
    with p = ``views.semantic_p``) and ``pair_idx`` says which image it shows. Rows that
    ``consumed`` lists (a resumed pass, ``ray_ssl.data.position``) are left out."""
    semantic = views.positives != "augment"
    if "__key__" in batch:
        batch = _webdataset_to_raw(batch, shard_ranges or {}, num_classes, semantic)
    builder = ViewBuilder(views)
    corrupt = np.asarray(batch["corrupt"], dtype=bool).copy()
    n = len(corrupt)
    problem = np.array(batch["problem"] if "problem" in batch else [""] * n, dtype=object)
    shown = np.asarray(batch["idx"], np.int64).copy()  # the image each second view is cut from
    skip = np.zeros(n, dtype=bool)
    if consumed is not None:
        skip = ~corrupt & consumed.good_consumed(batch["idx"])
    outputs = []
    for i, (data, idx, seed) in enumerate(
        zip(batch["image"], batch["idx"], batch["seed"], strict=True)
    ):
        partner = None
        if skip[i]:
            outputs.append(builder.empty())
            continue
        if not corrupt[i]:
            key, shard = str(batch["key"][i]), str(batch["shard"][i]) if "shard" in batch else "?"
            kind = UNDECODABLE
            try:
                image = decode_image(data, views.channels)
                kind = UNDECODABLE_PARTNER
                partner = decode_image(batch["pair_image"][i], views.channels) if semantic else None
            except CorruptImageError as err:
                log.warning("skipping sample %s: %s (%s)", key, kind, err)
                corrupt[i] = True
                problem[i] = describe(shard, key, kind, str(err))
        if corrupt[i]:
            outputs.append(builder.empty())
            continue
        rng = np.random.default_rng([int(seed), int(idx)] if seed >= 0 else None)
        if partner is not None and uses_partner(views, rng):
            shown[i] = batch["pair_idx"][i]
        else:
            partner = None
        outputs.append(builder(image, rng, partner))
    result = {name: np.stack([o[name] for o in outputs]) for name in outputs[0]}
    if semantic:
        result["pair_idx"] = shown
    result.update(
        idx=np.asarray(batch["idx"], np.int64),
        label=np.asarray(batch["label"], np.int64),
        corrupt=corrupt,
        problem=problem,
    )
    if consumed is None:
        return result
    keep = ~skip
    keep[corrupt] &= ~consumed.corrupt_consumed(problem[corrupt])  # text checks: bad rows only
    return {name: column[keep] for name, column in result.items()}


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
