"""Write, read and verify WebDataset shard sets.

A shard set is a directory (local or ``s3://``) of ``shard-NNNNNN.tar`` files plus
``manifest.json``. Every shard and the manifest are written atomically (temporary name, then
rename; on S3 an upload is visible only once complete), and the manifest is written last, so a
reader that trusts the manifest never sees a half-written set.

Replacing a set (``overwrite``) writes the new generation's shards beside the old ones under new
names (``gNNN-shard-NNNNNN.tar``), swaps the manifest in one atomic write, and only then deletes
the old shards: until the swap the old set stays whole and valid, whatever interrupts the write.

A set written with semantic pairs (``shards.pairs`` / ``shards.pairs_file``, see
``ray_ssl.data.pairs``) carries every sample's partner inside the sample (``pair``, ``pair.idx``,
``pair.<ext>``) and records in its manifest how the partners were chosen.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from ray_ssl.config import ShardsConfig, StorageConfig
from ray_ssl.data.checks import (
    BAD_LABEL,
    MISSING,
    UNDECODABLE,
    UNDECODABLE_PARTNER,
    describe,
    label_problem,
    partner_fields,
    partner_problem,
    sample_problem,
)
from ray_ssl.data.errors import ShardError
from ray_ssl.data.pairs import PairedImages, PairedSample, pairs_file_spec, read_pairs_file
from ray_ssl.data.sources import open_source
from ray_ssl.data.tario import TarSample, TruncatedShardError, iter_tar, write_tar
from ray_ssl.data.views import CorruptImageError, decode_image
from ray_ssl.storage import (
    Location,
    StorageError,
    atomic_write,
    check_reachable,
    read_bytes,
    resolve,
    write_bytes_atomic,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SHARD_PATTERN = "shard-{:06d}.tar"  # generation 0; later ones carry a gNNN- prefix
SET_FORMAT = "webdataset"
READ_BLOCK_BYTES = 8 << 20  # buffered reads of shards (S3 range requests of this size)
INSPECT_EXAMPLES = 5  # bad samples that `shards inspect` names


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    bytes: int
    first_idx: int  # idx of the shard's first sample; samples are dense and in order


@dataclass(frozen=True)
class Manifest:
    """What a shard set holds; written beside the shards as ``manifest.json``."""

    count: int
    classes: list[str]
    shards: list[ShardInfo]
    source: str  # what was read, e.g. "fashion-mnist" or "digits (fallback: ...)"
    requested_source: str  # shards.source as configured
    split: str
    image_format: str
    channels: int
    format: str = SET_FORMAT
    version: int = MANIFEST_VERSION
    generation: int = 0  # how many times the set at this URI has been replaced
    pairs: str | None = None  # how semantic partners were chosen; None: the set has no pairs

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        try:
            data = json.loads(raw)
            shards = [ShardInfo(**s) for s in data.pop("shards")]
            manifest = cls(shards=shards, **data)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ShardError(
                f"manifest {where} is not a valid ray-ssl manifest ({err}); rewrite the set with "
                "`ray-ssl shards write`"
            ) from err
        if manifest.count != sum(s.count for s in manifest.shards):
            raise ShardError(
                f"manifest {where} says {manifest.count} samples but its shards sum to "
                f"{sum(s.count for s in manifest.shards)}; rewrite the set"
            )
        return manifest


Sample = tuple[bytes, int] | PairedSample  # (image, label), or with a semantic partner


def sample_key(split: str, idx: int) -> str:
    """The ``__key__`` of sample ``idx`` in a set written from ``split``."""
    return f"{split}-{idx:08d}"


def _chunks(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    while chunk := list(itertools.islice(samples, size)):
        yield chunk


def _tar_samples(chunk: list[Sample], first_idx: int, split: str, ext: str):
    for offset, sample in enumerate(chunk):
        idx = first_idx + offset
        paired = isinstance(sample, PairedSample)
        image, label = (sample.image, sample.label) if paired else sample
        fields = {ext: image, "cls": str(label).encode(), "idx": str(idx).encode()}
        if paired:  # the partner travels inside the sample: streaming stays shard-local
            fields["pair"] = sample_key(split, sample.partner).encode()
            fields["pair.idx"] = str(sample.partner).encode()
            fields[f"pair.{ext}"] = sample.partner_image
        yield TarSample(sample_key(split, idx), fields)


def pairs_spec(cfg: ShardsConfig) -> str | None:
    """What the manifest records about the pairs ``cfg`` asks for (None: no pairs)."""
    if cfg.pairs_file is not None:
        return pairs_file_spec(cfg.pairs_file)
    return f"same-class seed={cfg.seed}" if cfg.pairs == "same-class" else None


def _paired(cfg: ShardsConfig, samples: Iterator[tuple[bytes, int]], count: int):
    """The samples with their partners (read and checked in full now), or None without pairs."""
    if cfg.pairs_file is not None:
        keys = [sample_key(cfg.split, i) for i in range(count)]
        return PairedImages(samples, cfg.seed, read_pairs_file(cfg.pairs_file, keys))
    return PairedImages(samples, cfg.seed) if cfg.pairs == "same-class" else None


def shard_name(generation: int, number: int) -> str:
    """File name of shard ``number`` of a set's ``generation``: never one of an older one."""
    name = SHARD_PATTERN.format(number)
    return f"g{generation:03d}-{name}" if generation else name


