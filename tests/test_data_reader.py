"""tsdsae.data: reads of real shards (tarfile + every check), local and over S3 (moto)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from conftest import SMALL_DMELODIES, free_port
from data_prep.dmelodies import prepare_dmelodies
from data_prep.shards import tar_bytes
from data_prep.verify import verify_dataset
from tsdsae.data import (MissingSplitError, ShardError, frame_notes, is_dataset_uri,
                         iter_shard_samples, iter_split_samples, load_dataset, load_manifest)
from tsdsae.dataset import Dataset
from tsdsae.storage import StorageError, open_store
from test_data_prep import corrupt_member


def test_frame_notes_uses_frame_times():
    # Frame t is at t * 256 / 16000 s = t * 16 ms.
    notes = [[60, 0.0, 0.25], [62, 0.25, 0.5], [64, 1.0, 0.1]]
    labels = frame_notes(notes, 100)
    assert (labels[:16] == 60).all()                  # 15 * 16 ms = 0.24 s < 0.25
    assert (labels[16:47] == 62).all()                # 46 * 16 ms = 0.736 s < 0.75
    assert (labels[47:63] == -1).all()                # rest from 0.75 to 1.0 s
    assert (labels[63:69] == 64).all() and (labels[69:] == -1).all()
    assert (frame_notes(notes, 100, valid_frames=20)[20:] == -1).all()
    assert (frame_notes([], 5) == -1).all()


def without_test_split(src, dst, listed_empty: bool = False):
    """A copy of dataset `src` at `dst` as if prepared with train and val only: the test shards
    are gone and the manifest lists no test split (or, with `listed_empty`, an empty one)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "dataset.json").read_text())
    test = manifest["splits"].pop("test")
    for entry in test["shards"]:
        (dst / entry["name"]).unlink()
    if listed_empty:
        manifest["splits"]["test"] = {**test, "num_samples": 0, "shards": []}
    manifest["num_samples"] -= test["num_samples"]
    (dst / "dataset.json").write_text(json.dumps(manifest))
    return dst


def test_load_dataset_is_the_toy_form(small_dmelodies):
    assert is_dataset_uri(small_dmelodies) and is_dataset_uri(small_dmelodies / "dataset.json")
    assert is_dataset_uri("s3://bucket/prefix") and not is_dataset_uri("toy")
    data = load_dataset(small_dmelodies / "dataset.json")
    assert isinstance(data, Dataset) and list(data) == ["train", "val", "test"]
    assert data.name == "dmelodies" and data.meta["manifest"]["num_samples"] == 24
    assert data["train"].instruments == data["val"].instruments == ("violin", "trumpet")
    assert data["train"].audio is None
    assert data["val"].instrument.dtype == torch.int64 and data["val"].notes.dtype == torch.int64
    only_val = load_dataset(small_dmelodies, splits=["val"])
    assert list(only_val) == ["val"]
    assert torch.equal(only_val["val"].features, data["val"].features)
    with pytest.raises(MissingSplitError, match="has no 'bogus' split"):
        load_dataset(small_dmelodies, splits=["bogus"])


def test_split_samples_come_one_shard_at_a_time_in_manifest_order(small_dmelodies):
    memory = load_dataset(small_dmelodies, with_audio=True)["val"]
    items = list(iter_split_samples(small_dmelodies, "val", with_audio=True))
    assert [it["key"] for it in items] == memory.keys
    for i, it in enumerate(items):
        assert torch.equal(torch.from_numpy(it["features"]), memory.features[i])
        assert torch.equal(torch.from_numpy(it["audio"]), memory.audio[i])
    with pytest.raises(MissingSplitError, match="no 'bogus' split"):
        next(iter_split_samples(small_dmelodies, "bogus"))


