"""tsdsae.storage against a local directory and a real S3 API (moto over HTTP)."""
from __future__ import annotations

import threading
import time

import pytest

from conftest import free_port
from tsdsae import checkpoint
from tsdsae.storage import (PROBE, TRANSFER, ObjectNotFound, StorageError, absolute_location,
                            open_store, pyarrow_filesystem, split_s3_uri)


def _round_trip(store, tmp_path):
    store.check(create=True)
    assert not store.exists("a/b.bin")
    store.write_bytes("a/b.bin", b"hello")
    assert store.exists("a/b.bin") and store.read_bytes("a/b.bin") == b"hello"
    store.write_bytes("a/b.bin", b"hello again")              # overwrite
    assert store.read_bytes("a/b.bin") == b"hello again"
    assert store.size("a/b.bin") == len(b"hello again")
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 100)
    store.upload_file(src, "up.bin")
    store.download_file("up.bin", tmp_path / "down.bin")
    assert (tmp_path / "down.bin").read_bytes() == src.read_bytes()
    with store.open_read("up.bin") as stream:
        assert stream.read() == src.read_bytes()
    assert store.list() == ["a/b.bin", "up.bin"]
    assert store.list("a/") == ["a/b.bin"]
    store.delete("a/b.bin")
    store.delete("a/b.bin")                                    # deleting twice is fine
    assert store.list() == ["up.bin"]
    with pytest.raises(ObjectNotFound):
        store.read_bytes("missing.bin")
    with pytest.raises(StorageError, match="invalid relative name"):
        store.write_bytes("../escape.bin", b"x")


def test_local_store_round_trip(tmp_path):
    store = open_store(tmp_path / "root")
    _round_trip(store, tmp_path)
    assert store.url("up.bin") == str(tmp_path / "root" / "up.bin")
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["a", "up.bin"]