def remove_shards(loc: Location, names: list[str]) -> None:
    """Delete the named files under ``loc``, best effort (a leftover complete shard is harmless)."""
    for name in names:
        target = loc.join(name)
        try:
            if target.exists():
                target.fs.rm(target.path)
        except OSError as err:  # best effort: a leftover complete shard is harmless
            log.warning("could not remove %s: %s", target.uri, err)


def existing_manifest(loc: Location) -> Manifest | None:
    """The valid manifest at ``loc``, or None when there is none (or it does not parse)."""
    try:
        return Manifest.from_json(read_bytes(loc.join(MANIFEST_NAME)), loc.uri)
    except (FileNotFoundError, ShardError):
        return None


def write_shard_set(
    cfg: ShardsConfig, out_uri: str, storage: StorageConfig, overwrite: bool = False
) -> Manifest:
    """Write the source named by ``cfg`` as shards plus a manifest under ``out_uri``.

    A valid set already there is replaced only with ``overwrite`` (ShardError otherwise): the new
    shards go beside the old under new names, the manifest is swapped last, then the old shards
    are deleted.
    """
    if cfg.samples_per_shard < 1:
        raise ShardError(f"shards.samples_per_shard={cfg.samples_per_shard} must be >= 1")
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise ShardError(f"shards.max_samples={cfg.max_samples} must be >= 1 (or null for all)")
    loc = resolve(out_uri, storage)
    check_reachable(loc, storage)
    previous = existing_manifest(loc)
    if previous is not None and not overwrite:
        raise ShardError(
            f"{out_uri} already holds a shard set ({previous.count} samples of "
            f"'{previous.requested_source}' ({previous.split})); pass --overwrite to replace it "
            "or choose another --out"
        )
    source = open_source(cfg)  # validates the source before anything is written
    count = source.count if cfg.max_samples is None else min(source.count, cfg.max_samples)
    subset = itertools.islice(source.samples, count)
    pairs = pairs_spec(cfg)
    paired = _paired(cfg, subset, count)  # and the pairs, read in full
    samples = iter(paired) if paired is not None else subset
    generation = previous.generation + 1 if previous is not None else 0
    written: list[ShardInfo] = []
    try:
        progress = tqdm(total=count, desc=f"shards {out_uri}", unit="img", disable=None)
        for number, chunk in enumerate(_chunks(samples, cfg.samples_per_shard)):
            name = shard_name(generation, number)
            first_idx = sum(s.count for s in written)
            with atomic_write(loc.join(name)) as fh:
                write_tar(fh, _tar_samples(chunk, first_idx, cfg.split, cfg.image_format))
            size = int(loc.fs.size(loc.join(name).path))
            written.append(ShardInfo(name, len(chunk), size, first_idx))
            progress.update(len(chunk))
        progress.close()
        if not written:
            raise ShardError(f"source '{cfg.source}' ({cfg.split}) yielded no images")
        manifest = Manifest(
            count=sum(s.count for s in written),
            classes=source.classes,
            shards=written,
            source=source.name,
            requested_source=cfg.source,
            split=cfg.split,
            image_format=cfg.image_format,
            channels=source.channels,
            generation=generation,
            pairs=pairs,
        )
        write_bytes_atomic(loc.join(MANIFEST_NAME), manifest.to_json())  # the swap
    except BaseException:
        remove_shards(loc, [s.name for s in written])
        raise
    finally:
        if paired is not None:
            paired.close()
    if previous is not None:
        remove_shards(loc, sorted({s.name for s in previous.shards} - {s.name for s in written}))
    if manifest.source != cfg.source:
        log.warning("shard set %s holds '%s', not '%s'", out_uri, manifest.source, cfg.source)
    log.info("wrote %d samples in %d shards to %s", manifest.count, len(written), out_uri)
    return manifest


