"""Shared fixtures: the real services tests talk to (an S3 endpoint over HTTP, ...)."""
from __future__ import annotations

import dataclasses
import socket
import uuid

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class S3Server:
    """A moto S3 server on 127.0.0.1; `endpoint_url` is what boto3/pyarrow clients connect to."""

    endpoint_url: str
    port: int

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def make_bucket(self, prefix: str = "bkt") -> str:
        """Create a fresh bucket and return its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's ThreadedMotoServer) over HTTP with fake credentials in the env."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_SESSION_TOKEN", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        env.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield S3Server(endpoint_url=f"http://127.0.0.1:{port}", port=port)
        finally:
            server.stop()


# A real, tiny dMelodies dataset: 16 FluidSynth-rendered clips, 4 per shard (3 train + 1 val).
SMALL_DMELODIES = dict(n_clips=16, seed=3, samples_per_shard=4, fractions=(0.75, 0.25, 0.0),
                       render_batch=4, workers=2, progress=False)


@pytest.fixture(scope="session")
def small_dmelodies(tmp_path_factory):
    """Path of a prepared SMALL_DMELODIES dataset; read-only (copy it before corrupting)."""
    from data_prep.dmelodies import prepare_dmelodies

    out = tmp_path_factory.mktemp("dmelodies") / "small"
    prepare_dmelodies(str(out), **SMALL_DMELODIES)
    return out
