"""A local S3 (moto's threaded server) for tests, started once per test process.

Use the fixtures by importing them into a test module (or conftest.py)::

    from s3server import s3_bucket, s3_endpoint  # noqa: F401

``s3_bucket`` gives each test its own empty bucket, so tests cannot see each other's
objects. Its storage options set ``skip_instance_cache`` so no test reuses an s3fs instance
(and its listing cache) from another.
"""

from __future__ import annotations

import atexit
import functools
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


@functools.cache
def moto_endpoint() -> str:
    """Start the server on a free port on first use; stopped when the process exits.

    Cached per process rather than a session fixture's own state, so importing the
    fixture into several modules still starts one server."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    atexit.register(server.stop)
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}"


def storage_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": CREDENTIALS["aws_access_key_id"],
        "secret": CREDENTIALS["aws_secret_access_key"],
        "client_kwargs": {"endpoint_url": endpoint, "region_name": CREDENTIALS["region_name"]},
        "skip_instance_cache": True,
    }


@dataclass(frozen=True)
class S3Bucket:
    name: str
    url: str  # s3://name
    storage_options: dict[str, Any]
    client: Any  # a boto3 S3 client on the same server, for checks behind s3fs's back


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    return moto_endpoint()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[S3Bucket]:
    client = boto3.client("s3", endpoint_url=s3_endpoint, **CREDENTIALS)
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield S3Bucket(name, f"s3://{name}", storage_options(s3_endpoint), client)