def read_manifest(uri: str, storage: StorageConfig) -> Manifest:
    """The manifest of the shard set at ``uri``; ShardError when there is none or it is bad."""
    loc = resolve(uri, storage)
    check_reachable(loc, storage)
    try:
        raw = read_bytes(loc.join(MANIFEST_NAME))
    except FileNotFoundError:
        tars = _list_tars(loc)
        hint = f" ({len(tars)} .tar files but no manifest)" if tars else ""
        raise ShardError(
            f"no shard set at {uri}{hint}; write one with `ray-ssl shards write --source ... "
            f"--out {uri}`"
        ) from None
    return Manifest.from_json(raw, f"{uri}/{MANIFEST_NAME}")


def check_pairs(manifest: Manifest, positives: str, uri: str) -> None:
    """Semantic or mixed positives need a set written with pairs; a one-line ShardError if not."""
    if positives != "augment" and manifest.pairs is None:
        raise ShardError(
            f"views.positives={positives} needs semantic pairs but the shard set {uri} has none; "
            "rewrite it with `ray-ssl shards write ... --pairs same-class` (or --pairs-file CSV) "
            "or set views.positives=augment"
        )


def _list_tars(loc: Location) -> list[str]:
    try:
        entries = loc.fs.ls(loc.path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e.rsplit("/", 1)[-1] for e in entries if str(e).endswith(".tar"))


def iter_shard(loc: Location) -> Iterator[TarSample]:
    """Samples of one shard file; raises TruncatedShardError where the tar breaks."""
    with loc.fs.open(loc.path, "rb", block_size=READ_BLOCK_BYTES) as fh:
        yield from iter_tar(fh)


@dataclass
class ShardCheck:
    name: str
    expected: int
    found: int = 0
    error: str | None = None


@dataclass
class InspectReport:
    """Result of :func:`inspect_shard_set`: per-shard counts, bad samples by kind (see
    ``ray_ssl.data.checks``) with the first few named, and every shard-level problem."""

    uri: str
    manifest: Manifest
    checks: list[ShardCheck]
    decoded: bool = True  # False: images were not decoded (``--fast``)
    unlisted: list[str] = field(default_factory=list)  # .tar files the manifest does not name
    problems: list[str] = field(default_factory=list)  # shard-level: missing, truncated, count
    bad_counts: dict[str, int] = field(default_factory=dict)
    bad_examples: list[str] = field(default_factory=list)  # shard:key (kind: detail)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.bad_counts

    def add_bad(self, shard: str, key: str, kind: str, detail: str) -> None:
        self.bad_counts[kind] = self.bad_counts.get(kind, 0) + 1
        if len(self.bad_examples) < INSPECT_EXAMPLES:
            self.bad_examples.append(describe(shard, key, kind, detail))

    def summary(self) -> str:
        m = self.manifest
        lines = [
            f"shard set {self.uri}: {m.count} samples in {len(m.shards)} shards, "
            f"source {m.source}, split {m.split}, {m.image_format}, {m.channels} channel(s)",
            f"classes ({len(m.classes)}): {', '.join(m.classes)}",
        ]
        if m.pairs is not None:
            lines.append(f"semantic pairs: {m.pairs} (partners checked with every sample)")
        for check in self.checks:
            status = "ok" if check.error is None and check.found == check.expected else "BAD"
            detail = f" ({check.error})" if check.error else ""
            lines.append(f"  {check.name}: {check.found}/{check.expected} {status}{detail}")
        lines += [f"  unlisted file (ignored): {name}" for name in self.unlisted]
        decoding = "images decoded" if self.decoded else "images not decoded (--fast)"
        bad = sum(self.bad_counts.values())
        lines.append(f"bad samples: {bad} ({decoding})")
        lines += [f"  {kind}: {n}" for kind, n in self.bad_counts.items()]
        lines += [f"  first: {example}" for example in self.bad_examples]
        lines.append("verified: all shards readable, counts, idx and labels agree" if self.ok
                     else f"PROBLEMS: {self.one_line()}")  # fmt: skip
        return "\n".join(lines)

    def one_line(self) -> str:
        """What is wrong, on one line: shard problems, bad-sample counts, the first bad key."""
        parts = list(self.problems[:2])
        if len(self.problems) > 2:
            parts.append(f"{len(self.problems) - 2} more shard problems")
        if self.bad_counts:
            counts = ", ".join(f"{n} {kind}" for kind, n in self.bad_counts.items())
            parts.append(f"bad samples: {counts} (first: {self.bad_examples[0]})")
        return "; ".join(parts)


def _sample_problem(
    sample: TarSample, info: ShardInfo, position: int, report: InspectReport
) -> tuple[str, str] | None:
    """Why a sample cannot train (``ray_ssl.data.checks``), its partner's fields and image
    included in a paired set; images are decoded when ``report.decoded``."""
    m = report.manifest
    problem = sample_problem(sample, info, position)
    if problem is None and m.pairs is not None:
        problem = partner_problem(sample, m.count)
    if problem is None and report.decoded:
        try:
            decode_image(sample.image, m.channels)
        except CorruptImageError as err:
            problem = UNDECODABLE, str(err)
    if problem is None and report.decoded and m.pairs is not None:
        try:
            decode_image(partner_fields(sample)[1], m.channels)
        except CorruptImageError as err:
            problem = UNDECODABLE_PARTNER, str(err)
    return problem


