"""Audio conditioning shared by data preparation and inference: one definition of each step.

Every recording read from a file, by folder preparation (data_prep.folder) or as a model input
(tsdsae.inference.read_clip / prepare_audio), passes through `condition`, in this order
(rendered dMelodies clips are mono 16 kHz already and are only checked with `too_quiet`):

1. DC removal: each channel's mean is subtracted (an offset would otherwise take part of the
   peak that normalisation scales to full range).
2. Downmix to mono by averaging channels, with *cancellation detection*: when the average's RMS
   lies more than `CANCEL_DB` dB below the louder channel's RMS (e.g. one channel is the inverted
   other), the average holds little but what differs between channels, so the louder channel is
   used instead and `fixes` says so.
3. Resampling to 16 kHz with a polyphase filter (scipy.signal.resample_poly) whose cost is
   bounded whatever the source rate: the ratio 16000 / rate is replaced by the closest fraction
   up / down with a denominator up to 1,000 (10,000, then 100,000 when that one is not within
   `MAX_RATE_ERROR`: relative, under 0.2 cent of pitch, far below what the features resolve).
   For every integer rate from 1 kHz to 400 kHz, up and down stay at most 16,000, so the filter
   has at most about 20 * max(up, down) taps and costs about 20 * max(1, rate / 16000)
   multiply-adds per output sample, instead of growing with rate / gcd(rate, 16000).

"Too quiet to use" has one definition for the whole project (`too_quiet`): a peak level below
`QUIET_DBFS` dBFS after DC removal and downmix, where 0 dBFS is a sample of magnitude 1.0 (full
scale of float audio and of int16 PCM divided by 32768). Peak normalisation of such audio would
raise it by more than 60 dB, turning the quantisation noise and dither of the recording
(+-1 LSB of 16 bit = -90 dBFS) into the clip's content.

This module imports numpy and scipy only.
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np

SAMPLE_RATE = 16_000                  # Hz; equals tsdsae.features.SAMPLE_RATE

# Peak level (dBFS) below which audio is too quiet to use, for data prep and inference alike.
QUIET_DBFS = -60.0
# Downmix RMS this far (dB) below the louder channel's RMS means the channels cancel.
CANCEL_DB = -20.0
# First bound tried for the resampling ratio's denominator, and the largest relative rate error.
MAX_RATIO_DENOMINATOR = 1000
MAX_RATE_ERROR = 1e-4


def dbfs(amplitude: float) -> float:
    """20 log10(amplitude) in dBFS (1.0 = 0 dBFS); -inf for zero."""
    return 20.0 * math.log10(amplitude) if amplitude > 0 else -math.inf


def peak_dbfs(audio: np.ndarray) -> float:
    """Peak level of audio (any shape) in dBFS; -inf for digital silence or no samples."""
    a = np.asarray(audio)
    return dbfs(float(np.abs(a).max())) if a.size else -math.inf


def too_quiet(audio: np.ndarray) -> bool:
    """True when the peak of `audio` lies below QUIET_DBFS (the project's one silence rule)."""
    return peak_dbfs(audio) < QUIET_DBFS


def quiet_message(audio: np.ndarray) -> str:
    """'peak -90.3 dBFS, below the -60 dBFS floor' (or 'digital silence, ...') for messages."""
    level = peak_dbfs(audio)
    shown = "digital silence" if level == -math.inf else f"peak {level:.1f} dBFS"
    return f"{shown}, below the {QUIET_DBFS:.0f} dBFS floor"


def remove_dc(audio: np.ndarray) -> tuple[np.ndarray, float]:
    """Subtract the mean of each channel (last axis). audio (S,) or (C, S) float.

    Returns (audio without DC, float32; largest |offset| removed).
    """
    a = np.asarray(audio, dtype=np.float32)
    if a.shape[-1] == 0:
        return a, 0.0
    mean = a.mean(axis=-1, keepdims=True, dtype=np.float64)
    return (a - mean).astype(np.float32), float(np.abs(mean).max())


def _rms(a: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(np.square(a, dtype=np.float64), axis=-1))


def downmix(audio: np.ndarray) -> tuple[np.ndarray, int | None]:
    """(C, S) channels-first (or (S,) mono) -> ((S,) mono float32, channel used or None).

    The mean of the channels, unless they cancel (mean RMS more than CANCEL_DB below the louder
    channel's RMS): then the louder channel alone, whose index is returned.
    """
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim == 1:
        return a, None
    if a.ndim != 2:
        raise ValueError(f"audio must be (S,) or (C, S), got shape {a.shape}")
    mono = a.mean(axis=0)
    if a.shape[0] == 1:
        return mono, None
    channel_rms = _rms(a)
    louder = int(np.argmax(channel_rms))
    if channel_rms[louder] > 0 and float(_rms(mono)) < channel_rms[louder] * 10 ** (CANCEL_DB / 20):
        return np.ascontiguousarray(a[louder]), louder
    return mono, None


def resample_ratio(from_rate: int, to_rate: int = SAMPLE_RATE) -> tuple[int, int]:
    """(up, down) of the polyphase resampler: to_rate / from_rate within MAX_RATE_ERROR."""
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate} Hz")
    exact = Fraction(int(to_rate), int(from_rate))
    for bound in (MAX_RATIO_DENOMINATOR, 10 * MAX_RATIO_DENOMINATOR, 100 * MAX_RATIO_DENOMINATOR):
        ratio = exact.limit_denominator(bound)
        if abs(ratio / exact - 1) <= MAX_RATE_ERROR:
            break
    return ratio.numerator, ratio.denominator


def resample(audio: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono audio (S,) float from `from_rate` to `to_rate` Hz -> float32 (S',).

    Polyphase FIR (scipy.signal.resample_poly, Kaiser window) with the ratio from
    `resample_ratio`; time and memory are linear in S with a bounded filter, whatever the rates.
    """
    a = np.asarray(audio, dtype=np.float32)
    up, down = resample_ratio(from_rate, to_rate)
    if up == down or a.size == 0:
        return a
    from scipy.signal import resample_poly

    return resample_poly(a, up, down).astype(np.float32)


@dataclasses.dataclass
class Conditioned:
    """Mono float32 audio (S,) at `sample_rate` Hz, and the fixes applied (short report tags:
    "dc_removed", "downmixed", "channels_cancel_used_louder", "resampled")."""

    audio: np.ndarray
    sample_rate: int
    fixes: list[str]
    channel: int | None = None          # the channel used when the channels cancelled


def condition(audio: np.ndarray, sample_rate: int, to_rate: int = SAMPLE_RATE) -> Conditioned:
    """DC removal, downmix (with cancellation detection) and bounded resampling, in that order.

    audio: (S,) mono or (C, S) channels-first, finite float samples at `sample_rate` Hz.
    The quiet check is left to the caller (`too_quiet`), so it can name its own source.
    Raises ValueError for a non-positive rate or a bad shape.
    """
    a, offset = remove_dc(audio)
    fixes = ["dc_removed"] if offset > 10 ** (QUIET_DBFS / 20) else []
    if a.ndim == 2 and a.shape[0] > 1:
        fixes.append("downmixed")
    mono, channel = downmix(a)
    if channel is not None:
        fixes.append("channels_cancel_used_louder")
    if int(sample_rate) != to_rate:
        mono = resample(mono, int(sample_rate), to_rate)
        fixes.append("resampled")
    return Conditioned(np.ascontiguousarray(mono, dtype=np.float32), to_rate, fixes, channel)
