"""Reading prepared datasets: WebDataset shards plus a `dataset.json` manifest, local or on S3.

Layout written by data_prep (one URI scheme for both: a local folder or s3://bucket/prefix):

    <uri>/dataset.json          manifest (written last): feature params, splits, shard checksums
    <uri>/train-000000.tar ...  shards; one sample = <key>.flac + <key>.json + <key>.npy
        npy   float32 (T, F) log-mel features (tsdsae.features), loaded with allow_pickle=False
        json  labels: instrument, notes [[midi_pitch, onset_s, duration_s], ...], valid_frames, ...
        flac  the peak-normalised 16 kHz mono source audio (int16 PCM)

Two ways in:
- `load_dataset(uri)`: whole splits as tensors in memory (tsdsae.dataset.Dataset), the same form
  as the toy dataset, so the trainer does not care where data came from;
- `stream_split(uri, split)`: a WebDataset pipeline (split by node and DataLoader worker) for
  data larger than memory, with `collate_samples` to pad and mask batches.

Nothing here unpickles: npy goes through numpy with allow_pickle=False, json through json, flac
through soundfile. Every shard is checked against the manifest (checksum, sample count, member
names, dtype and shape) by one function, `iter_shard_samples`, shared with data_prep.verify; a
problem raises ShardError naming the shard and the sample key.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator
from urllib.parse import urlparse

import numpy as np
import torch

from tsdsae import features
from tsdsae.dataset import Dataset, Split, pad_stack
from tsdsae.storage import ObjectNotFound, S3Store, StorageError, is_s3_uri, open_store

MANIFEST_NAME = "dataset.json"
SCHEMA_VERSION = 1
FEATURE_EXT, LABEL_EXT, AUDIO_EXT = "npy", "json", "flac"
SAMPLE_EXTS = (AUDIO_EXT, LABEL_EXT, FEATURE_EXT)      # the order members are written in
# Sample keys and member names: no slashes, no dots except the one before the extension.
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,120}$")
MEMBER_RE = re.compile(r"^([A-Za-z0-9_-]{1,120})\.(npy|json|flac)$")


class ShardError(RuntimeError):
    """A shard does not match its manifest or cannot be decoded; names the shard and the key."""

    def __init__(self, shard: str, problem: str, key: str | None = None):
        self.shard, self.problem, self.key = shard, problem, key
        where = f"shard {shard}" + (f", sample {key!r}" if key else "")
        super().__init__(f"corrupt dataset: {where}: {problem}. Re-run the data_prep command "
                         "that made this dataset (it rewrites bad shards) or restore the shard.")


# --- manifest --------------------------------------------------------------------------------


def _dataset_root(uri: str | os.PathLike) -> str:
    uri = str(uri)
    return uri[: -len(MANIFEST_NAME)].rstrip("/") if uri.endswith("/" + MANIFEST_NAME) else uri


def is_dataset_uri(uri: str | os.PathLike) -> bool:
    """True for an s3:// URI, or a local folder (or its dataset.json) that holds a manifest.

    Cheap and offline: an S3 URI is not contacted here (load_dataset reports problems clearly).
    """
    uri = str(uri)
    if is_s3_uri(uri):
        return True
    if "://" in uri and not uri.startswith("file://"):
        return False
    root = Path(urlparse(uri).path if uri.startswith("file://") else _dataset_root(uri))
    return (root / MANIFEST_NAME).is_file()


def load_manifest(uri: str | os.PathLike, endpoint_url: str | None = None) -> dict:
    """The manifest of the dataset at `uri` (a folder / s3 prefix, or its dataset.json)."""
    store = open_store(_dataset_root(uri), endpoint_url)
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


# --- one sample --------------------------------------------------------------------------------


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_json(data: bytes) -> dict:
    return json.loads(data.decode("utf-8"))


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile as sf
    audio, sr = sf.read(io.BytesIO(data), dtype="float32")
    return audio, sr


def frame_notes(notes: Iterable, num_frames: int, valid_frames: int | None = None) -> np.ndarray:
    """Per-frame MIDI pitch (num_frames,) int64 from [[pitch, onset_s, duration_s], ...].

    Frame t covers time t * HOP / SAMPLE_RATE s; it gets the pitch of the note sounding then,
    -1 for rests and for frames at or after `valid_frames` (padding).
    """
    out = np.full(num_frames, -1, dtype=np.int64)
    sr, hop = features.SAMPLE_RATE, features.HOP
    for pitch, onset, duration in notes:
        # Integer sample positions avoid float ties at frame boundaries.
        start = -(-int(round(onset * sr)) // hop)
        end = -(-int(round((onset + duration) * sr)) // hop)
        out[max(start, 0):max(end, 0)] = int(pitch)
    if valid_frames is not None:
        out[valid_frames:] = -1
    return out


def check_sample(raw: dict, manifest: dict, shard: str, decode_audio: bool = False) -> dict:
    """Decode and validate one raw sample {"__key__", "npy", "json"[, "flac"]} (bytes values).

    Returns {"key", "features" (T, F) float32, "labels" dict, "audio" (S,) float32 or None}.
    Raises ShardError naming the shard and key on any problem.
    """
    key = raw.get("__key__")
    for ext in (FEATURE_EXT, LABEL_EXT, AUDIO_EXT):
        if ext not in raw:
            raise ShardError(shard, f"member {key}.{ext} is missing", key)
    try:
        feats = decode_npy(raw[FEATURE_EXT]) if isinstance(raw[FEATURE_EXT], bytes) else raw[FEATURE_EXT]
    except Exception as exc:                                  # noqa: BLE001 - any decoder failure
        raise ShardError(shard, f"undecodable {key}.npy ({exc})", key) from None
    frames, n_mels = manifest["num_frames"], manifest["feature_params"]["n_mels"]
    if feats.dtype != np.float32 or feats.shape != (frames, n_mels):
        raise ShardError(shard, f"{key}.npy is {feats.dtype} {feats.shape}, expected float32 "
                         f"({frames}, {n_mels})", key)
    if not np.isfinite(feats).all():
        raise ShardError(shard, f"{key}.npy holds NaN or inf", key)
    try:
        labels = decode_json(raw[LABEL_EXT]) if isinstance(raw[LABEL_EXT], bytes) else raw[LABEL_EXT]
    except Exception as exc:                                  # noqa: BLE001
        raise ShardError(shard, f"undecodable {key}.json ({exc})", key) from None
    if not isinstance(labels, dict) or labels.get("instrument") not in manifest["instruments"]:
        raise ShardError(shard, f"{key}.json has no known instrument (manifest has "
                         f"{manifest['instruments']})", key)
    valid = labels.get("valid_frames", frames)
    if not isinstance(valid, int) or not 0 < valid <= frames:
        raise ShardError(shard, f"{key}.json has valid_frames={valid!r}, expected 1..{frames}", key)
    notes = labels.get("notes", [])
    if not isinstance(notes, list) or any(not isinstance(n, list) or len(n) != 3 for n in notes):
        raise ShardError(shard, f"{key}.json notes must be [[pitch, onset_s, duration_s], ...]",
                         key)
    audio = None
    if decode_audio:
        try:
            audio, sr = decode_flac(raw[AUDIO_EXT])
        except Exception as exc:                              # noqa: BLE001
            raise ShardError(shard, f"undecodable {key}.flac ({exc})", key) from None
        if audio.ndim != 1 or sr != features.SAMPLE_RATE or len(audio) != manifest["clip_samples"]:
            raise ShardError(shard, f"{key}.flac is {audio.shape} at {sr} Hz, expected mono "
                             f"{manifest['clip_samples']} samples at {features.SAMPLE_RATE} Hz",
                             key)
    return {"key": key, "features": feats, "labels": labels, "audio": audio}


# --- one shard ---------------------------------------------------------------------------------


class _HashingReader:
    """Wraps a binary stream; hashes and counts every byte read through it."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.sha256, self.size = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n) if n is not None and n >= 0 else self.stream.read()
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.stream.close()


