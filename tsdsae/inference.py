"""Using a trained checkpoint: read clips, encode, decode, swap, listen.

    from tsdsae import inference
    m = inference.load("runs/toy-ts/best.pt")
    a = inference.read_clip("violin.wav")                 # any rate / channels / length
    b = inference.read_clip("data/dm#val/<key>")          # or a sample of a prepared dataset
    enc = m.encode(a)                                     # Encoding: v (1, V), z (1, T, Z)
    feats = m.swap_global(a, b)                           # decode(z_a, v_b): (1, T, 80) log-mel
    audio = m.to_audio(feats)                             # (1, N) at 16 kHz (Griffin-Lim)

Shapes: audio (S,) or (B, S) float at `sample_rate` Hz; log-mel features (T, 80) or (B, T, 80)
(tsdsae.features); mask (B, T) bool, True on frames that hold real audio; v (B, V); z (B, T, Z).
Every method takes features, audio (with `sample_rate=`), a `Clip`, a list of Clips, or a file
path / dataset spec (read with `read_clip` at its defaults).

A clip is prepared the way the training data was (METHOD s1, tsdsae.audio): DC removed,
downmixed to mono, resampled to 16 kHz, cropped or zero-padded to 4 s by default, refused when
too quiet to use (tsdsae.audio.QUIET_DBFS), peak normalised. Padding frames are masked out:
they do not enter the pooled v, and decoded outputs are silent there.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from tsdsae import audio as shared_audio
from tsdsae import features
from tsdsae.model.dsae import DSAE

DEFAULT_SECONDS = features.CLIP_SECONDS


class AudioError(ValueError):
    """An input clip that cannot be used (unreadable, empty, silent, NaN); names the source."""


@dataclasses.dataclass
class Clip:
    """One prepared clip: audio (S,) float32 mono 16 kHz peak-normalised, of which the first
    `valid_samples` are real audio (the rest is padding). `name` says where it came from."""

    audio: torch.Tensor
    valid_samples: int
    name: str

    @property
    def features(self) -> torch.Tensor:
        """(T, 80) log-mel, T = 1 + S // 256; padding frames are zero, as in the datasets."""
        feats = features.log_mel(self.audio)
        return feats * self.mask[:, None]

    @property
    def mask(self) -> torch.Tensor:
        """(T,) bool: frames whose centre lies in the real audio (all of them when unpadded)."""
        n = self.audio.shape[-1]
        t = torch.arange(features.num_frames(n))
        if self.valid_samples >= n:
            return torch.ones_like(t, dtype=torch.bool)
        return t * features.HOP < self.valid_samples

    @property
    def seconds(self) -> float:
        return self.audio.shape[-1] / features.SAMPLE_RATE


@dataclasses.dataclass
class Encoding:
    """Posterior means of one batch: v (B, V), z (B, T, Z), mask (B, T) bool."""

    v: torch.Tensor
    z: torch.Tensor
    mask: torch.Tensor


# --- reading and preparing clips ---------------------------------------------------------------


def read_audio_file(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode an audio file with soundfile -> (float32 (C, S), sample rate in Hz).

    Raises FileNotFoundError for a missing path and AudioError for anything soundfile cannot
    decode or that holds no samples; both messages name the file.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        what = "is a folder, not an audio file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{path} {what}; give a WAV/FLAC/OGG/MP3 file or a dataset "
                                "sample as DATASET_URI#SPLIT/KEY")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)     # (S, C)
    except Exception as exc:                          # noqa: BLE001 - any libsndfile failure
        raise AudioError(f"{path} is not readable audio ({type(exc).__name__}: {exc}); convert it "
                         "to WAV or FLAC (e.g. with ffmpeg) and try again") from None
    if data.size == 0:
        raise AudioError(f"{path} holds no audio samples (an empty file); record or export it "
                         "again")
    return np.ascontiguousarray(data.T), int(sr)


