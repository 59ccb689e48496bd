"""Semantic positive pairs for shard writing (Alkhalefi et al., arXiv 2510.08722).

A semantic pair is two different images of one class, in place of two augmentations of one image.
Every sample of a paired set names a partner; the partner's encoded image is written inside the
sample (``pair.<ext>``, with ``pair`` = the partner's key and ``pair.idx`` its idx), so streaming
stays shard-local. Partners come from the labels (``same_class_partners``: uniform over the other
members of the class, seeded) or from a CSV of ``key,partner_key`` rows (``read_pairs_file``; the
paper's pairs are curated by hand). ``PairedImages`` spools the source to a temporary file once,
so that any partner's bytes can be fetched with bounded memory.
"""

from __future__ import annotations

import csv
import hashlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ray_ssl.data.errors import ShardError

PAIRS_DIGEST_CHARS = 16  # hex digits of a pairs file's SHA-256 kept in the manifest


def same_class_partners(labels: np.ndarray, seed: int) -> np.ndarray:
    """For each sample, the index of a different sample of its class, uniform over the others.

    ShardError when a class has a single sample (it has no partner).
    """
    labels = np.asarray(labels)
    partners = np.empty(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            raise ShardError(
                f"class {label} has a single sample ({members[0]}), so it has no same-class "
                "partner; add images of that class or pair with --pairs-file"
            )
        # arXiv 2510.08722 (abstract): a semantic positive = a different same-class instance
        # Uniform over the m - 1 other members: skip over the sample's own position.
        draws = rng.integers(0, len(members) - 1, size=len(members))
        draws += draws >= np.arange(len(members))
        partners[members] = members[draws]
    return partners


def pairs_file_spec(path: str | Path) -> str:
    """How a manifest names the pairs of a CSV: its file name and a digest of its content (the
    same file reached by another path names the same pairs)."""
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:PAIRS_DIGEST_CHARS]
    except OSError as err:
        raise ShardError(
            f"cannot read pairs file {path} ({err.strerror or err}); pass a key,partner_key CSV"
        ) from err
    return f"file {Path(path).name} sha256={digest}"


def read_pairs_file(path: str | Path, keys: list[str]) -> np.ndarray:
    """Partner index of every sample from a CSV of ``key,partner_key`` rows (header optional).

    Every key must appear exactly once, name a sample of the set, and pair with another sample;
    anything else is a one-line ShardError naming the row.
    """
    index = {key: i for i, key in enumerate(keys)}
    partners = np.full(len(keys), -1, dtype=np.int64)
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ShardError(
            f"cannot read pairs file {path} ({err}); pass a key,partner_key CSV"
        ) from err
    for line, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells) or (line == 1 and cells[:2] == ["key", "partner_key"]):
            continue
        where = f"pairs file {path} line {line}"
        if len(cells) != 2:
            raise ShardError(f"{where} has {len(cells)} fields; each row is key,partner_key")
        key, partner = cells
        for name in (key, partner):
            if name not in index:
                raise ShardError(
                    f"{where}: unknown key '{name}'; keys are the set's sample keys "
                    f"({keys[0]} .. {keys[-1]})"
                )
        if key == partner:
            raise ShardError(f"{where} pairs '{key}' with itself; a partner is another sample")
        if partners[index[key]] >= 0:
            raise ShardError(f"{where}: key '{key}' already has a partner; give one per key")
        partners[index[key]] = index[partner]
    missing = np.flatnonzero(partners < 0)
    if len(missing):
        raise ShardError(
            f"pairs file {path} gives no partner for {len(missing)} of {len(keys)} samples "
            f"(first: {keys[missing[0]]}); every sample needs one"
        )
    return partners


@dataclass(frozen=True)
class PairedSample:
    """One sample to write with its partner."""

    image: bytes
    label: int
    partner: int  # index (= idx) of the partner sample
    partner_image: bytes


class ImageSpool:
    """Encoded images appended to an anonymous temporary file, then read back by index."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()
        self._offsets: list[int] = [0]

    def append(self, data: bytes) -> None:
        self._file.write(data)
        self._offsets.append(self._offsets[-1] + len(data))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        self._file.seek(self._offsets[i])
        return self._file.read(self._offsets[i + 1] - self._offsets[i])

    def close(self) -> None:
        self._file.close()


class PairedImages:
    """A source's images spooled to a temporary file, with every sample's partner.

    Built eagerly (the source is read and every partner fixed before anything is written);
    iterating yields the samples in order with their partners' bytes. Close it when done.
    """

    def __init__(
        self, samples: Iterator[tuple[bytes, int]], seed: int, partners: np.ndarray | None = None
    ):
        self._spool = ImageSpool()
        try:
            labels = []
            for image, label in samples:
                self._spool.append(image)
                labels.append(label)
            self.labels = np.asarray(labels, dtype=np.int64)
            if partners is not None and len(partners) != len(labels):
                raise ShardError(
                    f"the source yielded {len(labels)} images, not the {len(partners)} the "
                    "pairs were made for; rewrite the pairs file for this source"
                )
            self.partners = same_class_partners(self.labels, seed) if partners is None else partners
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[PairedSample]:
        for i, label in enumerate(self.labels.tolist()):
            partner = int(self.partners[i])
            yield PairedSample(self._spool[i], label, partner, self._spool[partner])

    def close(self) -> None:
        self._spool.close()