@pytest.mark.parametrize("listed_empty", [False, True])
def test_datasets_with_and_without_a_test_split(small_dmelodies, tmp_path, listed_empty):
    three = load_dataset(small_dmelodies)
    assert list(three) == ["train", "val", "test"] and len(three["test"]) == 4
    assert not set(three["test"].keys) & (set(three["train"].keys) | set(three["val"].keys))
    two_root = without_test_split(small_dmelodies, tmp_path / "two", listed_empty)
    two = load_dataset(two_root)
    assert list(two) == ["train", "val"]
    for name in ("train", "val"):
        assert two[name].keys == three[name].keys
        assert torch.equal(two[name].features, three[name].features)
    with pytest.raises(MissingSplitError) as err:
        two["test"]
    assert str(err.value) == "dataset 'dmelodies' has no 'test' split (it has train, val)"
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    with pytest.raises(MissingSplitError, match="no 'test' split"):
        load_dataset(two_root, splits=["test"])
    assert verify_dataset(str(two_root)).ok


def test_importing_the_reader_changes_no_global_state():
    # Nothing registers itself anywhere on import: webdataset (with its global URL-scheme
    # table) is not even imported, nor are boto3, mlflow or ray.
    code = ("import sys, tsdsae.data; "
            "sys.exit(sum(m in sys.modules for m in ('webdataset', 'boto3', 'mlflow', 'ray')))")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def _rewrite_shard(root, name: str, edit) -> None:
    """Rewrite a shard's members with edit(members) and fix the manifest's checksum and size,
    so that only decoding can catch the problem."""
    import hashlib
    with tarfile.open(root / name) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    data = tar_bytes(edit(members))
    (root / name).write_bytes(data)
    manifest = json.loads((root / "dataset.json").read_text())
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            if entry["name"] == name:
                entry.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (root / "dataset.json").write_text(json.dumps(manifest))


def test_corrupt_shards_fail_clearly_in_every_reader(small_dmelodies, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(small_dmelodies, bad)
    key = corrupt_member(bad / "train-000001.tar", ".npy")        # checksum also differs
    with pytest.raises(ShardError, match="train-000001.tar.*sha256|train-000001.tar.*undecodable"):
        load_dataset(bad)
    with pytest.raises(ShardError, match="train-000001.tar"):
        list(iter_split_samples(bad, "train"))
    # With a matching checksum, decoding still catches it, naming the key, everywhere alike.
    _rewrite_shard(bad, "train-000001.tar", lambda members: members)
    expected = f"train-000001.tar, sample '{key}': undecodable {key}.npy"
    with pytest.raises(ShardError, match=expected):
        load_dataset(bad)
    with pytest.raises(ShardError, match=expected):
        list(iter_split_samples(bad, "train"))
    report = verify_dataset(str(bad))
    assert [(f["key"], f["problem"].split(" (")[0]) for f in report.failures] == [
        (key, f"undecodable {key}.npy")]


def test_pickles_and_odd_member_names_are_refused(small_dmelodies, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(small_dmelodies, bad)
    import pickle
    payload = pickle.dumps({"boom": 1})
    _rewrite_shard(bad, "val-000000.tar",
                   lambda members: members[:3] + [("evil.pyd", payload)] + members[3:])
    for read in (lambda: load_dataset(bad), lambda: list(iter_split_samples(bad, "val"))):
        with pytest.raises(ShardError, match="unexpected tar member 'evil.pyd'"):
            read()
    _rewrite_shard(bad, "val-000000.tar",
                   lambda members: [(n.replace("dmel_", "../dmel_"), d) for n, d in members
                                    if not n.endswith(".pyd")])
    with pytest.raises(ShardError, match=r"unexpected tar member '\.\./dmel_"):
        load_dataset(bad)


def _shard_and_entry(root, name="val-000000.tar"):
    manifest = json.loads((root / "dataset.json").read_text())
    entry = next(e for info in manifest["splits"].values() for e in info["shards"]
                 if e["name"] == name)
    return (root / name).read_bytes(), entry


def _problem(data, entry=None):
    with pytest.raises(ShardError) as err:
        list(iter_shard_samples(data, entry, "s.tar"))
    return err.value.problem


def test_every_tar_check_names_its_problem(small_dmelodies):
    data, entry = _shard_and_entry(small_dmelodies)
    assert [s["__key__"] for s in iter_shard_samples(data, entry, "s.tar")] == [
        m.split(".")[0] for m in tarfile.open(fileobj=io.BytesIO(data)).getnames()[::3]]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    second = members[1].offset                     # the second member's header
    # cut inside a member, cut exactly before a header, a damaged header, not a tar at all
    assert _problem(data[:members[2].offset_data + 100]).startswith("truncated: member")
    assert _problem(data[:second]) == (f"truncated: the tar ends at byte {second} without an "
                                       "end-of-archive block")
    damaged = bytearray(data)
    damaged[second + 10] ^= 0xFF                   # the header checksum no longer matches
    assert _problem(bytes(damaged)) == f"corrupt tar header at byte {second}"
    assert _problem(b"").startswith("not a readable tar archive")
    import gzip
    assert _problem(gzip.compress(data)).startswith("not a readable tar archive")
    # against the manifest entry: count, size, sha256 (a changed byte in the end padding)
    n = entry["num_samples"]
    assert _problem(data, dict(entry, num_samples=n + 1)) == f"{n} samples, the manifest says {n + 1}"
    assert _problem(data, dict(entry, size=len(data) + 1)).startswith(
        f"truncated: {len(data)} bytes")
    padded = bytearray(data)
    padded[-1] = 1
    assert _problem(bytes(padded), entry).startswith("sha256 differs")
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]


def test_links_directories_duplicates_and_incomplete_samples_are_refused(small_dmelodies):
    data, _ = _shard_and_entry(small_dmelodies)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.CHRTYPE):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            link = tarfile.TarInfo(members[0][0])
            link.type, link.linkname = kind, "/etc/passwd"
            tar.addfile(link)
        assert _problem(buf.getvalue()) == (f"unexpected tar member {members[0][0]!r} "
                                            "(not a regular file)")
    assert _problem(tar_bytes(members[:3] + [members[2]] + members[3:])).startswith(
        "duplicate member")
    assert _problem(tar_bytes(members[1:])) == "sample lacks .flac"
    # long names go through tarfile's pax/GNU handling and are still checked as names
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("x" * 200 + ".npy"), io.BytesIO(b""))
    assert _problem(buf.getvalue()) == f"unexpected tar member {'x' * 200 + '.npy'!r}"


