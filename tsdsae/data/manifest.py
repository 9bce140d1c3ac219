"""The manifest of a prepared dataset: `dataset.json`, written last by data_prep.

A dataset lives under one URI (a local folder or s3://bucket/prefix):

    <uri>/dataset.json          feature parameters, instruments, splits with their shards (name,
                                num_samples, size, sha256), how the data was made
    <uri>/train-000000.tar ...  the shards (tsdsae.data.shards)

A split is present when the manifest lists it with at least one sample; a dataset may have
train/val only or train/val/test.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

from tsdsae import features
from tsdsae.dataset import MissingSplitError
from tsdsae.storage import ObjectNotFound, S3Store, StorageError, is_s3_uri, open_store

MANIFEST_NAME = "dataset.json"
SCHEMA_VERSION = 1


def dataset_root(uri: str | os.PathLike) -> str:
    """The dataset's folder / prefix, given it or its dataset.json."""
    uri = str(uri)
    return uri[: -len(MANIFEST_NAME)].rstrip("/") if uri.endswith("/" + MANIFEST_NAME) else uri


def is_dataset_uri(uri: str | os.PathLike) -> bool:
    """True for an s3:// URI, or a local folder (or its dataset.json) that holds a manifest.

    Cheap and offline: an S3 URI is not contacted here (load_manifest reports problems clearly).
    """
    uri = str(uri)
    if is_s3_uri(uri):
        return True
    if "://" in uri and not uri.startswith("file://"):
        return False
    root = Path(urlparse(uri).path if uri.startswith("file://") else dataset_root(uri))
    return (root / MANIFEST_NAME).is_file()


def load_manifest(uri: str | os.PathLike, endpoint_url: str | None = None) -> dict:
    """The manifest of the dataset at `uri` (a folder / s3 prefix, or its dataset.json).

    Raises StorageError (one line saying what to do) when it is missing, not JSON, of another
    schema version, or made with other feature parameters than tsdsae.features.FEATURE_PARAMS.
    """
    store = open_store(dataset_root(uri), endpoint_url)
    try:
        raw = store.read_bytes(MANIFEST_NAME)
    except ObjectNotFound:
        if isinstance(store, S3Store):
            store.check()                        # a missing bucket is the likelier problem
        raise StorageError(
            f"no dataset at {store.uri}: {MANIFEST_NAME} is missing (an unfinished or never-run "
            f"preparation); prepare it with `python -m data_prep.dmelodies {store.uri}` or "
            "`python -m data_prep.folder INPUT_DIR " + store.uri + "`") from None
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise StorageError(f"{store.url(MANIFEST_NAME)} is not valid JSON ({exc}); re-run the "
                           "preparation") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StorageError(f"{store.url(MANIFEST_NAME)} has schema_version {version!r}; this "
                           f"reader understands {SCHEMA_VERSION}: re-run the preparation")
    if manifest.get("feature_params") != features.FEATURE_PARAMS:
        raise StorageError(f"{store.url(MANIFEST_NAME)} was made with other feature parameters "
                           "than tsdsae.features.FEATURE_PARAMS; re-run the preparation")
    return manifest


SPLIT_ORDER = ("train", "val", "test")


def split_names(manifest: dict) -> list[str]:
    """The splits the manifest holds samples for: train, val, test first (in that order, the
    manifest may list them sorted), then any other in manifest order."""
    have = [name for name, info in manifest["splits"].items() if info.get("num_samples", 0) > 0]
    return sorted(have, key=lambda name: (SPLIT_ORDER + (name,)).index(name))


def shard_urls(uri: str, manifest: dict, split: str,
               endpoint_url: str | None = None) -> list[tuple[str, dict]]:
    """(URL, manifest entry) of each shard of `split`, in manifest order.

    Raises MissingSplitError naming the split and the splits the dataset has.
    """
    if split not in split_names(manifest):
        raise MissingSplitError(str(uri), split, split_names(manifest))
    store = open_store(dataset_root(uri), endpoint_url)
    return [(store.url(entry["name"]), entry) for entry in manifest["splits"][split]["shards"]]
