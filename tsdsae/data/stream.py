"""A training split streamed from its shards: each data-parallel rank reads its share of the
split's shards, a few at a time in memory (the one being decoded and FETCH_AHEAD being
fetched), shuffles through a buffer and yields its part of every global batch. Used when a
split is larger than a memory budget (tsdsae.data.open_dataset).

The pipeline is webdataset's (`wds.DataPipeline`: a shard list, a stage that reads one shard,
`wds.shuffle` with a seed, then batching here), with this project's checked shard reader as the
reading stage (tsdsae.data.shards.read_shard: tar structure, sanitised member names, regular
files only, no pickles, sample counts, size and sha256 of every shard, each read whole).

An epoch on rank r of W (a pure function of (seed, epoch, W, r), so a resumed epoch repeats):
  1. the split's shards in an order drawn from (seed, epoch); rank r takes every W-th from r
     (all of them, starting at r, when there are fewer shards than ranks);
  2. its samples through a shuffle buffer seeded from (seed, epoch, r);
  3. the same number of batches on every rank, whatever the shard sizes: ceil(N / B) global
     batches of B clips (the last one shorter), each cut into W parts as the in-memory path
     cuts them (tsdsae.trainer.batch_parts); a rank whose shards run out starts over on them
     (the next pass with another shuffle seed), a rank with more stops when its parts are full
     (the rest is read in another epoch, when the shards fall to other ranks). Uneven parts
     would hang DDP's all-reduce; these cannot.
"""
from __future__ import annotations

import os
import random
from typing import Iterator

import torch

from tsdsae.data.manifest import dataset_root, load_manifest, shard_urls
from tsdsae.data.memory import check_unique_key, samples_to_split
from tsdsae.data.shards import read_shard, read_shard_bytes

DEFAULT_BUFFER = 512               # samples in the shuffle buffer
FETCH_AHEAD = 2                    # shards fetched while the current one is decoded


