"""Storage URIs -> (pyarrow/fsspec filesystem, path).

Local paths, ``file://`` and ``s3://bucket/prefix``. For S3 the endpoint and region come from
the config, else from the standard AWS environment variables; credentials come only from the
standard AWS chain (environment, shared files, instance role) and are never logged or saved.

Every S3 request ends by ``storage.request_deadline_s``: botocore makes up to
``storage.connect_retries`` attempts inside that wall-clock limit (s3fs adds no retries of its
own, so the two do not stack), and an endpoint that accepts connections but never answers is a
one-line :class:`StorageError` at the deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec

from ray_ssl.config import StorageConfig
from ray_ssl.errors import UserError

log = logging.getLogger(__name__)


class StorageError(UserError, RuntimeError):
    """A storage location that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Location:
    """A resolved URI: a filesystem plus the path inside it."""

    fs: fsspec.AbstractFileSystem
    path: str  # no scheme; for S3 "bucket/prefix"
    scheme: str  # "file" or "s3"

    def join(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts]])
        return Location(self.fs, path, self.scheme)

    @property
    def uri(self) -> str:
        return f"s3://{self.path}" if self.scheme == "s3" else self.path

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))


def _endpoint(storage: StorageConfig) -> str | None:
    return (
        storage.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )


def _region(storage: StorageConfig) -> str | None:
    return storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def pin_endpoint(storage: StorageConfig) -> StorageConfig:
    """A copy with the endpoint and region taken from the environment now.

    Ray workers inherit the environment of the node they were started on, which may lack the
    driver's AWS_ENDPOINT_URL; tasks that resolve URIs remotely carry the pinned copy instead.
    """
    return dataclasses.replace(storage, endpoint_url=_endpoint(storage), region=_region(storage))


def s3_options(storage: StorageConfig) -> dict:
    """Keyword arguments for :class:`DeadlineS3FileSystem`; holds no credentials."""
    client_kwargs: dict[str, str] = {}
    endpoint, region = _endpoint(storage), _region(storage)
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if region:
        client_kwargs["region_name"] = region
    return {
        "client_kwargs": client_kwargs,
        "config_kwargs": {
            "connect_timeout": storage.connect_timeout_s,
            "read_timeout": storage.request_deadline_s,  # one stalled read ends by the deadline
            "retries": {"total_max_attempts": storage.connect_retries, "mode": "standard"},
        },
        "request_deadline_s": storage.request_deadline_s,
        "endpoint_label": endpoint or "AWS",
        "skip_instance_cache": True,
    }


@functools.cache
def _deadline_s3_class() -> type:
    """s3fs's filesystem with a wall-clock deadline on every request (s3fs imports lazily)."""
    import s3fs
    from fsspec.asyn import sync_wrapper

    class DeadlineS3FileSystem(s3fs.S3FileSystem):
        """Every S3 call (``_call_s3``) and listing (``_lsdir``) ends by the deadline."""

        retries = 1  # botocore retries (storage.connect_retries); s3fs's own would multiply them

        def __init__(self, *args, request_deadline_s: float, endpoint_label: str, **kwargs):
            super().__init__(*args, **kwargs)
            self.request_deadline_s, self.endpoint_label = request_deadline_s, endpoint_label

        async def _by_deadline(self, what: str, call):
            try:
                return await asyncio.wait_for(call, self.request_deadline_s)
            except TimeoutError:
                raise StorageError(
                    f"S3 request {what} to {self.endpoint_label} got no answer within "
                    f"storage.request_deadline_s={self.request_deadline_s}; check that "
                    "storage.endpoint_url (or AWS_ENDPOINT_URL) is a reachable S3 server, or "
                    "raise the deadline"
                ) from None

        async def _call_s3(self, method, *akwarglist, **kwargs):
            call = super()._call_s3(method, *akwarglist, **kwargs)
            return await self._by_deadline(str(method), call)

        call_s3 = sync_wrapper(_call_s3)  # s3fs's binds the base method; files write through it

        async def _lsdir(self, path, *args, **kwargs):
            return await self._by_deadline(f"list {path}", super()._lsdir(path, *args, **kwargs))

    DeadlineS3FileSystem.__module__ = __name__  # pickled by name: see __getattr__
    DeadlineS3FileSystem.__qualname__ = "DeadlineS3FileSystem"
    return DeadlineS3FileSystem


