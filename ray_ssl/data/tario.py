"""WebDataset tar encoding and decoding: one sample = consecutive members sharing a key.

A member ``<key>.<ext>`` holds field ``ext`` of sample ``key`` (WebDataset convention: the key is
the member path up to the first dot of its base name). We write ``png`` or ``jpg`` image bytes and
ASCII integers for ``cls`` and ``idx``.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

TAR_MTIME = 0  # fixed member mtime: identical inputs give byte-identical shards
IMAGE_FIELDS = ("png", "jpg", "jpeg")


@dataclass
class TarSample:
    """One WebDataset sample: its key and raw field bytes keyed by extension."""

    key: str
    fields: dict[str, bytes] = field(default_factory=dict)

    @property
    def image(self) -> bytes | None:
        for name in IMAGE_FIELDS:
            if name in self.fields:
                return self.fields[name]
        return None

    def int_field(self, name: str) -> int | None:
        """An ASCII integer field, or None when absent or not an integer."""
        raw = self.fields.get(name)
        if raw is None:
            return None
        try:
            return int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return None


class TruncatedShardError(IOError):
    """A tar stream that ends in the middle of a member or header."""


def write_tar(fh: IO[bytes], samples: Iterable[TarSample]) -> int:
    """Stream ``samples`` as an uncompressed tar to ``fh``; returns the number written."""
    count = 0
    with tarfile.open(fileobj=fh, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.fields.items():
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size = len(data)
                info.mtime = TAR_MTIME
                info.mode = 0o444
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


def _split_name(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext if dot else ""


def iter_tar(fh: IO[bytes]) -> Iterator[TarSample]:
    """Samples of a tar stream in order; raises TruncatedShardError where the stream breaks.

    A sample is yielded as soon as a member of the next sample begins, before that member is
    read, so a break inside the next sample (or in a header) still delivers it; only the sample
    whose own member is cut is dropped. A sample the break cut short of a later field is
    delivered without that field (readers check the fields they need).
    """
    current: TarSample | None = None
    try:
        with tarfile.open(fileobj=fh, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if current is not None and current.key != key:
                    yield current
                    current = None
                # Not deliverable while one of its own members is being read.
                reading, current = current or TarSample(key), None
                extracted = tar.extractfile(member)
                data = extracted.read() if extracted is not None else b""
                if len(data) != member.size:
                    raise TruncatedShardError(f"member {member.name} is cut short")
                reading.fields[ext] = data
                current = reading
    except (tarfile.TarError, EOFError, OSError) as err:
        if current is not None:
            yield current
        raise TruncatedShardError(str(err) or type(err).__name__) from err
    if current is not None:
        yield current
