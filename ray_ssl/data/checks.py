"""What makes a shard sample unusable, judged alike by the training reader, evaluation and
``ray-ssl shards inspect``.

A sample is *corrupt* (skipped and counted against ``data.max_corrupt_fraction``) when it lies
beyond its shard's count in the manifest, lacks an image or an integer ``idx``, has an ``idx``
outside its shard's range, or (once decoded) its image bytes do not decode; in a set written with
semantic pairs, also when its partner (``pair.idx`` and ``pair.png``/``pair.jpg``) is missing,
names no other sample of the set, or (once decoded) does not decode. A sample whose
``cls`` is missing, not an integer or not one of the manifest's classes is *unlabelled*
(label -1): it trains, but evaluation leaves it out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray_ssl.data.tario import TarSample

if TYPE_CHECKING:
    from ray_ssl.data.shards import ShardInfo

UNKNOWN_LABEL = -1
NO_PAIR = -1  # partner idx of a row read without its semantic partner

# Kinds of bad samples, as counted by `shards inspect` and named in CorruptDataError.
UNDECODABLE = "undecodable image"
NO_IMAGE_OR_IDX = "no image or integer idx"
IDX_OUT_OF_RANGE = "idx out of range"
BEYOND_MANIFEST = "beyond the manifest"
MISSING = "missing (truncated or absent)"
BAD_LABEL = "bad label"
NO_PARTNER = "no semantic partner"
UNDECODABLE_PARTNER = "undecodable partner image"
PARTNER_IMAGE_FIELDS = ("pair.png", "pair.jpg")


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


def partner_fields(sample: TarSample) -> tuple[int | None, bytes | None]:
    """(partner idx, partner's encoded image) of a sample of a paired set; None where absent."""
    image = next((sample.fields[f] for f in PARTNER_IMAGE_FIELDS if f in sample.fields), None)
    return sample.int_field("pair.idx"), image


def partner_problem(sample: TarSample, count: int) -> tuple[str, str] | None:
    """(kind, detail) of why a sample of a paired set of ``count`` samples has no usable
    partner, or None. The partner's image is not decoded here (see :data:`UNDECODABLE_PARTNER`)."""
    partner_idx, image = partner_fields(sample)
    if partner_idx is None or image is None:
        return NO_PARTNER, f"fields {sorted(sample.fields)} lack pair.idx or pair.png/pair.jpg"
    if not 0 <= partner_idx < count or partner_idx == sample.int_field("idx"):
        return NO_PARTNER, f"pair.idx {partner_idx} is not another sample of the {count}"
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