def iter_shard_samples(stream: BinaryIO, entry: dict | None, shard: str,
                       keep: tuple[str, ...] = SAMPLE_EXTS) -> Iterator[dict]:
    """Raw samples {"__key__", "__url__", ext: bytes} of one shard read from `stream`.

    Checks, raising ShardError naming the shard (and key): member names and order, regular files
    only, complete samples, the sample count, size and sha256 against the manifest `entry`, and
    tar integrity (truncation); with entry None only the structure is checked. Members whose
    extension is not in `keep` are read but dropped.
    The checksum is only known at the end of the shard, so a bad checksum raises after the
    shard's samples were yielded: consumers see the error before the next shard starts.
    """
    reader = _HashingReader(stream)
    count, current = 0, None
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                match = MEMBER_RE.match(member.name)
                if not member.isreg() or not match:
                    raise ShardError(shard, f"unexpected tar member {member.name!r}")
                key, ext = match.groups()
                if current is None or current["__key__"] != key:
                    if current is not None:
                        _check_complete(current, shard)
                        count += 1
                        yield _select(current, keep)
                    current = {"__key__": key, "__url__": shard}
                if ext in current:
                    raise ShardError(shard, f"duplicate member {member.name!r}", key)
                current[ext] = tar.extractfile(member).read()
        if current is not None:
            _check_complete(current, shard)
            count += 1
            yield _select(current, keep)
        reader.drain()
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        key = current["__key__"] if current else None
        raise ShardError(shard, f"unreadable tar ({type(exc).__name__}: {exc}); truncated or "
                         "overwritten", key) from None
    finally:
        reader.close()
    if entry is None:
        return
    if count != entry["num_samples"]:
        raise ShardError(shard, f"{count} samples, manifest says {entry['num_samples']}")
    if reader.size != entry["size"]:
        raise ShardError(shard, f"{reader.size} bytes, manifest says {entry['size']}")
    if reader.sha256.hexdigest() != entry["sha256"]:
        raise ShardError(shard, "sha256 differs from the manifest")