def prepare_audio(audio, sample_rate: int, seconds: float | None = DEFAULT_SECONDS,
                  offset: float = 0.0, name: str = "audio", condition: bool = True) -> Clip:
    """Make one clip model-ready: mono, 16 kHz, `seconds` long, peak normalised.

    audio: (S,) mono or (C, S) channels-first, numpy or torch, any float/int dtype, at
    `sample_rate` Hz. tsdsae.audio.condition removes DC, downmixes (the louder channel when the
    channels cancel, with a warning naming `name`) and resamples with a bounded filter, the way
    the training data was prepared. The clip starts `offset` s in; it is cropped or zero-padded
    to `seconds` (None keeps its length). condition=False skips tsdsae.audio.condition, for
    mono 16 kHz audio that data prep already conditioned (a dataset sample), so its features
    equal the stored ones. Raises AudioError (naming `name`) for NaN/inf samples, no samples, or
    audio too quiet to use (tsdsae.audio.too_quiet: peak below QUIET_DBFS).
    """
    x = audio.detach().cpu().numpy() if torch.is_tensor(audio) else np.asarray(audio)
    if x.ndim not in (1, 2):
        raise AudioError(f"{name}: audio must be (S,) or (C, S), got shape {tuple(x.shape)}")
    if np.issubdtype(x.dtype, np.integer):
        x = x / float(np.iinfo(x.dtype).max + 1)
    x = x.astype(np.float32)
    if x.size == 0:
        raise AudioError(f"{name} holds no audio samples")
    if not np.isfinite(x).all():
        raise AudioError(f"{name} holds NaN or infinite samples; repair or re-export the file")
    if sample_rate <= 0:
        raise AudioError(f"{name}: sample rate {sample_rate} Hz is not positive")
    if condition:
        conditioned = shared_audio.condition(x, int(sample_rate), features.SAMPLE_RATE)
        if conditioned.channel is not None:
            warnings.warn(f"{name}: its channels cancel when averaged (one is nearly the inverse "
                          f"of another); using channel {conditioned.channel} alone", stacklevel=2)
        x = conditioned.audio
    elif x.ndim != 1 or sample_rate != features.SAMPLE_RATE:
        raise AudioError(f"{name}: condition=False needs mono audio at {features.SAMPLE_RATE} Hz, "
                         f"got shape {x.shape} at {sample_rate} Hz")
    x = torch.from_numpy(np.ascontiguousarray(x))
    start = int(round(offset * features.SAMPLE_RATE))
    if offset < 0 or start >= x.numel():
        raise AudioError(f"{name}: offset {offset} s is outside the clip "
                         f"({x.numel() / features.SAMPLE_RATE:.2f} s long)")
    x = x[start:]
    valid = x.numel()
    if seconds is not None:
        if seconds <= 0:
            raise ValueError(f"seconds={seconds} must be > 0 (or None to keep the length)")
        n = int(round(seconds * features.SAMPLE_RATE))
        valid = min(valid, n)
        x = torch.nn.functional.pad(x[:n], (0, n - valid))
    if x.numel() < features.N_FFT // 2 + 1:
        # reflect padding of the STFT needs at least half a window
        raise AudioError(f"{name} is too short ({x.numel()} samples at 16 kHz); give at least "
                         f"{(features.N_FFT // 2 + 1) / features.SAMPLE_RATE * 1000:.0f} ms")
    used = x[:valid].numpy()
    if shared_audio.too_quiet(used):
        where = f" from {offset} s" if offset else ""
        span = f"the {seconds} s used{where}" if seconds is not None else "the clip"
        raise AudioError(f"{name} is too quiet to use in {span} ({shared_audio.quiet_message(used)}"
                         "; peak normalisation would turn its noise into the clip); choose a "
                         "clip with sound in it (or another --offset)")
    return Clip(features.peak_normalise(x).contiguous(), valid, name)


def split_dataset_spec(spec: str) -> tuple[str, str | None, str] | None:
    """"URI#SPLIT/KEY" or "URI#KEY" -> (uri, split or None, key); None when not a dataset spec."""
    if "#" not in spec:
        return None
    uri, _, rest = spec.rpartition("#")
    split, _, key = rest.rpartition("/")
    if not uri or not key:
        return None
    return uri, (split or None), key


def read_dataset_clip(uri: str, key: str, split: str | None = None,
                      seconds: float | None = DEFAULT_SECONDS, offset: float = 0.0,
                      endpoint_url: str | None = None) -> Clip:
    """The source audio of sample `key` of a prepared dataset (local folder or s3:// URI).

    Reads the split's shards in order (all splits when `split` is None), one at a time, and stops
    at the key. KeyError names the dataset and where it looked (MissingSplitError, a KeyError,
    for a split the dataset lacks).
    """
    from tsdsae.data import iter_split_samples, load_manifest, split_names

    manifest = load_manifest(uri, endpoint_url)
    splits = [split] if split else split_names(manifest)
    for name in splits:
        for item in iter_split_samples(uri, name, endpoint_url=endpoint_url, with_audio=True):
            if item["key"] == key:
                # The stored clip is already conditioned: only crop/pad and normalise it.
                return prepare_audio(item["audio"], features.SAMPLE_RATE, seconds, offset,
                                     name=f"{uri}#{name}/{key}", condition=False)
    raise KeyError(f"no sample {key!r} in split(s) {splits} of dataset {uri}; sample keys are "
                   "listed in the shards (e.g. `tar tf <shard>.tar`)")


