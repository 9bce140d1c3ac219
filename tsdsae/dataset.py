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