def _check_complete(sample: dict, shard: str) -> None:
    missing = [ext for ext in SAMPLE_EXTS if ext not in sample]
    if missing:
        raise ShardError(shard, f"sample lacks {', '.join('.' + m for m in missing)}",
                         sample["__key__"])


def _select(sample: dict, keep: tuple[str, ...]) -> dict:
    if len(keep) == len(SAMPLE_EXTS):
        return sample
    # Keep a placeholder so check_sample still sees that the member existed.
    return {k: (v if k.startswith("__") or k in keep else b"") for k, v in sample.items()}


def _open_shard(url: str, endpoint_url: str | None) -> BinaryIO:
    from webdataset.gopen import gopen
    try:
        if is_s3_uri(url):
            return gopen(url, endpoint_url=endpoint_url)
        return gopen(url)
    except FileNotFoundError:
        raise ShardError(url, "the shard file is missing") from None
    except ObjectNotFound:
        raise ShardError(url, "the shard object is missing") from None


def read_shard(url: str, entry: dict, manifest: dict, endpoint_url: str | None = None,
               decode_audio: bool = False) -> list[dict]:
    """All samples of one shard, checked and decoded (see check_sample)."""
    stream = _open_shard(url, endpoint_url)
    return [check_sample(raw, manifest, url, decode_audio)
            for raw in iter_shard_samples(stream, entry, url)]


# --- S3 for WebDataset -------------------------------------------------------------------------

_gopen_endpoint: dict[str, str | None] = {"default": None}


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, endpoint_url: str | None = None,
              **kw: Any) -> BinaryIO:
    if mode != "rb":
        raise ValueError(f"{url}: the s3 gopen handler only reads (mode 'rb'), got {mode!r}")
    parsed = urlparse(url)
    endpoint = endpoint_url or _gopen_endpoint["default"]
    store = open_store(f"s3://{parsed.netloc}", endpoint)
    return store.open_read(parsed.path.lstrip("/"))


def register_s3_gopen(endpoint_url: str | None = None) -> None:
    """Let WebDataset open s3:// URLs through boto3 (and tsdsae.storage's endpoint rules).

    `endpoint_url` becomes the default for URLs opened without one (else AWS_ENDPOINT_URL).
    """
    from webdataset.gopen import gopen_schemes
    gopen_schemes["s3"] = _gopen_s3
    if endpoint_url is not None:
        _gopen_endpoint["default"] = endpoint_url


# --- in memory ---------------------------------------------------------------------------------


def _shard_urls(uri: str, manifest: dict, split: str, endpoint_url: str | None) -> list[tuple[str, dict]]:
    if split not in manifest["splits"]:
        raise KeyError(f"dataset {uri} has no split {split!r}; it has {sorted(manifest['splits'])}")
    store = open_store(_dataset_root(uri), endpoint_url)
    return [(store.url(entry["name"]), entry) for entry in manifest["splits"][split]["shards"]]


