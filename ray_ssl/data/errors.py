"""Input errors of the data plane; each message is one line saying what is wrong and what to do."""

from __future__ import annotations

from ray_ssl.errors import UserError


class ShardError(UserError, ValueError):
    """A shard set that cannot be written or read: bad source, missing or inconsistent shards."""


class CorruptDataError(UserError, RuntimeError):
    """More corrupt samples than ``data.max_corrupt_fraction`` allows."""
