"""Shared fixtures: one local Ray instance per test session; a real S3 endpoint (moto server)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

# Logical CPUs for the test cluster: more than the 2 physical cores so that Train workers and
# Ray Data tasks can be scheduled side by side (they are mostly idle, waiting on each other).
TEST_CLUSTER_CPUS = 6

_MOTO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray instance shared by the whole test session."""
    import ray

    ray.init(
        num_cpus=TEST_CLUSTER_CPUS,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        # Dummy S3 credentials for the moto server: Ray workers start before any test sets the
        # driver's AWS variables, and botocore refuses to sign requests without credentials.
        runtime_env={
            "env_vars": {"DS_ACCELERATOR": "cpu", "RAY_TRAIN_V2_ENABLED": "1", **_MOTO_CREDENTIALS}
        },
    )
    yield
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with dummy credentials in the standard AWS variables."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_VARS}
    os.environ.update(**_MOTO_CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, uniquely named bucket on the moto server; returns ``s3://<bucket>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"
