"""A loopback S3 server for tests: moto's threaded server on 127.0.0.1 with one bucket ready.

Use it as a context manager; `stop()` and `start()` simulate an unavailable target (connections are
refused while stopped) and keep the bucket's contents, since moto's state lives in the process.
"""

from __future__ import annotations

import logging
import socket
from types import TracebackType
from typing import Any

import boto3
import s3fs
from moto.server import ThreadedMotoServer

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"


class S3Server:
    """moto S3 on 127.0.0.1 with `bucket` created; exposes the endpoint, env and storage_options."""

    def __init__(self, bucket: str = "avatarflow-test") -> None:
        self.bucket = bucket
        self.port = _free_port()  # fixed, so a restart comes back at the same endpoint
        self._server: ThreadedMotoServer | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for an s3fs/botocore client found purely from the environment."""
        # The region goes in AWS_DEFAULT_REGION, not client_kwargs: with region_name=us-east-1 s3fs
        # sends a LocationConstraint that S3 (and moto) reject when creating a bucket.
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    @property
    def storage_options(self) -> dict[str, Any]:
        """Explicit fsspec storage options for s3fs pointing at this server."""
        return {"endpoint_url": self.endpoint_url, "key": ACCESS_KEY, "secret": SECRET_KEY}

    @property
    def url(self) -> str:
        """The bucket as an fsspec URL."""
        return f"s3://{self.bucket}"

    def start(self) -> S3Server:
        """Start (or restart) the server on its port and make sure the bucket exists."""
        # s3fs caches filesystems by their options, not by the endpoint the environment names:
        # one made for an earlier server (another port) must not be reused for this one.
        s3fs.S3FileSystem.clear_instance_cache()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log per request
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if self.bucket not in existing:
            client.create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket, so new connections are refused."""
        if self._server is None:
            return
        self._server.stop()
        # ThreadedMotoServer.stop() leaves the socket listening (connections would hang, not fail).
        self._server._server.server_close()  # type: ignore[union-attr]
        self._server = None
        s3fs.S3FileSystem.clear_instance_cache()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _free_port() -> int:
    """Ask the OS for a free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
