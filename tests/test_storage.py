"""Storage against a real S3 protocol server (moto, unique bucket per test) and the local disk."""

from __future__ import annotations

import os

import pytest

from ray_ssl.config import ShardsConfig, StorageConfig
from ray_ssl.data.shards import inspect_shard_set, read_manifest, write_shard_set
from ray_ssl.storage import (
    StorageError,
    atomic_write,
    check_reachable,
    pin_endpoint,
    read_bytes,
    resolve,
    write_bytes_atomic,
)

STORAGE = StorageConfig()


def test_s3_round_trip(s3_bucket):
    loc = resolve(f"{s3_bucket}/some/prefix/blob.bin", STORAGE)
    check_reachable(loc, STORAGE)
    payload = os.urandom(3 << 20)
    write_bytes_atomic(loc, payload)
    assert read_bytes(resolve(f"{s3_bucket}/some/prefix/blob.bin", STORAGE)) == payload
    assert loc.fs.ls(f"{s3_bucket[5:]}/some/prefix", detail=False) == [loc.path]


def test_s3_failed_write_leaves_nothing(s3_bucket):
    loc = resolve(f"{s3_bucket}/half.bin", STORAGE)
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_write(loc) as fh:
            fh.write(os.urandom(6 << 20))  # more than one multipart chunk
            raise RuntimeError("writer died")
    assert not resolve(f"{s3_bucket}/half.bin", STORAGE).exists()


def test_local_failed_write_leaves_nothing(tmp_path):
    loc = resolve(str(tmp_path / "file.bin"))
    with pytest.raises(RuntimeError):
        with atomic_write(loc) as fh:
            fh.write(b"partial")
            raise RuntimeError("writer died")
    assert os.listdir(tmp_path) == []
    write_bytes_atomic(loc, b"whole")
    assert read_bytes(resolve(f"file://{tmp_path}/file.bin")) == b"whole"


def test_shard_set_on_s3(s3_bucket):
    uri = f"{s3_bucket}/digits/test"
    cfg = ShardsConfig(source="digits", split="test", samples_per_shard=150)
    manifest = write_shard_set(cfg, uri, STORAGE)
    assert read_manifest(uri, STORAGE) == manifest
    assert inspect_shard_set(uri, STORAGE).ok


def test_missing_bucket_and_bad_uris(s3_endpoint):
    with pytest.raises(StorageError, match="does not exist"):
        check_reachable(resolve("s3://no-such-bucket-here/x", STORAGE), STORAGE)
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        resolve("gs://bucket/x")
    with pytest.raises(StorageError, match="names no bucket"):
        resolve("s3://")
    with pytest.raises(StorageError, match="empty storage URI"):
        resolve("")


def test_pin_endpoint_captures_the_environment(s3_endpoint):
    pinned = pin_endpoint(StorageConfig())
    assert pinned.endpoint_url == s3_endpoint and pinned.region == "us-east-1"
    assert pin_endpoint(StorageConfig(endpoint_url="http://x:1")).endpoint_url == "http://x:1"
