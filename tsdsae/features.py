"""The log-mel front end: the one definition of what a feature is (METHOD s1).

audio (mono, 16 kHz, peak normalised) -> power mel spectrogram (n_fft 2048, hop 256, Hann 2048,
center=True with reflect padding, 80 HTK mels in 0..8000 Hz, no norm) -> natural log(x + 2.22e-16).
A 4 s clip (64,000 samples) gives T = 251 frames of F = 80 bins. No mean/variance normalisation.

Used by data_prep (shards), the toy dataset, inference and the swap CLI alike.
"""
from __future__ import annotations

import functools

import torch
import torchaudio

SAMPLE_RATE = 16_000
N_FFT = 2048
HOP = 256
N_MELS = 80
F_MIN = 0.0
F_MAX = 8000.0
LOG_EPS = 2.22e-16
CLIP_SECONDS = 4.0
CLIP_SAMPLES = int(SAMPLE_RATE * CLIP_SECONDS)

FEATURE_PARAMS = {
    "sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "win_length": N_FFT, "hop_length": HOP,
    "window": "hann", "center": True, "pad_mode": "reflect", "n_mels": N_MELS, "f_min": F_MIN,
    "f_max": F_MAX, "mel_scale": "htk", "norm": None, "power": 2.0, "log": "ln(x + 2.22e-16)",
}


def num_frames(num_samples: int) -> int:
    """Frames produced for a clip of `num_samples` (center=True): 1 + n // hop."""
    return 1 + num_samples // HOP


# Entries of FEATURE_PARAMS that are not torchaudio.transforms.MelSpectrogram arguments: the
# window by name (the transform takes a function) and the log applied after it (log_mel).
_WINDOWS = {"hann": torch.hann_window}
_NOT_TRANSFORM_ARGS = ("window", "log")


def mel_spectrogram(params: dict = FEATURE_PARAMS) -> torchaudio.transforms.MelSpectrogram:
    """The power mel spectrogram transform of a FEATURE_PARAMS-style dict (audio (..., S) ->
    (..., n_mels, T)): every entry but `window` and `log` is passed to torchaudio as it is, so
    the recorded parameters and the transform cannot drift apart. KeyError for an unknown
    window name."""
    args = {k: v for k, v in params.items() if k not in _NOT_TRANSFORM_ARGS}
    return torchaudio.transforms.MelSpectrogram(window_fn=_WINDOWS[params["window"]], **args)


@functools.lru_cache(maxsize=4)
def _mel(device: str) -> torchaudio.transforms.MelSpectrogram:
    return mel_spectrogram().to(device)


def peak_normalise(audio: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Divide each clip (last axis) by its max |a|. Silent clips stay zero (no NaN)."""
    peak = audio.abs().amax(dim=-1, keepdim=True)
    return audio / peak.clamp_min(eps)


@torch.no_grad()
def log_mel(audio: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Log-mel features of mono 16 kHz audio.

    audio: (N,) or (B, N) float. Returns float32 (T, 80) or (B, T, 80). Computed in batches of
    `batch_size` clips so a whole split is one vectorised pass, not a per-clip loop.
    """
    squeeze = audio.dim() == 1
    if squeeze:
        audio = audio[None]
    audio = audio.float()
    mel = _mel(str(audio.device))
    out = []
    for start in range(0, audio.shape[0], batch_size):
        spec = mel(audio[start:start + batch_size])          # (b, F, T)
        out.append(torch.log(spec + LOG_EPS).transpose(1, 2).contiguous())  # (b, T, F)
    feats = torch.cat(out).float()
    return feats[0] if squeeze else feats


@functools.lru_cache(maxsize=2)
def _inverse_mel(device: str):
    p = FEATURE_PARAMS
    return torchaudio.transforms.InverseMelScale(
        n_stft=p["n_fft"] // 2 + 1, n_mels=p["n_mels"], sample_rate=p["sample_rate"],
        f_min=p["f_min"], f_max=p["f_max"], norm=p["norm"], mel_scale=p["mel_scale"]).to(device)


GRIFFIN_LIM_MOMENTUM = 0.99        # torchaudio's default (fast Griffin-Lim)


@torch.no_grad()
def griffin_lim(magnitude: torch.Tensor, n_iter: int = 32,
                momentum: float = GRIFFIN_LIM_MOMENTUM) -> torch.Tensor:
    """Fast Griffin-Lim: magnitude STFT (B, n_fft/2+1, T) -> audio (B, (T - 1) * hop).

    The algorithm and the draws of torchaudio.functional.griffinlim (random complex phase start
    from torch.rand, momentum m / (1 + m), n_fft 2048 / hop 256 / Hann, centred reflect-padded
    STFT), with the momentum step as one fused add and the phase normalisation
    angles / (|angles| + 1e-16) as torch.sgn: complex abs, division and the momentum's two
    passes dominate torchaudio's loop on CPU; this form is faster and equal to float32
    rounding (tests/test_features.py compares both).
    """
    p = FEATURE_PARAMS
    window = _WINDOWS[p["window"]](p["win_length"], device=magnitude.device)
    stft = dict(n_fft=p["n_fft"], hop_length=p["hop_length"], win_length=p["win_length"],
                window=window)
    m = momentum / (1 + momentum)
    angles = torch.rand(magnitude.shape, dtype=torch.complex64, device=magnitude.device)
    previous = None
    for _ in range(n_iter):
        inverse = torch.istft(magnitude * angles, **stft)
        rebuilt = torch.stft(inverse, center=True, pad_mode="reflect", normalized=False,
                             onesided=True, return_complex=True, **stft)
        angles = rebuilt if previous is None or not m else torch.add(rebuilt, previous,
                                                                      alpha=-m)
        # z / |z| (0 for z = 0); torchaudio's z / (|z| + 1e-16) differs only for |z| < 1e-9.
        angles = angles.sgn()
        previous = rebuilt
    return torch.istft(magnitude * angles, **stft)


@torch.no_grad()
def mel_to_audio(features: torch.Tensor, n_iter: int = 32) -> torch.Tensor:
    """Listening path (METHOD s1): exp -> inverse mel -> Griffin-Lim (n_fft 2048, hop 256).

    features: (T, 80) or (B, T, 80) log-mel. Returns peak-normalised audio (N,) or (B, N) with
    N = (T - 1) * 256 samples at 16 kHz.
    """
    squeeze = features.dim() == 2
    if squeeze:
        features = features[None]
    power_mel = torch.exp(features.float()).transpose(1, 2)           # (B, F, T)
    # exp(log(x + eps)) leaves eps in silent bins; remove it so silence inverts to silence.
    power_mel = (power_mel - LOG_EPS).clamp_min(0.0)
    spec = _inverse_mel(str(features.device))(power_mel)             # (B, n_fft/2+1, T)
    audio = griffin_lim(spec.pow(1 / FEATURE_PARAMS["power"]), n_iter)
    audio = peak_normalise(audio)
    return audio[0] if squeeze else audio
