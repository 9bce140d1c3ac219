"""The in-memory dataset form shared by the toy generator and the shard reader.

Whatever produced the data (tsdsae.toy, or shards written by data_prep and read by tsdsae.data),
the trainer and the evaluation see the same thing: one `Split` of padded tensors per split name.
This module imports torch only.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch


class MissingSplitError(KeyError, ValueError):
    """A dataset has no split of that name. One-line message: the dataset, the missing split,
    the splits it has, and `fix` (what to do) when given. A KeyError (a missing name) and a
    ValueError (a bad setting) alike, so either kind of handler reports it."""

    def __init__(self, dataset: str, split: str, available, fix: str | None = None):
        self.dataset, self.split, self.available = dataset, split, sorted(available)
        have = ", ".join(self.available) or "none"
        self.message = f"dataset {dataset} has no {split!r} split (it has {have})"
        if fix:
            self.message += f"; {fix}"
        super().__init__(self.message)

    def __str__(self) -> str:                      # KeyError would quote the message
        return self.message


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch's draws on one rank (batch order, sampling noise)."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63 - 1)


def batch_parts(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1) -> list[tuple[torch.Tensor, int]]:
    """This rank's part of every global batch of one epoch, with the global batch's size.

    The epoch's order is a permutation of n clips drawn from (seed, epoch): reshuffled every
    epoch, the same for every rank. Each global batch of `batch_size` (the last one may be
    short) is cut into `world_size` contiguous parts, so results do not depend on the number of
    workers. A part may be empty (a last batch shorter than world_size).
    """
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=g)
    return [(batch.tensor_split(world_size)[rank], len(batch))
            for batch in order.split(batch_size)]


@dataclasses.dataclass
class Split:
    """One split of a dataset, padded to a common length T.

    features:   (N, T, F) float32 log-mel frames (padding frames are zero).
    mask:       (N, T) bool, True on valid frames.
    instrument: (N,) int64 global label, an index into `instruments`.
    notes:      (N, T) int64 local ground truth per frame: MIDI pitch, -1 on rests and padding.
    keys:       N sample keys (shard sample keys, or toy-NNNNN).
    audio:      optional (N, S) float32 16 kHz source audio (for listening and pitch metrics).
    """

    features: torch.Tensor
    mask: torch.Tensor
    instrument: torch.Tensor
    notes: torch.Tensor
    keys: list[str]
    instruments: tuple[str, ...]
    audio: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, t, _ = self.features.shape
        if self.mask.shape != (n, t) or self.notes.shape != (n, t) or self.instrument.shape != (n,):
            raise ValueError(
                f"inconsistent split shapes: features {tuple(self.features.shape)}, mask "
                f"{tuple(self.mask.shape)}, notes {tuple(self.notes.shape)}, instrument "
                f"{tuple(self.instrument.shape)}")
        if len(self.keys) != n:
            raise ValueError(f"{len(self.keys)} keys for {n} samples")

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def subset(self, index: torch.Tensor) -> "Split":
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(self.features[index], self.mask[index], self.instrument[index],
                     self.notes[index], [self.keys[i] for i in index.tolist()], self.instruments,
                     None if self.audio is None else self.audio[index])

    in_memory = True          # tsdsae.data.stream.StreamSplit: False

    def batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, int, torch.Tensor]]:
        """This rank's part of every global batch of `epoch` (batch_parts): (features (b, T, F),
        mask (b, T), b, the global batch's size, the clips' indices (b,)). An empty part (a last
        batch shorter than world_size) is one stand-in clip with b = 0: every rank still gets
        one entry per batch, which keeps the ranks' collective calls in step."""
        for idx, size in batch_parts(len(self), batch_size, seed, epoch, rank, world_size):
            count = len(idx)
            if count == 0:
                idx = torch.zeros(1, dtype=torch.long)
            idx = idx.to(self.features.device)
            yield self.features[idx], self.mask[idx], count, size, idx

    def chunks(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(features, mask, instrument) of consecutive clips, `size` at a time, in order."""
        for s in range(0, len(self), size):
            yield self.features[s:s + size], self.mask[s:s + size], self.instrument[s:s + size]

    def to(self, device: torch.device | str) -> "Split":
        """Move the tensors (not the audio) to `device`, e.g. the whole split into GPU memory."""
        return dataclasses.replace(
            self, features=self.features.to(device), mask=self.mask.to(device),
            instrument=self.instrument.to(device), notes=self.notes.to(device))


@dataclasses.dataclass
class Dataset:
    """Named splits ("train", "val", optionally "test") plus a description of where they came from."""

    splits: dict[str, Split]
    name: str
    meta: dict = dataclasses.field(default_factory=dict)

    def __getitem__(self, split: str) -> Split:
        if split not in self.splits:
            raise MissingSplitError(repr(self.name), split, self.splits)
        return self.splits[split]

    def __iter__(self) -> Iterator[str]:
        return iter(self.splits)


def pad_stack(seqs: list[torch.Tensor], pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length (T_i, ...) tensors into (N, T_max, ...) plus an (N, T_max) bool mask."""
    t_max = max(s.shape[0] for s in seqs)
    out = seqs[0].new_full((len(seqs), t_max, *seqs[0].shape[1:]), pad_value)
    mask = torch.zeros(len(seqs), t_max, dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, :s.shape[0]] = s
        mask[i, :s.shape[0]] = True
    return out, mask
