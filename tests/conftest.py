"""Shared fixtures: the real services tests talk to (an S3 endpoint over HTTP, a local Ray, an
MLflow tracking server)."""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

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


# A real, tiny dMelodies dataset: 24 FluidSynth-rendered clips, 4 per shard (train 16 / val 4 /
# test 4, the default 4:1:1 split: 4 train shards, 1 val, 1 test).
SMALL_DMELODIES = dict(n_clips=24, seed=3, samples_per_shard=4, fractions=(4 / 6, 1 / 6, 1 / 6),
                       render_batch=4, workers=2, progress=False)


@pytest.fixture(scope="session")
def small_dmelodies(tmp_path_factory):
    """Path of a prepared SMALL_DMELODIES dataset; read-only (copy it before corrupting)."""
    from data_prep.dmelodies import prepare_dmelodies

    out = tmp_path_factory.mktemp("dmelodies") / "small"
    prepare_dmelodies(str(out), **SMALL_DMELODIES)
    return out


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray (2 CPUs) for the whole session. Started after the S3 server: Ray's workers
    and the Train controller inherit the environment of ray.init, so they get its fake AWS
    credentials (endpoints travel explicitly, in data.endpoint_url and Ray's storage filesystem)."""
    import ray

    from tsdsae.ray_train import runtime_env

    ray.init(num_cpus=2, runtime_env=runtime_env(), object_store_memory=256 * 2**20,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclasses.dataclass
class MlflowServer:
    """A real `mlflow server` (sqlite backend, artifacts served over HTTP) on 127.0.0.1."""

    uri: str
    root: Path

    def client(self):
        from mlflow.tracking import MlflowClient
        return MlflowClient(self.uri)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    # No job-execution consumer: the server is ready sooner and starts no extra process.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: "
                                   f"{(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not answer /health within 120 s")
            time.sleep(0.5)
        yield MlflowServer(uri=uri, root=root)
    finally:
        # The server runs its web workers as children in its own session (start_new_session),
        # so signalling that process group stops exactly what this fixture started.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory):
    """A debug-trained checkpoint (3 epochs on 64 toy clips: seconds), shared by the inference,
    swap and export tests."""
    from tsdsae.config import apply_overrides, debug
    from tsdsae.trainer import Trainer

    root = tmp_path_factory.mktemp("runs")
    cfg = apply_overrides(debug(), [f"checkpoint.root={root}", "data.toy_clips=64",
                                    "schedule.switch_epoch=1", "schedule.max_epochs=3"])
    return Trainer(cfg, progress=False).fit()[0]["best_checkpoint"]


@pytest.fixture(scope="session")
def chromium():
    """One headless Chromium for the whole test session (tests/browser.py)."""
    from browser import Chromium

    browser = Chromium()
    try:
        yield browser
    finally:
        browser.close()


def kill_after_first_shard(cmd: list[str], out: Path, timeout: float = 180.0) -> None:
    """Run `cmd` (a prep process writing shards into `out`) and SIGKILL it as soon as its first
    shard file appears; asserts it really died of the signal (not of an error of its own)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not list(out.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    finally:
        proc.stderr.close()
