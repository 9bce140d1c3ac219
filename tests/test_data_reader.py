"""tsdsae.data: in-memory and streaming reads of real shards, local and over S3 (moto)."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import time

import numpy as np
import pytest
import torch

from conftest import SMALL_DMELODIES, free_port
from data_prep.dmelodies import prepare_dmelodies
from data_prep.shards import tar_bytes
from data_prep.verify import verify_dataset
from tsdsae.data import (ShardError, collate_samples, frame_notes, is_dataset_uri, load_dataset,
                         load_manifest, stream_split)
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
    with pytest.raises(KeyError, match="no split 'bogus'"):
        load_dataset(small_dmelodies, splits=["bogus"])


def test_streaming_matches_memory_and_shuffles_reproducibly(small_dmelodies):
    memory = load_dataset(small_dmelodies)["train"]
    by_key = {k: i for i, k in enumerate(memory.keys)}
    stream = stream_split(small_dmelodies, "train", shuffle=True, seed=5, shuffle_buffer=8)
    assert len(stream) == 12
    items = list(stream)
    assert sorted(it["key"] for it in items) == sorted(memory.keys)
    for it in items:
        i = by_key[it["key"]]
        assert torch.equal(it["features"], memory.features[i])
        assert torch.equal(it["notes"], memory.notes[i])
        assert it["instrument"] == int(memory.instrument[i]) and it["mask"].all()
    order = [it["key"] for it in items]
    assert [it["key"] for it in stream] != order                 # each pass reshuffles
    stream.set_epoch(0)
    assert [it["key"] for it in stream] == order                 # reproducible per epoch
    assert [it["key"] for it in stream] == order
    stream.set_epoch(1)
    assert [it["key"] for it in stream] != order
    plain = [it["key"] for it in stream_split(small_dmelodies, "train", shuffle=False)]
    assert plain == memory.keys                                  # unshuffled = manifest order


def test_streaming_with_dataloader_workers_and_ranks(small_dmelodies, monkeypatch):
    stream = stream_split(small_dmelodies, "train", seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=5, num_workers=2,
                                         collate_fn=collate_samples)
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(load_dataset(small_dmelodies)["train"].keys)
    first = batches[0]
    assert first["features"].shape[1:] == (251, 80) and first["mask"].dtype == torch.bool
    assert first["notes"].shape == first["mask"].shape and first["instrument"].dtype == torch.int64
    # Two ranks (as under DDP / Ray Train) see disjoint shards that cover the split.
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append({it["key"] for it in stream_split(small_dmelodies, "train", seed=0)})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 12


def test_collate_pads_and_masks():
    # StreamingSplit items already hold zeros on their own masked frames; collate pads the rest.
    items = [{"key": "a", "features": torch.tensor([[1.0] * 4, [1.0] * 4, [0.0] * 4]),
              "mask": torch.tensor([1, 1, 0]).bool(),
              "notes": torch.tensor([60, 61, -1]), "instrument": 1},
             {"key": "b", "features": torch.ones(2, 4), "mask": torch.ones(2, dtype=torch.bool),
              "notes": torch.tensor([62, 62]), "instrument": 0}]
    batch = collate_samples(items)
    assert batch["features"].shape == (2, 3, 4)
    assert batch["mask"].tolist() == [[True, True, False], [True, True, False]]
    assert batch["features"][0, 2].abs().sum() == 0 and batch["features"][1, 2].abs().sum() == 0
    assert batch["notes"].tolist() == [[60, 61, -1], [62, 62, -1]]
    assert batch["instrument"].tolist() == [1, 0] and batch["keys"] == ["a", "b"]


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
        list(stream_split(bad, "train", shuffle=False))
    # With a matching checksum, decoding still catches it, naming the key, everywhere alike.
    _rewrite_shard(bad, "train-000001.tar", lambda members: members)
    expected = f"train-000001.tar, sample '{key}': undecodable {key}.npy"
    with pytest.raises(ShardError, match=expected):
        load_dataset(bad)
    with pytest.raises(ShardError, match=expected):
        list(stream_split(bad, "train", shuffle=False))
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
    for read in (lambda: load_dataset(bad), lambda: list(stream_split(bad, "val"))):
        with pytest.raises(ShardError, match="unexpected tar member 'evil.pyd'"):
            read()
    _rewrite_shard(bad, "val-000000.tar",
                   lambda members: [(n.replace("dmel_", "../dmel_"), d) for n, d in members
                                    if not n.endswith(".pyd")])
    with pytest.raises(ShardError, match=r"unexpected tar member '\.\./dmel_"):
        load_dataset(bad)


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
    import webdataset as wds

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
    assert load_manifest(uri, endpoint)["num_samples"] == 16
    remote = load_dataset(uri, endpoint_url=endpoint, with_audio=True)
    local = load_dataset(small_dmelodies, with_audio=True)
    for split in ("train", "val"):
        assert remote[split].keys == local[split].keys
        assert torch.equal(remote[split].features, local[split].features)
        assert torch.equal(remote[split].audio, local[split].audio)

    stream = stream_split(uri, "train", endpoint_url=endpoint, with_audio=True)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2,
                                         collate_fn=collate_samples)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["keys"]) == sorted(local["train"].keys)
    assert batches[0]["audio"].shape == (4, 64_000)

    # Plain WebDataset can read s3:// URLs too, through the registered boto3 handler.
    from tsdsae.data import register_s3_gopen
    register_s3_gopen(endpoint)
    urls = [f"{uri}/train-00000{i}.tar" for i in range(3)]
    raw = list(wds.WebDataset(urls, shardshuffle=False).decode(post=[]))
    assert len(raw) == 12
    first = np.load(io.BytesIO(raw[0]["npy"]), allow_pickle=False)
    assert first.shape == (251, 80)