def read_clip(spec: str | os.PathLike, seconds: float | None = DEFAULT_SECONDS,
              offset: float = 0.0, key: str | None = None,
              endpoint_url: str | None = None) -> Clip:
    """A clip from an audio file path, or from a dataset as "URI#SPLIT/KEY" / "URI#KEY", or
    from `spec` = dataset URI with `key` = "SPLIT/KEY" or "KEY". See `prepare_audio`."""
    spec = str(spec)
    if key is not None:
        split, _, k = key.rpartition("/")
        return read_dataset_clip(spec, k, split or None, seconds, offset, endpoint_url)
    if not Path(spec).exists():                     # a file name may itself contain '#'
        parts = split_dataset_spec(spec)
        if parts is not None:
            uri, split, k = parts
            return read_dataset_clip(uri, k, split, seconds, offset, endpoint_url)
    audio, sr = read_audio_file(spec)
    return prepare_audio(audio, sr, seconds, offset, name=spec)


def write_wav(path: str | os.PathLike, audio: torch.Tensor | np.ndarray,
              sample_rate: int = features.SAMPLE_RATE) -> Path:
    """Write mono audio (S,) as 16-bit PCM WAV (values clipped to [-1, 1]). Returns the path."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = audio.detach().cpu().numpy() if torch.is_tensor(audio) else np.asarray(audio)
    sf.write(str(path), np.clip(data.astype(np.float32), -1.0, 1.0), sample_rate,
             subtype="PCM_16")
    return path


# --- the model ------------------------------------------------------------------------------------

Input = Union[torch.Tensor, np.ndarray, Clip, Sequence[Clip], str, os.PathLike]


class InferenceModel:
    """A trained DSAE in eval mode with audio-aware probes (posterior means throughout).

    Build with `load(checkpoint)`. `config` is the run's RunConfig, `model` the DSAE.
    """

    def __init__(self, model: DSAE, config=None, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = config

    # inputs -> (features (B, T, F), mask (B, T))
    def features(self, x: Input, mask: torch.Tensor | None = None,
                 sample_rate: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch any accepted input into (features (B, T, F), mask (B, T)) on the model device.

        Audio tensors (given `sample_rate`) are prepared clip by clip (prepare_audio without
        cropping); feature tensors are used as they are, with an all-true mask by default.
        """
        if isinstance(x, (str, os.PathLike)):
            x = read_clip(x)
        if isinstance(x, Clip):
            x = [x]
        if isinstance(x, (list, tuple)):
            if not x or not all(isinstance(c, Clip) for c in x):
                raise TypeError("a list input must hold tsdsae.inference.Clip objects")
            lengths = {c.audio.shape[-1] for c in x}
            if len(lengths) > 1:
                raise ValueError(f"clips of different lengths {sorted(lengths)} samples cannot "
                                 "share a batch; read them with the same `seconds`")
            feats = torch.stack([c.features for c in x])
            mask = torch.stack([c.mask for c in x])
            return feats.to(self.device), mask.to(self.device)
        t = torch.as_tensor(x).float()
        if sample_rate is not None:
            audio = t if t.dim() == 2 else t[None]
            clips = [prepare_audio(a, sample_rate, seconds=None, name=f"audio[{i}]")
                     for i, a in enumerate(audio)]
            return self.features(clips)
        f = self.model.cfg.input_dim
        if t.dim() not in (2, 3) or t.shape[-1] != f:
            raise ValueError(
                f"expected log-mel features (T, {f}) or (B, T, {f}), got shape {tuple(t.shape)}; "
                "for audio pass sample_rate=<Hz>")
        feats = t if t.dim() == 3 else t[None]
        if mask is None:
            mask = torch.ones(feats.shape[:2], dtype=torch.bool)
        mask = torch.as_tensor(mask, dtype=torch.bool)
        mask = mask if mask.dim() == 2 else mask[None]
        if mask.shape != feats.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match features "
                             f"{tuple(feats.shape)} (expected (B, T))")
        return feats.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode(self, x: Input, mask: torch.Tensor | None = None, *,
               sample_rate: int | None = None) -> Encoding:
        """Posterior means: v (B, V) from q(v | x), z (B, T, Z) from q(z | x)."""
        feats, mask = self.features(x, mask, sample_rate)
        v, z = self.model.encode_means(feats, mask)
        return Encoding(v, z, mask)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Mean of p(x | z, v) as log-mel (B, T, F): z (B, T, Z) or (T, Z), v (B, V) or (V,).

        A single v (B = 1) is broadcast over a batch of z. Masked frames come out as silence
        (log of the front end's epsilon), so they invert to silent audio.
        """
        z = z[None] if z.dim() == 2 else z
        v = v[None] if v.dim() == 1 else v
        z, v = z.to(self.device), v.to(self.device)
        if v.shape[0] == 1 and z.shape[0] > 1:
            v = v.expand(z.shape[0], -1)
        if v.shape[0] != z.shape[0]:
            raise ValueError(f"batch sizes differ: z {tuple(z.shape)}, v {tuple(v.shape)}")
        if mask is None:
            mask = torch.ones(z.shape[:2], dtype=torch.bool, device=self.device)
        mask = torch.as_tensor(mask, dtype=torch.bool).to(self.device)
        mask = mask[None] if mask.dim() == 1 else mask
        out = self.model.decode(z, v, mask)
        return out.masked_fill(~mask[..., None], float(np.log(features.LOG_EPS)))

    def reconstruct(self, x: Input, mask: torch.Tensor | None = None, *,
                    sample_rate: int | None = None) -> torch.Tensor:
        """decode(z_x, v_x): (B, T, F)."""
        enc = self.encode(x, mask, sample_rate=sample_rate)
        return self.decode(enc.z, enc.v, enc.mask)

    def swap_global(self, x_a: Input, x_b: Input, *, mask_a: torch.Tensor | None = None,
                    mask_b: torch.Tensor | None = None, sample_rate: int | None = None
                    ) -> torch.Tensor:
        """decode(z_a, v_b): a's melody with b's global factor (timbre). (B, T_a, F)."""
        a = self.encode(x_a, mask_a, sample_rate=sample_rate)
        b = self.encode(x_b, mask_b, sample_rate=sample_rate)
        return self.decode(a.z, b.v, a.mask)

    def swap_local(self, x_a: Input, x_b: Input, *, mask_a: torch.Tensor | None = None,
                   mask_b: torch.Tensor | None = None, sample_rate: int | None = None
                   ) -> torch.Tensor:
        """decode(z_b, v_a): b's melody with a's global factor (timbre). (B, T_b, F)."""
        return self.swap_global(x_b, x_a, mask_a=mask_b, mask_b=mask_a, sample_rate=sample_rate)

    @staticmethod
    def to_audio(feats: torch.Tensor, n_iter: int = 32) -> torch.Tensor:
        """Log-mel (T, F) or (B, T, F) -> peak-normalised 16 kHz audio (N,) or (B, N),
        N = (T - 1) * 256, by inverse mel + Griffin-Lim (tsdsae.features.mel_to_audio)."""
        return features.mel_to_audio(feats.detach().cpu(), n_iter=n_iter)


def model_from_state(state: dict, source: str = "the checkpoint") -> tuple[DSAE, object]:
    """A DSAE (and its RunConfig) from a checkpoint dict (tsdsae.checkpoint format). Raises
    tsdsae.checkpoint.CheckpointError naming `source` when the weights do not fit the config."""
    from tsdsae.checkpoint import restore_model
    from tsdsae.config import from_flat

    cfg = from_flat(state["config"])
    model = DSAE(cfg.model)
    restore_model(model, state, source)
    return model, cfg


def load(checkpoint: str | os.PathLike, device: str | torch.device = "cpu",
         endpoint_url: str | None = None) -> InferenceModel:
    """An InferenceModel from a checkpoint path or s3:// URI (loaded with weights_only)."""
    from tsdsae import checkpoint as ckpt

    model, cfg = model_from_state(ckpt.load(str(checkpoint), endpoint_url=endpoint_url),
                                  str(checkpoint))
    return InferenceModel(model, cfg, device)