def test_local_store_missing_dir_is_clear(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        open_store(tmp_path / "nope").check()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        open_store(tmp_path / "file").check(create=True)
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_store("gs://bucket/x")


def test_s3_store_round_trip(s3_server, tmp_path):
    bucket = s3_server.make_bucket()
    store = open_store(f"s3://{bucket}/some/prefix/", endpoint_url=s3_server.endpoint_url)
    assert store.uri == f"s3://{bucket}/some/prefix"
    _round_trip(store, tmp_path)
    assert store.url("up.bin") == f"s3://{bucket}/some/prefix/up.bin"
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["some/prefix/up.bin"]


def test_s3_endpoint_from_environment(s3_server, monkeypatch):
    bucket = s3_server.make_bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    store = open_store(f"s3://{bucket}/p").check()
    store.write_bytes("x", b"1")
    assert s3_server.client().get_object(Bucket=bucket, Key="p/x")["Body"].read() == b"1"


def test_missing_bucket_is_one_clear_error(s3_server):
    uri = "s3://no-such-bucket-here/prefix"
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        open_store(uri, endpoint_url=s3_server.endpoint_url).check()
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert uri in message and s3_server.endpoint_url in message and "does not exist" in message


def test_unreachable_endpoint_fails_fast_without_leaking_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLEAKCHECK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-leak-check")
    endpoint = f"http://127.0.0.1:{free_port()}"               # nothing listens there
    uri = "s3://some-bucket/data"
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        open_store(uri, endpoint_url=endpoint).check()
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert uri in message and endpoint in message and "unreachable" in message
    assert "s3cr3t" not in message and "AKIDLEAKCHECK" not in message
    with pytest.raises(StorageError, match="unreachable"):
        open_store(uri, endpoint_url=endpoint).read_bytes("dataset.json")


def test_pyarrow_filesystem_shares_the_endpoint(s3_server, tmp_path):
    path, fs = pyarrow_filesystem(tmp_path / "local")
    assert fs is None and path == str(tmp_path / "local")
    bucket = s3_server.make_bucket()
    path, fs = pyarrow_filesystem(f"s3://{bucket}/ray", endpoint_url=s3_server.endpoint_url)
    assert path == f"{bucket}/ray"                             # Ray wants no scheme with a filesystem
    with fs.open_output_stream(f"{path}/marker.txt") as out:
        out.write(b"from pyarrow")
    store = open_store(f"s3://{bucket}/ray", endpoint_url=s3_server.endpoint_url)
    assert store.read_bytes("marker.txt") == b"from pyarrow"


def test_absolute_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_location("data/x") == str(tmp_path / "data" / "x")
    assert absolute_location("/abs/x") == "/abs/x"
    assert absolute_location("s3://b/x") == "s3://b/x"


def test_split_s3_uri():
    assert split_s3_uri("s3://bkt/x/y/") == ("bkt", "x/y")
    assert split_s3_uri("s3://bkt") == ("bkt", "")
    assert split_s3_uri("s3://bkt/a b/%41/ü;x=1") == ("bkt", "a b/%41/ü;x=1")   # verbatim
    with pytest.raises(StorageError, match="no bucket"):
        split_s3_uri("s3:///x")
    with pytest.raises(StorageError, match="not a valid S3 bucket name"):
        split_s3_uri("s3://My_Bucket/x")


def test_s3_key_prefixes_are_verbatim_or_refused(s3_server, tmp_path):
    """Everything after s3://bucket/ is the key prefix: characters that URL parsers keep land in
    the key as written; '?' and '#' (which they cut at) are refused wherever a URI is opened,
    so two different URIs never share objects."""
    bucket = s3_server.make_bucket()
    endpoint = s3_server.endpoint_url
    odd = f"s3://{bucket}/exp x/%41/flûte;v=1"
    open_store(odd, endpoint).write_bytes("dataset.json", b"{}")
    checkpoint.save({"epoch": 0}, f"{odd}/best.pt", endpoint)
    path, _ = pyarrow_filesystem(odd, endpoint)
    assert path == f"{bucket}/exp x/%41/flûte;v=1"
    keys = sorted(o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["exp x/%41/flûte;v=1/best.pt", "exp x/%41/flûte;v=1/dataset.json"]
    assert checkpoint.load(f"{odd}/best.pt", endpoint_url=endpoint)["epoch"] == 0

    for uri in (f"s3://{bucket}/exp?x/ds", f"s3://{bucket}/exp#x/ds", f"s3://{bucket}/a\\b"):
        for use in (lambda u: open_store(u, endpoint),
                    lambda u: checkpoint.save({"epoch": 0}, f"{u}/best.pt", endpoint),
                    lambda u: pyarrow_filesystem(u, endpoint)):
            with pytest.raises(StorageError) as info:
                use(uri)
            assert repr(uri) in str(info.value) and "cannot be used" in str(info.value)
    assert sorted(o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=bucket)["Contents"]) == keys                    # nothing written by the refusals


class RestartableMoto:
    """A moto S3 server of its own (same in-process backend as the session server, so buckets
    survive a restart) that can be stopped - its port then refuses connections - and started
    again on the same port."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self):
        self.server.start()

    def stop(self):
        self.server.stop()
        self.server._server.server_close()       # release the port: connections are refused


def test_transfers_ride_out_a_restarted_server_while_probes_fail_fast(s3_server):
    """A checkpoint write that meets a stopped S3 server is retried (TRANSFER policy) until the
    server is back, instead of ending the run; a probe of the stopped server (PROBE policy)
    fails in seconds with one clear error."""
    assert PROBE.max_attempts == 2 and TRANSFER.max_attempts >= 5 and TRANSFER.mode == "adaptive"
    moto = RestartableMoto()
    moto.start()
    try:
        bucket = s3_server.make_bucket()               # shared backend: visible on both ports
        uri = f"s3://{bucket}/runs/r1/last.pt"
        checkpoint.save({"epoch": 1}, uri, moto.endpoint_url)      # probed and working
        moto.stop()
        start = time.monotonic()
        with pytest.raises(StorageError, match="unreachable"):
            open_store(f"s3://{bucket}/runs", moto.endpoint_url).check()
        assert time.monotonic() - start < 5

        restart = threading.Timer(2.0, moto.start)
        restart.start()
        start = time.monotonic()
        checkpoint.save({"epoch": 2}, uri, moto.endpoint_url)       # waits for the restart
        took = time.monotonic() - start
        restart.join()
        assert took >= 1.5
        assert checkpoint.load(uri, endpoint_url=s3_server.endpoint_url)["epoch"] == 2
    finally:
        moto.stop()
