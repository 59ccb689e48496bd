"""Input errors of the data plane; each message is one line saying what is wrong and what to do."""

from __future__ import annotations


class ShardError(ValueError):
    """A shard set that cannot be written or read: bad source, missing or inconsistent shards."""


class CorruptDataError(RuntimeError):
    """More corrupt samples than ``data.max_corrupt_fraction`` allows."""
