"""Whole splits in memory: every shard of a split read, checked and stacked into tensors.

`load_dataset(uri)` returns the tsdsae.dataset.Dataset form the toy dataset has too, so the
trainer and the evaluation do not care where the data came from. `iter_split_samples` reads
one split shard by shard in manifest order (finding one sample without holding the rest).
"""
from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch

from tsdsae.data.manifest import dataset_root, load_manifest, shard_urls, split_names
from tsdsae.data.shards import ShardError, read_shard
from tsdsae.dataset import Dataset, Split, pad_stack


def samples_to_split(samples: list[dict], instruments: tuple[str, ...],
                     with_audio: bool = False) -> Split:
    """Stack decoded samples (check_sample's form) into a padded Split: features (N, T, F)
    float32 with zeros on padding frames, mask (N, T), instrument (N,) indexing `instruments`,
    notes (N, T) (-1 on rests and padding), keys, and with `with_audio` audio (N, S)."""
    index = {name: i for i, name in enumerate(instruments)}
    feats, notes, audio, valid = [], [], [], []
    for s in samples:
        t, v = s["features"].shape[0], s["valid_frames"]
        valid.append(v)
        f = torch.from_numpy(s["features"])
        if v < t:
            f[v:] = 0.0                       # padding frames are zero, as in pad_stack
        feats.append(f)
        notes.append(torch.from_numpy(s["notes"]))
        if with_audio:
            audio.append(torch.from_numpy(s["audio"]))
    features_t, _ = pad_stack(feats)
    notes_t, _ = pad_stack(notes, pad_value=-1)
    mask = torch.arange(features_t.shape[1])[None, :] < torch.tensor(valid)[:, None]
    instrument = torch.tensor([index[s["labels"]["instrument"]] for s in samples], dtype=torch.long)
    audio_t = pad_stack(audio)[0] if with_audio and audio else None
    return Split(features_t, mask, instrument, notes_t, [s["key"] for s in samples], instruments,
                 audio_t)


def check_unique_key(key: str, shard: str, seen: dict[str, str]) -> None:
    """Record that `shard` holds sample `key`; raise ShardError when an earlier shard of the
    dataset (`seen`: key -> shard) holds it too (in two splits it is a leak between them)."""
    if key in seen:
        raise ShardError(shard, f"sample key {key!r} is also in {seen[key]} (keys must be unique "
                         "across the whole dataset, or one clip counts twice or leaks between "
                         "splits)", key)
    seen[key] = shard