def samples_to_split(samples: list[dict], instruments: tuple[str, ...],
                     with_audio: bool = False) -> Split:
    """Stack decoded samples (check_sample's form) into a padded Split."""
    index = {name: i for i, name in enumerate(instruments)}
    feats, notes, audio = [], [], []
    valid = []
    for s in samples:
        t = s["features"].shape[0]
        v = s["labels"].get("valid_frames", t)
        valid.append(v)
        f = torch.from_numpy(s["features"])
        if v < t:
            f = f.clone()
            f[v:] = 0.0
        feats.append(f)
        notes.append(torch.from_numpy(frame_notes(s["labels"].get("notes", []), t, v)))
        if with_audio:
            audio.append(torch.from_numpy(s["audio"]))
    features_t, _ = pad_stack(feats)
    notes_t, _ = pad_stack(notes, pad_value=-1)
    mask = torch.arange(features_t.shape[1])[None, :] < torch.tensor(valid)[:, None]
    instrument = torch.tensor([index[s["labels"]["instrument"]] for s in samples], dtype=torch.long)
    audio_t = pad_stack(audio)[0] if with_audio and audio else None
    return Split(features_t, mask, instrument, notes_t, [s["key"] for s in samples], instruments,
                 audio_t)


def load_dataset(uri: str | os.PathLike, splits: Iterable[str] | None = None,
                 endpoint_url: str | None = None, with_audio: bool = False,
                 max_workers: int = 8, progress: bool = False) -> Dataset:
    """Load whole splits of the dataset at `uri` into memory (tsdsae.dataset.Dataset).

    Shards are fetched in parallel and each is checked against the manifest (ShardError on a
    problem). Features (N, T, F) float32, mask (N, T), instrument (N,) indexing the manifest's
    instrument list (the same for all splits), notes (N, T) per-frame MIDI pitch or -1, and with
    `with_audio` the source audio (N, S) float32.
    """
    uri = _dataset_root(uri)
    manifest = load_manifest(uri, endpoint_url)
    names = list(manifest["splits"]) if splits is None else list(splits)
    instruments = tuple(manifest["instruments"])
    jobs = [(split, url, entry) for split in names
            for url, entry in _shard_urls(uri, manifest, split, endpoint_url)]

    def fetch(job):
        _, url, entry = job
        return read_shard(url, entry, manifest, endpoint_url, decode_audio=with_audio)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(jobs) or 1))) as pool:
        results = pool.map(fetch, jobs)
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(jobs), desc=f"loading {uri}", unit="shard")
        per_split: dict[str, list[dict]] = {name: [] for name in names}
        for (split, _, _), samples in zip(jobs, results):
            per_split[split].extend(samples)
    out = {name: samples_to_split(samples, instruments, with_audio)
           for name, samples in per_split.items() if samples}
    meta = {"kind": "shards", "uri": uri, "manifest": manifest}
    return Dataset(out, name=manifest.get("name", Path(uri).name), meta=meta)


# --- streaming ---------------------------------------------------------------------------------