def _mix(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (no Python hash randomisation)."""
    out = 0
    for p in parts:
        out = (out * 1_000_003 + int(p) + 7_919) % (2**63 - 1)
    return out


def split_bytes(manifest: dict, split: str) -> int:
    """The bytes of `split`'s features held as float32 tensors (N x frames x mel bins)."""
    n = int(manifest["splits"][split]["num_samples"])
    mels = int(manifest.get("feature_params", {}).get("n_mels", 80))
    return n * int(manifest.get("num_frames", 0)) * mels * 4


class StreamSplit:
    """One split of the dataset at `uri` (a folder or s3:// prefix), read shard by shard.

    len() is the split's number of clips (from the manifest); `instruments` the manifest's
    instrument names. `held_out`: the sample keys of the dataset's other splits (key -> where,
    e.g. "the val split"); a streamed clip with one of them, or with a key that an earlier shard
    of the same pass (a rank's pass over its shards while training; the whole split in
    `chunks`) holds, is a ShardError, as load_dataset's key check. Raises like
    tsdsae.data.load_dataset (StorageError, MissingSplitError) when opened, ShardError naming
    the shard when a shard is bad.
    """

    def __init__(self, uri: str | os.PathLike, split: str = "train",
                 endpoint_url: str | None = None, buffer: int = DEFAULT_BUFFER,
                 manifest: dict | None = None, held_out: dict[str, str] | None = None):
        self.uri = dataset_root(uri)
        self.split, self.endpoint_url, self.buffer = split, endpoint_url, max(1, int(buffer))
        self.manifest = manifest if manifest is not None else load_manifest(self.uri,
                                                                            endpoint_url)
        self.shards = shard_urls(self.uri, self.manifest, split, endpoint_url)
        self._entries = dict(self.shards)
        self.held_out = dict(held_out or {})
        self.instruments = tuple(self.manifest["instruments"])
        self.n = int(self.manifest["splits"][split]["num_samples"])

    def __len__(self) -> int:
        return self.n

    def rank_shards(self, seed: int, epoch: int, rank: int, world_size: int
                    ) -> list[tuple[str, dict]]:
        """This rank's shards for `epoch`, in reading order."""
        order = list(self.shards)
        random.Random(_mix(seed, epoch)).shuffle(order)
        if len(order) >= world_size:
            return order[rank::world_size]
        return order[rank % len(order):] + order[:rank % len(order)]

    def _read(self, source: Iterator[dict]) -> Iterator[dict]:
        """The pipeline's reading stage: {"url"} items (wds.SimpleShardList) -> the checked,
        decoded samples of each shard, in order. The bytes of the next FETCH_AHEAD shards are
        fetched on threads while one is checked and decoded (an object store's latency and
        per-connection rate, not the decoding, would otherwise set the pace)."""
        from concurrent.futures import ThreadPoolExecutor

        entries, seen = self._entries, dict(self.held_out)
        with ThreadPoolExecutor(FETCH_AHEAD, thread_name_prefix="tsdsae-fetch") as pool:
            fetching: list = []
            for item in source:
                url = item["url"]
                fetching.append((url, pool.submit(read_shard_bytes, url, self.endpoint_url,
                                                  int(entries[url]["size"]))))
                if len(fetching) > FETCH_AHEAD:
                    url, fetched = fetching.pop(0)
                    yield from self._checked(url, seen, fetched.result())
            for url, fetched in fetching:
                yield from self._checked(url, seen, fetched.result())

    def _checked(self, url: str, seen: dict[str, str], data: bytes | None = None
                 ) -> list[dict]:
        """The checked, decoded samples of the shard at `url` (from `data`, its bytes, when
        already fetched), their keys recorded in `seen` (key -> where): a key already there is
        a ShardError."""
        samples = read_shard(url, self._entries[url], self.manifest, self.endpoint_url,
                             data=data)
        for sample in samples:
            check_unique_key(sample["key"], url, seen)
        return samples

    def samples(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1
                ) -> Iterator[dict]:
        """This rank's decoded samples for `epoch`, shuffled, endlessly (pass after pass over
        its shards, each pass with its own shuffle seed)."""
        import webdataset as wds

        urls = [url for url, _ in self.rank_shards(seed, epoch, rank, world_size)]
        for n_pass in range(2**31):
            yield from wds.DataPipeline(
                wds.SimpleShardList(urls), self._read,
                wds.shuffle(self.buffer, initial=self.buffer,
                            seed=_mix(seed, epoch, rank, n_pass)))

    in_memory = False

    def batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1, prefetch: int = 2
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, int, None]]:
        """This rank's part of every global batch of `epoch`: (features (b, T, F), mask (b, T),
        b, the global batch's size, None: no clip indices), ceil(N / batch_size) of them on every
        rank (tsdsae.dataset.Split.batches's form). A part may be empty (b = 0, one stand-in
        clip) when the last global batch is shorter than world_size, as in memory. A background
        thread reads and decodes up to `prefetch` batches ahead while the caller trains (the
        same batches in the same order; its errors are raised here)."""
        parts = self._sample_parts(batch_size, seed, epoch, rank, world_size)
        if prefetch >= 1:
            parts = _read_ahead(parts, prefetch)
        try:
            for samples, count, size in parts:
                # Stacked here, on the caller's thread: torch ops on the reading thread would
                # start a second intra-op thread team beside the step's (measured: epochs 1.5x
                # slower than without the thread on 2 cores).
                split = samples_to_split(samples, self.instruments)
                yield split.features, split.mask, count, size, None
        finally:
            parts.close()

    def _sample_parts(self, batch_size: int, seed: int, epoch: int, rank: int,
                      world_size: int) -> Iterator[tuple[list[dict], int, int]]:
        """(this rank's decoded samples of a global batch, its part's size b, the global
        batch's size) for every global batch of `epoch`; at least one sample (a stand-in when
        b = 0). Plain Python and numpy: no torch ops."""
        stream = self.samples(seed, epoch, rank, world_size)
        for start in range(0, self.n, batch_size):
            size = min(batch_size, self.n - start)
            count = size // world_size + (rank < size % world_size)   # tensor_split's parts
            yield [next(stream) for _ in range(max(count, 1))], count, size

    def chunks(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(features, mask, instrument) of every clip in manifest order, `size` at a time, one
        shard in memory at a time (tsdsae.dataset.Split.chunks's form)."""
        pending: list[dict] = []
        seen = dict(self.held_out)
        for url, _ in self.shards:
            pending += self._checked(url, seen)
            while len(pending) >= size:
                split = samples_to_split(pending[:size], self.instruments)
                pending = pending[size:]
                yield split.features, split.mask, split.instrument
        if pending:
            split = samples_to_split(pending, self.instruments)
            yield split.features, split.mask, split.instrument

    def to(self, device) -> "StreamSplit":
        """The stream itself (its batches are moved to the device by the trainer)."""
        return self


def _read_ahead(items: Iterator, depth: int) -> Iterator:
    """The items of `items`, produced by a background thread up to `depth` ahead (same items,
    same order; an exception of the producer is raised here, and closing this generator stops
    the thread)."""
    import queue
    import threading

    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            ready.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="tsdsae-stream")
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


__all__ = ["StreamSplit", "split_bytes", "DEFAULT_BUFFER"]
