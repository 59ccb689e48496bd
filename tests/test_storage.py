"""Storage against a real S3 protocol server (moto, unique bucket per test), the local disk, and
an endpoint that accepts connections and never answers (every call ends by the deadline)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest

from ray_ssl.cli import EXIT_BAD_INPUT, main
from ray_ssl.config import ShardsConfig, StorageConfig
from ray_ssl.data.shards import inspect_shard_set, iter_shard, read_manifest, write_shard_set
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


@pytest.fixture
def silent_endpoint(monkeypatch) -> Iterator[str]:
    """An endpoint on 127.0.0.1 that accepts TCP connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}.items():
        monkeypatch.setenv(key, value)  # botocore signs before it connects
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_silent_endpoint_fails_every_call_by_the_deadline(silent_endpoint, tmp_path):
    storage = StorageConfig(
        endpoint_url=silent_endpoint, connect_timeout_s=1, connect_retries=1, request_deadline_s=1
    )
    calls = {
        "reachability": lambda: check_reachable(resolve("s3://b/x", storage), storage),
        "read": lambda: read_bytes(resolve("s3://b/x/manifest.json", storage)),
        "write": lambda: write_bytes_atomic(resolve("s3://b/x/blob", storage), b"data"),
        "stream": lambda: list(iter_shard(resolve("s3://b/x/shard-000000.tar", storage))),
        "manifest": lambda: read_manifest("s3://b/x", storage),
    }
    for name, call in calls.items():
        with pytest.raises(StorageError, match="request_deadline_s=1") as err:
            call()
        assert "\n" not in str(err.value) and silent_endpoint in str(err.value), name


def test_silent_endpoint_cli_is_one_line(silent_endpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "inspect", "s3://b/x", f"storage.endpoint_url={silent_endpoint}",
              "storage.request_deadline_s=1", "storage.connect_retries=1"])  # fmt: skip
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "got no answer" in err[0]