def __getattr__(name: str) -> type:
    """``DeadlineS3FileSystem`` on first use, so that unpickling it (Ray tasks) finds it."""
    if name == "DeadlineS3FileSystem":
        return _deadline_s3_class()
    raise AttributeError(f"module {__name__} has no attribute {name}")


def resolve(uri: str, storage: StorageConfig | None = None) -> Location:
    """Resolve ``uri`` (local path, ``file://`` or ``s3://``) to a :class:`Location`."""
    storage = storage or StorageConfig()
    if not uri:
        raise StorageError(
            "empty storage URI; pass a local path, file:///path or s3://bucket/prefix"
        )
    if uri.startswith("s3://"):
        path = uri[len("s3://") :].rstrip("/")
        if not path:
            raise StorageError(f"'{uri}' names no bucket; use s3://bucket/prefix")
        return Location(_deadline_s3_class()(**s3_options(storage)), path, "s3")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"unsupported URI scheme '{scheme}://' in '{uri}'; use a path or s3://")
    return Location(fsspec.filesystem("file"), str(Path(uri).expanduser().absolute()), "file")


def check_reachable(loc: Location, storage: StorageConfig | None = None) -> None:
    """Fail fast when an S3 endpoint cannot be reached: one listing of the bucket, which
    botocore tries ``storage.connect_retries`` times within ``storage.request_deadline_s``."""
    if loc.scheme != "s3":
        return
    storage = storage or StorageConfig()
    bucket = loc.path.split("/", 1)[0]
    try:
        loc.fs.ls(bucket, refresh=True)
    except FileNotFoundError as err:
        raise StorageError(
            f"S3 bucket '{bucket}' does not exist at {_endpoint(storage) or 'AWS'}; "
            "create it or fix the URI"
        ) from err
    except PermissionError as err:
        raise StorageError(
            f"access to S3 bucket '{bucket}' denied; check the AWS credentials in the "
            "environment or ~/.aws"
        ) from err
    except StorageError:
        raise
    except Exception as err:  # network errors come in many botocore types
        raise StorageError(
            f"S3 endpoint {_endpoint(storage) or 'AWS default'} unreachable after "
            f"{storage.connect_retries} tries ({type(err).__name__}); check "
            "storage.endpoint_url or AWS_ENDPOINT_URL and the network"
        ) from err


@contextmanager
def atomic_write(loc: Location) -> Iterator[IO[bytes]]:
    """Open ``loc`` for binary writing so that readers see the whole file or nothing.

    Locally the bytes go to a hidden temporary name in the same directory and are renamed into
    place. On S3 an object becomes visible only when its upload completes, so a failed write
    leaves nothing; we still abort explicitly on error.
    """
    if loc.scheme == "file":
        parent = os.path.dirname(loc.path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(loc.path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, loc.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fh = loc.fs.open(loc.path, "wb")
    try:
        yield fh
    except BaseException:
        fh.discard()  # drop the pending upload instead of completing it
        fh.closed = True  # else the file's __del__ would try to flush the discarded buffer
        raise
    fh.close()


def write_bytes_atomic(loc: Location, data: bytes) -> None:
    with atomic_write(loc) as fh:
        fh.write(data)


def read_bytes(loc: Location) -> bytes:
    with loc.fs.open(loc.path, "rb") as fh:
        return fh.read()


def absolute_uri(uri: str | None) -> str | None:
    """A local path or ``file://`` URI as an absolute path; ``s3://`` URIs and None unchanged
    (Ray workers do not share the driver's working directory)."""
    if uri is None or uri.startswith("s3://"):
        return uri
    return resolve(uri).path