def _check_shard(loc: Location, info: ShardInfo, report: InspectReport) -> ShardCheck:
    """Read one shard: count its samples, check each one's fields, idx, label and (in a paired
    set) partner, and decode its images when ``report.decoded``."""
    check = ShardCheck(info.name, info.count)
    num_classes = len(report.manifest.classes)
    try:
        for sample in iter_shard(loc.join(info.name)):
            problem = _sample_problem(sample, info, check.found, report)
            check.found += 1
            if problem is not None:
                report.add_bad(info.name, sample.key, *problem)
            elif (label := label_problem(sample, num_classes)) is not None:
                report.add_bad(info.name, sample.key, BAD_LABEL, label)
    except FileNotFoundError:
        check.error = "missing"
    except TruncatedShardError as err:
        check.error = f"truncated: {err}"
    for position in range(check.found, info.count):
        report.add_bad(info.name, f"#{position}", MISSING, check.error or "shard ended early")
    if check.error:
        report.problems.append(f"{info.name} is {check.error}")
    elif check.found != check.expected:
        report.problems.append(
            f"{info.name} has {check.found} samples, manifest says {check.expected}"
        )
    return check


def inspect_shard_set(
    uri: str, storage: StorageConfig, strict: bool = True, decode: bool = True
) -> InspectReport:
    """Read every shard: count its samples against the manifest, check every sample's fields,
    idx range, label and (in a paired set) partner, and (with ``decode``) decode its images.

    With ``strict`` anything bad raises a one-line ShardError; otherwise it is in the report.
    """
    manifest = read_manifest(uri, storage)
    loc = resolve(uri, storage)
    report = InspectReport(uri, manifest, [], decoded=decode)
    for info in tqdm(manifest.shards, desc=f"inspect {uri}", unit="shard", disable=None):
        report.checks.append(_check_shard(loc, info, report))
    listed = {s.name for s in manifest.shards}
    report.unlisted = [name for name in _list_tars(loc) if name not in listed]
    if strict and not report.ok:
        raise ShardError(
            f"shard set {uri} is damaged: {report.one_line()}; rewrite it with "
            "`ray-ssl shards write --overwrite`"
        )
    return report


def _shards_present(loc: Location, manifest: Manifest) -> list[str]:
    """Names of listed shards that are missing or have another size than the manifest says."""
    bad = []
    for info in manifest.shards:
        try:
            if int(loc.fs.size(loc.join(info.name).path)) != info.bytes:
                bad.append(info.name)
        except FileNotFoundError:
            bad.append(info.name)
    return bad


def ensure_shard_set(cfg: ShardsConfig, out_uri: str, storage: StorageConfig) -> Manifest:
    """Reuse a valid shard set at ``out_uri`` written from the same source, split and pairs;
    else write one.

    A set written from another source, split or pairs is never overwritten (ShardError instead).
    """
    loc = resolve(out_uri, storage)
    try:
        manifest = read_manifest(out_uri, storage)
    except (ShardError, StorageError) as err:
        if isinstance(err, StorageError):
            raise
        log.info("no valid shard set at %s (%s); writing it", out_uri, err)
        return write_shard_set(cfg, out_uri, storage)
    if (manifest.requested_source, manifest.split) != (cfg.source, cfg.split):
        raise ShardError(
            f"{out_uri} holds shards of '{manifest.requested_source}' ({manifest.split}), not "
            f"'{cfg.source}' ({cfg.split}); choose another output URI or delete that one"
        )
    if manifest.pairs != pairs_spec(cfg):
        raise ShardError(
            f"{out_uri} holds shards with semantic pairs {manifest.pairs}, not {pairs_spec(cfg)}; "
            "choose another output URI or delete that one"
        )
    if cfg.max_samples is not None:
        wanted = min(open_source(cfg).count, cfg.max_samples)
        if manifest.count != wanted:
            raise ShardError(
                f"{out_uri} holds {manifest.count} samples, not the {wanted} that "
                f"shards.max_samples={cfg.max_samples} asks for; choose another output URI or "
                "delete that one"
            )
    bad = _shards_present(loc, manifest)
    if bad:
        log.warning("shard set %s is incomplete (%s); rewriting it", out_uri, ", ".join(bad[:3]))
        return write_shard_set(cfg, out_uri, storage, overwrite=True)
    if manifest.source != cfg.source:
        log.warning("using shard set %s, which holds '%s'", out_uri, manifest.source)
    return manifest