def test_missing_dataset_errors_are_clear(tmp_path, s3_server):
    with pytest.raises(StorageError, match="dataset.json is missing"):
        load_dataset(tmp_path)
    start = time.monotonic()
    with pytest.raises(StorageError, match="s3://no-such-bucket-xyz/ds.*does not exist"):
        load_dataset("s3://no-such-bucket-xyz/ds", endpoint_url=s3_server.endpoint_url)
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match=f"s3://bkt/ds.*{closed}.*unreachable"):
        load_dataset("s3://bkt/ds", endpoint_url=closed)
    assert time.monotonic() - start < 15


def test_s3_round_trip_through_moto(small_dmelodies, s3_server, tmp_path):
    bucket = s3_server.make_bucket("data")
    uri = f"s3://{bucket}/dmelodies"
    endpoint = s3_server.endpoint_url
    manifest_uri = prepare_dmelodies(uri, endpoint_url=endpoint, **SMALL_DMELODIES)
    assert manifest_uri == f"{uri}/dataset.json"
    # Rendering is deterministic: the S3 dataset is byte-identical to the local one.
    store = open_store(uri, endpoint_url=endpoint)
    assert store.read_bytes("dataset.json") == (small_dmelodies / "dataset.json").read_bytes()
    assert store.list() == sorted(p.name for p in small_dmelodies.iterdir())
    start = time.monotonic()
    prepare_dmelodies(uri, endpoint_url=endpoint, **SMALL_DMELODIES)      # already there
    assert time.monotonic() - start < 2

    assert verify_dataset(uri, endpoint_url=endpoint).ok
    assert load_manifest(uri, endpoint)["num_samples"] == 24
    remote = load_dataset(uri, endpoint_url=endpoint, with_audio=True)
    local = load_dataset(small_dmelodies, with_audio=True)
    assert list(remote) == list(local) == ["train", "val", "test"]
    for split in local:
        assert remote[split].keys == local[split].keys
        assert torch.equal(remote[split].features, local[split].features)
        assert torch.equal(remote[split].audio, local[split].audio)

    assert [it["key"] for it in iter_split_samples(uri, "val", endpoint_url=endpoint)] \
        == local["val"].keys
