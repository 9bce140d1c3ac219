"""A small synthetic music dataset made in numpy in seconds (no FluidSynth).

Each "instrument" is a harmonic spectrum (the global factor); each clip plays a random sequence of
notes (the local factor), by additive synthesis at 16 kHz, and goes through the real front end
(tsdsae.features). The result is the same `tsdsae.dataset.Dataset` the shard reader returns.
"""
from __future__ import annotations

import numpy as np
import torch

from tsdsae import features
from tsdsae.dataset import Dataset, Split, pad_stack

# Harmonic amplitude profiles a_k (k = 1..K), chosen to be audibly and spectrally distinct.
INSTRUMENTS = {
    "saw": lambda k: 1.0 / k,                                   # bright, all harmonics
    "clarinet": lambda k: np.where(k % 2 == 1, 1.0 / k, 0.0),   # odd harmonics only
    "flute": lambda k: np.exp(-1.2 * (k - 1)),                  # nearly a sine
    "brass": lambda k: np.exp(-0.5 * ((k - 4.0) / 1.5) ** 2),   # a formant around the 4th
}
PITCH_RANGE = (55, 79)  # MIDI G3 .. G5


def midi_to_hz(pitch: np.ndarray | float) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(pitch, dtype=np.float64) - 69.0) / 12.0)


def synthesise(pitches: np.ndarray, instrument: str, seconds: float,
               sr: int = features.SAMPLE_RATE) -> np.ndarray:
    """Additive synthesis of equal-length notes with short attack/release ramps -> (S,) float32."""
    n = int(round(seconds * sr))
    per_note = n // len(pitches)
    t = np.arange(per_note) / sr
    ramp = np.minimum(1.0, np.minimum(t / 0.01, (per_note / sr - t) / 0.02))
    profile = INSTRUMENTS[instrument]
    out = np.zeros(n, dtype=np.float64)
    for i, f0 in enumerate(midi_to_hz(pitches)):
        k = np.arange(1, int((sr / 2 - 200) // f0) + 1)
        amps = profile(k.astype(np.float64))
        note = (amps[:, None] * np.sin(2 * np.pi * f0 * k[:, None] * t[None, :])).sum(0)
        out[i * per_note:(i + 1) * per_note] = note * ramp
    return out.astype(np.float32)


def make_toy_dataset(n_clips: int = 512, seconds: float = 1.0, n_instruments: int = 2,
                     notes_per_clip: int = 8, seed: int = 0, variable_length: bool = False,
                     fractions=(0.7, 0.15, 0.15)) -> Dataset:
    """n_clips clips split stratified into train/val/test.

    With `variable_length`, clip i keeps only a random 50-100 % prefix (tests masks).
    """
    if not 2 <= n_instruments <= len(INSTRUMENTS):
        raise ValueError(f"n_instruments={n_instruments} must be in 2..{len(INSTRUMENTS)}")
    rng = np.random.default_rng(seed)
    names = tuple(list(INSTRUMENTS)[:n_instruments])
    labels = np.arange(n_clips) % n_instruments
    pitches = rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1, size=(n_clips, notes_per_clip))
    audio = np.stack([synthesise(pitches[i], names[labels[i]], seconds) for i in range(n_clips)])
    audio_t = features.peak_normalise(torch.from_numpy(audio))
    feats = features.log_mel(audio_t)                                   # (N, T, F)
    t_full = feats.shape[1]
    lengths = np.full(n_clips, t_full)
    if variable_length:
        lengths = rng.integers(t_full // 2, t_full + 1, size=n_clips)
    frame_time = np.arange(t_full) * features.HOP / features.SAMPLE_RATE
    note_idx = np.minimum((frame_time / (seconds / notes_per_clip)).astype(int), notes_per_clip - 1)
    seqs, notes = [], []
    for i in range(n_clips):
        seqs.append(feats[i, :lengths[i]])
        notes.append(torch.from_numpy(pitches[i][note_idx[:lengths[i]]]).long())
    feats_p, mask = pad_stack(seqs)
    notes_p, _ = pad_stack(notes, pad_value=-1)
    keys = [f"toy-{i:05d}" for i in range(n_clips)]

    # stratified split: shuffle each instrument's clips, cut by the fractions
    split_idx: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in range(n_instruments):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        split_idx["train"] += idx[:n_train].tolist()
        split_idx["val"] += idx[n_train:n_train + n_val].tolist()
        split_idx["test"] += idx[n_train + n_val:].tolist()
    full = Split(feats_p, mask, torch.from_numpy(labels).long(), notes_p, keys, names, audio_t)
    splits = {name: full.subset(torch.tensor(sorted(ix))) for name, ix in split_idx.items() if ix}
    meta = {"kind": "toy", "n_clips": n_clips, "seconds": seconds, "seed": seed,
            "instruments": list(names), "variable_length": variable_length}
    return Dataset(splits, name=f"toy{n_instruments}-{n_clips}-s{seed}", meta=meta)