def load_dataset(uri: str | os.PathLike, splits: Iterable[str] | None = None,
                 endpoint_url: str | None = None, with_audio: bool = False,
                 max_workers: int = 8, progress: bool = False) -> Dataset:
    """Load whole splits of the dataset at `uri` (a folder, its dataset.json, or an s3:// prefix)
    into memory: all splits the manifest holds samples for, or those named in `splits`.

    Shards are fetched in parallel threads and each is checked against the manifest. Every
    split is a tsdsae.dataset.Split (see samples_to_split); the instrument index is the
    manifest's instrument list, the same for all splits. Raises StorageError (no or a bad
    manifest), MissingSplitError (a named split the dataset lacks), ShardError (a bad shard).
    """
    uri = dataset_root(uri)
    manifest = load_manifest(uri, endpoint_url)
    names = split_names(manifest) if splits is None else list(splits)
    instruments = tuple(manifest["instruments"])
    jobs = [(split, url, entry) for split in names
            for url, entry in shard_urls(uri, manifest, split, endpoint_url)]

    def fetch(job):
        _, url, entry = job
        return read_shard(url, entry, manifest, endpoint_url, decode_audio=with_audio)

    workers = max(1, min(max_workers, len(jobs)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(fetch, jobs)
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(jobs), desc=f"loading {uri}", unit="shard")
        per_split: dict[str, list[dict]] = {name: [] for name in names}
        seen: dict[str, str] = {}                      # sample key -> the shard that holds it
        for (split, url, _), samples in zip(jobs, results):
            for sample in samples:
                check_unique_key(sample["key"], url, seen)
            per_split[split].extend(samples)
    out = {name: samples_to_split(samples, instruments, with_audio)
           for name, samples in per_split.items()}
    meta = {"kind": "shards", "uri": uri, "manifest": manifest}
    return Dataset(out, name=manifest.get("name", Path(uri).name), meta=meta)


def iter_split_samples(uri: str | os.PathLike, split: str, endpoint_url: str | None = None,
                       with_audio: bool = False) -> Iterator[dict]:
    """The decoded samples (check_sample's form) of one split in manifest order, one shard in
    memory at a time. Raises like load_dataset."""
    uri = dataset_root(uri)
    manifest = load_manifest(uri, endpoint_url)
    for url, entry in shard_urls(uri, manifest, split, endpoint_url):
        yield from read_shard(url, entry, manifest, endpoint_url, decode_audio=with_audio)


def memory_limit_bytes() -> int | None:
    """The memory this process may use, as far as the OS says: the smallest of its address-space
    and data-segment limits (ulimit -v / -d, prlimit), its cgroup's memory.max and the memory
    available now (/proc/meminfo). None when none is known."""
    import resource

    limits = []
    for which in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        soft, _ = resource.getrlimit(which)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    for path, scale in (("/sys/fs/cgroup/memory.max", 1), ("/proc/meminfo", 1024)):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        if path.endswith("memory.max"):
            if text.strip().isdigit():
                limits.append(int(text))
        else:
            for line in text.splitlines():
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * scale)
    return min(limits) if limits else None


def _free_bytes() -> int | None:
    """memory_limit_bytes() less what this process already holds (its peak resident size)."""
    import resource

    limit = memory_limit_bytes()
    if limit is None:
        return None
    return max(0, limit - resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class DatasetTooLarge(MemoryError, ValueError):
    """A split held in memory would not fit in the memory this process may use."""


def open_dataset(uri: str | os.PathLike, endpoint_url: str | None = None, stream: str = "auto",
                 memory_budget_mb: float = 4096.0, shuffle_buffer: int = 512) -> Dataset:
    """The dataset at `uri` for training: every split in memory (load_dataset), or, when
    `stream` is "on" or "auto" with the train split's float32 features above the budget, the
    train split as a tsdsae.data.stream.StreamSplit (each rank reads its share of its shards)
    and the other splits (validation and test: smaller, read whole by every epoch's validation
    and by the evaluation) in memory. The budget is `memory_budget_mb`, or half the memory this
    process has left (memory_limit_bytes less its peak resident size) when that is less: reading
    a split whole holds it twice for a moment. Raises DatasetTooLarge, before reading any shard,
    when `stream` is "off" and the train split would not fit that way; else like
    load_dataset."""
    from tsdsae.data.stream import StreamSplit, split_bytes

    uri = dataset_root(uri)
    manifest = load_manifest(uri, endpoint_url)
    need = split_bytes(manifest, "train") if "train" in split_names(manifest) else 0
    free = _free_bytes()
    budget = memory_budget_mb * 2**20
    if free is not None:
        budget = min(budget, free / 2)
    if stream == "off" and free is not None and 2 * need > free:
        raise DatasetTooLarge(
            f"the train split of {uri} needs {need / 2**20:.0f} MB in memory (twice that while "
            f"it is read), more than the {free / 2**20:.0f} MB this process has left; stream it "
            "(data.stream=auto or on)")
    if stream == "off" or (stream == "auto" and need <= budget):
        return load_dataset(uri, endpoint_url=endpoint_url)
    rest = [name for name in split_names(manifest) if name != "train"]
    data = load_dataset(uri, splits=rest, endpoint_url=endpoint_url)
    held_out = {key: f"the {name} split" for name in rest for key in data[name].keys}
    data.splits["train"] = StreamSplit(uri, "train", endpoint_url, shuffle_buffer, manifest,
                                       held_out)
    data.meta["streamed"] = ["train"]
    return data