class StreamingSplit(torch.utils.data.IterableDataset):
    """One split as a WebDataset pipeline: shards -> node -> worker -> samples -> shuffle -> decode.

    Each item is a dict: key (str), features (T, F) float32, mask (T,) bool, instrument (int,
    index into `instruments`), notes (T,) int64 and, with `with_audio`, audio (S,) float32.
    Use with torch DataLoader(batch_size=..., collate_fn=collate_samples). Under DDP each rank
    gets every world_size-th shard (wds.split_by_node) and each DataLoader worker every
    num_workers-th of those, so have at least world_size x num_workers shards.
    Call set_epoch(e) before each epoch for a new, reproducible shuffle order.
    """

    def __init__(self, uri: str, split: str, endpoint_url: str | None = None,
                 shuffle: bool = True, seed: int = 0, shuffle_buffer: int = 1000,
                 with_audio: bool = False):
        super().__init__()
        self.uri, self.split, self.endpoint_url = _dataset_root(uri), split, endpoint_url
        self.manifest = load_manifest(self.uri, endpoint_url)
        self.shards = _shard_urls(self.uri, self.manifest, split, endpoint_url)
        self.instruments = tuple(self.manifest["instruments"])
        self.num_samples = self.manifest["splits"][split]["num_samples"]
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.with_audio = with_audio
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_order(self) -> list[str]:
        urls = [url for url, _ in self.shards]
        if self.shuffle:
            # Same permutation on every rank (same seed and epoch) before split_by_node.
            random.Random(f"{self.seed}-{self.epoch}").shuffle(urls)
        return urls

    def _expand(self, sources: Iterable[dict]) -> Iterator[dict]:
        entries = {url: entry for url, entry in self.shards}
        keep = SAMPLE_EXTS if self.with_audio else (LABEL_EXT, FEATURE_EXT)
        for source in sources:
            url = source["url"]
            yield from iter_shard_samples(_open_shard(url, self.endpoint_url), entries[url], url,
                                          keep)

    def _to_item(self, sample: dict) -> dict:
        checked = check_sample(sample, self.manifest, sample["__url__"])
        feats, labels = checked["features"], checked["labels"]
        t = feats.shape[0]
        valid = labels.get("valid_frames", t)
        item = {
            "key": checked["key"],
            "features": torch.from_numpy(feats),
            "mask": torch.arange(t) < valid,
            "instrument": self.instruments.index(labels["instrument"]),
            "notes": torch.from_numpy(frame_notes(labels.get("notes", []), t, valid)),
        }
        if self.with_audio:
            audio, sr = sample[AUDIO_EXT]
            item["audio"] = torch.from_numpy(audio)
        return item

    def pipeline(self):
        import webdataset as wds
        from webdataset.utils import pytorch_worker_info

        rank, _, worker, _ = pytorch_worker_info()
        stages = [wds.SimpleShardList(self._shard_order()), wds.split_by_node,
                  wds.split_by_worker, self._expand]
        if self.shuffle:
            rng = random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer),
                                      rng=rng))
        # Explicit handlers and post=[]: no default handlers, so nothing can be unpickled.
        handlers = [_npy_handler, _json_handler] + ([_flac_handler] if self.with_audio else [])
        stages += [wds.decode(*handlers, pre=[], post=[], handler=_raise_shard_error), wds.map(self._to_item)]
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.pipeline())

    def __len__(self) -> int:
        return self.num_samples


def _npy_handler(key: str, data: bytes):
    return decode_npy(data) if key.endswith(FEATURE_EXT) else None


def _json_handler(key: str, data: bytes):
    return decode_json(data) if key.endswith(LABEL_EXT) else None


def _flac_handler(key: str, data: bytes):
    return decode_flac(data) if key.endswith(AUDIO_EXT) else None


def _raise_shard_error(exc: Exception) -> bool:
    if isinstance(exc, ShardError):
        raise exc
    # wds.decode wraps decoder failures in DecodingError(url, key, k) with the cause chained.
    url, key, member = (getattr(exc, name, None) for name in ("url", "key", "k"))
    cause = exc.__cause__ or exc
    raise ShardError(url or "?", f"undecodable {key}.{member} ({cause})", key) from None


def stream_split(uri: str | os.PathLike, split: str, endpoint_url: str | None = None,
                 shuffle: bool = True, seed: int = 0, shuffle_buffer: int = 1000,
                 with_audio: bool = False) -> StreamingSplit:
    """A streaming, node- and worker-split view of one split (see StreamingSplit)."""
    return StreamingSplit(str(uri), split, endpoint_url=endpoint_url, shuffle=shuffle, seed=seed,
                          shuffle_buffer=shuffle_buffer, with_audio=with_audio)


def collate_samples(items: list[dict]) -> dict:
    """Pad StreamingSplit items into a batch: features (B, T, F), mask (B, T), instrument (B,),
    notes (B, T) (-1 on padding), keys, and audio (B, S) when present."""
    feats, _ = pad_stack([it["features"] for it in items])
    masks, _ = pad_stack([it["mask"] for it in items], pad_value=False)
    notes, _ = pad_stack([it["notes"] for it in items], pad_value=-1)
    feats = feats * masks[..., None]
    batch = {"features": feats, "mask": masks, "notes": notes,
             "instrument": torch.tensor([it["instrument"] for it in items], dtype=torch.long),
             "keys": [it["key"] for it in items]}
    if "audio" in items[0]:
        batch["audio"] = pad_stack([it["audio"] for it in items])[0]
    return batch


register_s3_gopen()
