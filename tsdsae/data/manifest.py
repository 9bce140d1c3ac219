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
import re
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
    if not isinstance(manifest, dict):
        raise StorageError(f"{store.url(MANIFEST_NAME)} is not a JSON object; re-run the "
                           "preparation")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StorageError(f"{store.url(MANIFEST_NAME)} has schema_version {version!r}; this "
                           f"reader understands {SCHEMA_VERSION}: re-run the preparation")
    if manifest.get("feature_params") != features.FEATURE_PARAMS:
        raise StorageError(f"{store.url(MANIFEST_NAME)} was made with other feature parameters "
                           "than tsdsae.features.FEATURE_PARAMS; re-run the preparation")
    problem = manifest_problem(manifest)
    if problem:
        raise StorageError(f"{store.url(MANIFEST_NAME)}: {problem}; re-run the preparation "
                           "(or restore the file)")
    return manifest


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}\.tar$")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def manifest_problem(manifest: dict) -> str | None:
    """The first way `manifest` breaks the schema the readers rely on, as "field X must be ..."
    (None when it fits): instruments a non-empty list of distinct strings; num_frames and
    clip_samples positive integers; splits an object of split name -> {num_samples, shards:
    [{name (a .tar file name, no path), num_samples, size, sha256 (64 hex digits)}]}."""
    instruments = manifest.get("instruments")
    if (not isinstance(instruments, list) or not instruments
            or not all(isinstance(i, str) and i for i in instruments)
            or len(set(instruments)) != len(instruments)):
        return "field 'instruments' must be a non-empty list of distinct names"
    for field in ("num_frames", "clip_samples"):
        if not _count(manifest.get(field)) or manifest[field] == 0:
            return f"field {field!r} must be a positive integer"
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return "field 'splits' must be an object of split name -> split"
    for name, info in splits.items():
        where = f"splits.{name}"
        if not isinstance(info, dict):
            return f"field {where!r} must be an object"
        if not _count(info.get("num_samples")):
            return f"field '{where}.num_samples' must be an integer >= 0"
        if not isinstance(info.get("shards"), list):
            return f"field '{where}.shards' must be a list"
        for k, entry in enumerate(info["shards"]):
            at = f"{where}.shards[{k}]"
            if not isinstance(entry, dict):
                return f"field {at!r} must be an object"
            if not isinstance(entry.get("name"), str) or not _SHARD_NAME.match(entry["name"]):
                return f"field '{at}.name' must be a shard file name (NAME.tar, no path)"
            for field in ("num_samples", "size"):
                if not _count(entry.get(field)):
                    return f"field '{at}.{field}' must be an integer >= 0"
            if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
                return f"field '{at}.sha256' must be 64 lowercase hex digits"
    return None


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
