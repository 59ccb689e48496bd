"""What makes a shard sample unusable, judged alike by the training reader, evaluation and
``ray-ssl shards inspect``.

A sample is *corrupt* (skipped and counted against ``data.max_corrupt_fraction``) when it lies
beyond its shard's count in the manifest, lacks an image or an integer ``idx``, has an ``idx``
outside its shard's range, or (once decoded) its image bytes do not decode. A sample whose
``cls`` is missing, not an integer or not one of the manifest's classes is *unlabelled*
(label -1): it trains, but evaluation leaves it out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray_ssl.data.tario import TarSample

if TYPE_CHECKING:
    from ray_ssl.data.shards import ShardInfo

UNKNOWN_LABEL = -1

# Kinds of bad samples, as counted by `shards inspect` and named in CorruptDataError.
UNDECODABLE = "undecodable image"
NO_IMAGE_OR_IDX = "no image or integer idx"
IDX_OUT_OF_RANGE = "idx out of range"
BEYOND_MANIFEST = "beyond the manifest"
MISSING = "missing (truncated or absent)"
BAD_LABEL = "bad label"


def sample_problem(sample: TarSample, info: ShardInfo, position: int) -> tuple[str, str] | None:
    """(kind, detail) of why sample number ``position`` of shard ``info`` cannot train, or None.

    The image bytes are not decoded here (see :data:`UNDECODABLE`)."""
    if position >= info.count:
        return BEYOND_MANIFEST, f"the manifest lists {info.count} samples in {info.name}"
    idx = sample.int_field("idx")
    if sample.image is None or idx is None:
        return NO_IMAGE_OR_IDX, f"fields {sorted(sample.fields)}"
    last = info.first_idx + info.count - 1
    if not info.first_idx <= idx <= last:
        return IDX_OUT_OF_RANGE, f"idx {idx} outside {info.name}'s {info.first_idx}..{last}"
    return None


def sample_label(sample: TarSample, num_classes: int) -> int:
    """The sample's class, or ``UNKNOWN_LABEL`` when ``cls`` is missing, not an integer or not
    below ``num_classes`` (0: the manifest names no classes, any non-negative cls is kept)."""
    label = sample.int_field("cls")
    if label is None or label < 0 or (num_classes and label >= num_classes):
        return UNKNOWN_LABEL
    return label


def label_problem(sample: TarSample, num_classes: int) -> str | None:
    """Why the sample's ``cls`` is not a class of the manifest, or None when it is."""
    if sample_label(sample, num_classes) != UNKNOWN_LABEL:
        return None
    raw = sample.fields.get("cls")
    if raw is None:
        return "no cls"
    return f"cls {raw[:20]!r} is not one of the {num_classes} classes"


def describe(shard: str, key: str, kind: str, detail: str) -> str:
    """One bad sample, as reported: ``shard:key (kind: detail)`` on one line."""
    text = f"{shard}:{key} ({kind}: {detail})"
    return " ".join(text.split())
