"""The curated samples as a new shard set (same tar format and manifest as ``ray_ssl.data.shards``).

Chosen samples keep their key, image, class and other fields and get a new dense ``idx`` 0..M-1 in
source order. One Ray task writes each output shard (reading only the source shards that hold its
samples); every shard is written atomically and the manifest last, so the set is complete or absent.
A set already at the output (an earlier curation) is replaced as ``shards write --overwrite``
replaces one: the new generation's shards go beside the old ones under new names, the manifest is
swapped, then the old shards are deleted, so a reader never sees the two mixed.
"""

from __future__ import annotations

import logging

import numpy as np

from ray_ssl.config import StorageConfig
from ray_ssl.curation.errors import CurationError
from ray_ssl.data.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    existing_manifest,
    iter_shard,
    remove_shards,
    shard_name,
)
from ray_ssl.data.tario import TarSample, write_tar
from ray_ssl.storage import atomic_write, pin_endpoint, resolve, write_bytes_atomic

log = logging.getLogger(__name__)

CURATED_SOURCE = "curated"


def _write_shard(
    source_uri: str,
    sources: list[ShardInfo],
    wanted: np.ndarray,
    first_idx: int,
    out_uri: str,
    name: str,
    storage: StorageConfig,
) -> ShardInfo:
    """Copy the samples whose idx is in sorted ``wanted`` into shard ``name``, renumbered."""
    new_idx = {int(old): first_idx + i for i, old in enumerate(wanted)}
    source = resolve(source_uri, storage)
    samples = []
    for info in sources:
        for sample in iter_shard(source.join(info.name)):
            old = sample.int_field("idx")
            if old in new_idx:
                fields = dict(sample.fields, idx=str(new_idx[old]).encode())
                samples.append(TarSample(sample.key, fields))
    if len(samples) != len(wanted):
        raise CurationError(
            f"found {len(samples)} of the {len(wanted)} curated samples for {name} in "
            f"{source_uri}; the shard set changed since it was embedded - curate it again"
        )
    target = resolve(out_uri, storage).join(name)
    with atomic_write(target) as fh:
        write_tar(fh, samples)
    return ShardInfo(name, len(samples), int(target.fs.size(target.path)), first_idx)


def write_curated_shards(
    source_uri: str,
    manifest: Manifest,
    chosen_idx: np.ndarray,
    out_uri: str,
    storage: StorageConfig,
    samples_per_shard: int,
) -> dict:
    """Write the samples with source idx ``chosen_idx`` as a shard set at ``out_uri``."""
    import ray

    chosen = np.sort(np.asarray(chosen_idx, np.int64))
    firsts = np.array([s.first_idx for s in manifest.shards], np.int64)
    write = ray.remote(_write_shard)
    pinned = pin_endpoint(storage)
    loc = resolve(out_uri, storage)
    previous = existing_manifest(loc)
    generation = previous.generation + 1 if previous is not None else 0
    names = [shard_name(generation, n) for n in range(-(-len(chosen) // samples_per_shard))]
    pending = []
    for name, start in zip(names, range(0, len(chosen), samples_per_shard), strict=True):
        wanted = chosen[start : start + samples_per_shard]
        holders = np.unique(np.searchsorted(firsts, wanted, side="right") - 1)
        sources = [manifest.shards[i] for i in holders]
        pending.append(write.remote(source_uri, sources, wanted, start, out_uri, name, pinned))
    try:
        shards = ray.get(pending)
        curated = Manifest(
            count=len(chosen),
            classes=manifest.classes,
            shards=shards,
            source=f"{CURATED_SOURCE} from {manifest.source} at {source_uri}",
            requested_source=CURATED_SOURCE,
            split=manifest.split,
            image_format=manifest.image_format,
            channels=manifest.channels,
            generation=generation,
        )
        write_bytes_atomic(loc.join(MANIFEST_NAME), curated.to_json())  # the swap
    except BaseException:
        remove_shards(loc, names)
        raise
    if previous is not None:
        remove_shards(loc, sorted({s.name for s in previous.shards} - set(names)))
    log.info("wrote %d curated samples in %d shards to %s", len(chosen), len(shards), out_uri)
    return {"uri": out_uri, "count": len(chosen), "shards": len(shards)}
