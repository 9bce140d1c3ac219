"""Audio in and out of data_prep: FluidSynth rendering, robust file loading, CREPE, featurising.

Every clip that reaches a shard goes through `featurise`: peak normalisation, int16 quantisation
(what the shard's FLAC holds) and tsdsae.features.log_mel of exactly that quantised audio, so the
stored audio and the stored features agree.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tsdsae import audio as shared_audio
from tsdsae import features

# The peak amplitude of the project's one "too quiet to use" level (tsdsae.audio.QUIET_DBFS).
SILENCE_PEAK = 10 ** (shared_audio.QUIET_DBFS / 20)

SOUNDFONT_ENV = "TSDSAE_SOUNDFONT"
# Debian's musescore-general-soundfont package; the .sf3 names are links to the Full/Lite file.
SOUNDFONT_CANDIDATES = (
    "/usr/share/sounds/sf3/MuseScore_General.sf3",
    "/usr/share/sounds/sf3/MuseScore_General_Full.sf3",
    "/usr/share/sounds/sf3/MuseScore_General_Lite.sf3",
    "/usr/share/sounds/sf2/MuseScore_General.sf2",
    "/usr/share/soundfonts/MuseScore_General.sf3",
    "/usr/share/soundfonts/MuseScore_General.sf2",
)
SOUNDFONT_SEARCH_DIRS = ("/usr/share/sounds", "/usr/share/soundfonts", "/usr/local/share/soundfonts")


class RenderError(RuntimeError):
    """FluidSynth or its soundfont is missing or failed; the message says what to install."""


class BadAudio(ValueError):
    """A file that cannot be used; `reason` is a short tag counted in the prep report."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# --- FluidSynth ----------------------------------------------------------------------------------


def find_soundfont(path: str | os.PathLike | None = None) -> Path:
    """The MuseScore General soundfont: `path`, else $TSDSAE_SOUNDFONT, else the Debian locations."""
    explicit = path or os.environ.get(SOUNDFONT_ENV)
    if explicit:
        found = Path(explicit).expanduser()
        if not found.is_file():
            raise RenderError(f"soundfont {found} does not exist; pass an existing .sf2/.sf3 file")
        return found.resolve()
    candidates = [Path(p) for p in SOUNDFONT_CANDIDATES]
    for root in map(Path, SOUNDFONT_SEARCH_DIRS):
        if root.is_dir():
            candidates += sorted(root.rglob("MuseScore_General*.sf[23]"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise RenderError("the MuseScore General soundfont was not found: install it with "
                      "`apt-get install musescore-general-soundfont`, or pass --soundfont PATH "
                      f"(or set {SOUNDFONT_ENV})")


def fluidsynth_binary() -> str:
    binary = shutil.which("fluidsynth")
    if binary is None:
        raise RenderError("fluidsynth was not found on PATH: install it with "
                          "`apt-get install fluidsynth`")
    return binary


@functools.lru_cache(maxsize=1)
def fluidsynth_version() -> str:
    out = subprocess.run([fluidsynth_binary(), "--version"], capture_output=True, text=True,
                         timeout=30)
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0] if first else "unknown"


@dataclasses.dataclass(frozen=True)
class Clip:
    """One clip to render: a General MIDI program and notes [(pitch, onset_s, duration_s), ...]
    or [(pitch, onset_s, duration_s, velocity), ...] (per-note dynamics; else `velocity`), and
    `modulation` (MIDI CC 1, 0-127: the soundfont's vibrato depth where its preset maps it)."""

    program: int
    notes: tuple[tuple, ...]
    velocity: int = 100
    modulation: int = 0


def clips_to_midi(clips: list[Clip], path: str | os.PathLike, slot_seconds: float) -> None:
    """Write all clips into one MIDI file, clip k in the slot starting at k * slot_seconds.

    One file per batch keeps FluidSynth's start-up (loading the soundfont) out of the per-clip
    cost. At the end of each slot every voice is cut (CC 120), so a release tail never leaks into
    the next clip.
    """
    import mido

    ticks_per_beat, tempo_us = 480, 500_000                  # 120 qpm: 960 ticks per second
    ticks_per_s = ticks_per_beat * 1_000_000 / tempo_us

    def tick(seconds: float) -> int:
        return int(round(seconds * ticks_per_s))

    events = []   # (tick, order, message): at equal ticks offs come before ons
    modulated = any(clip.modulation for clip in clips)
    for k, clip in enumerate(clips):
        base = k * slot_seconds
        events.append((tick(base), 0, mido.Message("program_change", program=clip.program)))
        if modulated:      # set on every clip of the file, so none inherits another's
            events.append((tick(base), 0, mido.Message("control_change", control=1,
                                                       value=int(clip.modulation))))
        for note in clip.notes:
            pitch, onset, duration = note[:3]
            velocity = int(note[3]) if len(note) > 3 else clip.velocity
            events.append((tick(base + onset), 2, mido.Message(
                "note_on", note=int(pitch), velocity=velocity)))
            events.append((tick(base + onset + duration), 1, mido.Message(
                "note_off", note=int(pitch), velocity=0)))
        events.append((tick(base + slot_seconds) - 1, 3,
                       mido.Message("control_change", control=120, value=0)))
    events.sort(key=lambda e: (e[0], e[1]))
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=tempo_us, time=0))
    now = 0
    for t, _, message in events:
        track.append(message.copy(time=t - now))
        now = t
    track.append(mido.MetaMessage("end_of_track", time=max(0, tick(len(clips) * slot_seconds) - now)))
    midi = mido.MidiFile(ticks_per_beat=ticks_per_beat)
    midi.tracks.append(track)
    midi.save(str(path))


def render_clips(clips: list[Clip], soundfont: str | os.PathLike | None = None,
                 gain: float = 0.5, slot_seconds: float = 6.0, reverb: bool = False,
                 clip_samples: int = features.CLIP_SAMPLES) -> np.ndarray:
    """Render clips with FluidSynth at 16 kHz -> float32 (N, clip_samples), mono, not normalised.

    Each clip is cropped (or zero-padded) to exactly clip_samples; the rest of its slot holds the
    release tail, which is discarded. Reverb and chorus are off by default so clips are dry and
    do not depend on their neighbours in the batch.
    """
    import soundfile as sf

    if slot_seconds * features.SAMPLE_RATE < clip_samples:
        raise ValueError(f"slot_seconds={slot_seconds} is shorter than a clip")
    binary, font = fluidsynth_binary(), find_soundfont(soundfont)
    slot = int(round(slot_seconds * features.SAMPLE_RATE))
    with tempfile.TemporaryDirectory(prefix="tsdsae-render-") as tmp:
        midi, wav = Path(tmp, "clips.mid"), Path(tmp, "clips.wav")
        clips_to_midi(clips, midi, slot_seconds)
        flag = "1" if reverb else "0"
        cmd = [binary, "-n", "-i", "-q", "-g", str(gain), "-r", str(features.SAMPLE_RATE),
               "-R", flag, "-C", flag, "-O", "float", "-T", "wav",
               # Decode only the samples the used programs need: a much faster start.
               "-o", "synth.dynamic-sample-loading=1", "-F", str(wav), str(font), str(midi)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if result.returncode != 0 or not wav.is_file():
            raise RenderError(f"fluidsynth failed (exit {result.returncode}) rendering "
                              f"{len(clips)} clips with {font}: {result.stderr.strip()[-500:]}")
        audio, sr = sf.read(wav, dtype="float32", always_2d=True)
    if sr != features.SAMPLE_RATE:
        raise RenderError(f"fluidsynth wrote {sr} Hz instead of {features.SAMPLE_RATE} Hz")
    mono = audio.mean(axis=1)
    need = (len(clips) - 1) * slot + clip_samples
    if len(mono) < need:
        mono = np.pad(mono, (0, need - len(mono)))
    starts = np.arange(len(clips)) * slot
    return np.stack([mono[s:s + clip_samples] for s in starts]).astype(np.float32)


# --- reading arbitrary audio files ----------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def soundfile_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) of the formats the installed soundfile names.

    Only used to tell "a broken audio file" from "not an audio file" in reports: files are
    accepted by what libsndfile can decode (their content), whatever their extension.
    """
    import soundfile as sf

    return frozenset("." + name.lower() for name in sf.available_formats())


@dataclasses.dataclass
class LoadedAudio:
    """A cleaned file: mono float32 at 16 kHz plus the fixes applied (report tags)."""

    audio: np.ndarray
    source_rate: int
    fixes: list[str]
    channels: int = 1


def load_audio_file(path: str | os.PathLike) -> LoadedAudio:
    """Read any file libsndfile decodes (any sample format, rate, channel count) -> mono 16 kHz.

    Nonfinite samples are replaced by 0, then tsdsae.audio.condition removes DC, downmixes
    (using the louder channel when the channels cancel) and resamples; `fixes` lists what was
    done. Raises BadAudio("unreadable" | "empty" | "too_quiet") otherwise; "too_quiet" is the
    project's one rule (tsdsae.audio.too_quiet, a peak below QUIET_DBFS).
    """
    import soundfile as sf

    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:                                   # noqa: BLE001 - any decoder error
        raise BadAudio("unreadable", f"{type(exc).__name__}: {exc}") from None
    fixes = []
    if audio.shape[0] == 0 or audio.shape[1] == 0:
        raise BadAudio("empty", "no samples")
    if not np.isfinite(audio).all():
        audio = np.where(np.isfinite(audio), audio, 0.0).astype(np.float32)
        fixes.append("nonfinite_replaced")
    conditioned = shared_audio.condition(audio.T, sr, features.SAMPLE_RATE)
    mono = conditioned.audio
    if mono.size == 0:
        raise BadAudio("empty", "no samples after resampling")
    if shared_audio.too_quiet(mono):
        raise BadAudio("too_quiet", shared_audio.quiet_message(mono))
    return LoadedAudio(mono, int(sr), fixes + conditioned.fixes, int(audio.shape[1]))


# --- CREPE ----------------------------------------------------------------------------------------

CREPE_HOP = 160   # 10 ms at 16 kHz
CREPE_FMIN, CREPE_FMAX = 50.0, 2000.0


@torch.no_grad()
def crepe_confidences(clips: Sequence[np.ndarray], model: str = "full", batch_size: int = 1024,
                      device: str | None = None, done=None) -> list[np.ndarray]:
    """Per-frame CREPE confidence of several mono 16 kHz clips, 10 ms hop, batched across clips.

    Returns one float32 array (1 + S // 160,) per clip: the largest pitch-bin activation between
    CREPE_FMIN and CREPE_FMAX (CREPE's voicing confidence). Frames of all clips share batches of
    `batch_size`, so many short clips cost as few network calls as one long one. Runs on
    `device` (default: the GPU when torch sees one, else the CPU). Uses torchcrepe's bundled
    weights ('tiny' or 'full'); nothing is downloaded. `done(seconds)`, when given, is called
    after each network call with the seconds of audio (10 ms frames) it covered.
    """
    import torchcrepe

    if model not in ("tiny", "full"):
        raise ValueError(f"crepe model must be 'tiny' or 'full', got {model!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lo = int(torchcrepe.convert.frequency_to_bins(torch.tensor(CREPE_FMIN)))
    hi = int(torchcrepe.convert.frequency_to_bins(torch.tensor(CREPE_FMAX), torch.ceil)) + 1
    parts: list[list[np.ndarray]] = [[] for _ in clips]
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        probs = torchcrepe.infer(torch.cat([f for _, f in pending]), model=model, device=device)
        conf = probs[:, lo:hi].amax(dim=1).cpu().numpy().astype(np.float32)
        if done is not None:
            done(len(conf) * CREPE_HOP / features.SAMPLE_RATE)
        start = 0
        for index, frames in pending:
            parts[index].append(conf[start:start + len(frames)])
            start += len(frames)
        pending.clear()

    waiting = 0
    for index, clip in enumerate(clips):
        x = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))[None]
        for frames in torchcrepe.preprocess(x, features.SAMPLE_RATE, CREPE_HOP, batch_size,
                                            device, pad=True):
            pending.append((index, frames))
            waiting += len(frames)
            if waiting >= batch_size:
                flush()
                waiting = 0
    flush()
    return [np.concatenate(p) if p else np.zeros(0, np.float32) for p in parts]


def crepe_confidence(audio: np.ndarray, model: str = "full", batch_size: int = 1024,
                     device: str | None = None) -> np.ndarray:
    """Per-frame CREPE confidence of one clip -> (1 + S // 160,) float32; see crepe_confidences."""
    return crepe_confidences([audio], model, batch_size, device)[0]


# --- clips to shard payloads ----------------------------------------------------------------------


def featurise_rendered(raw: np.ndarray, items: Sequence[dict], font) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """`featurise` of FluidSynth renders (N, S) of `items` (dicts with "key" and "program"),
    after refusing a silent one: RenderError naming the clip, its program and the soundfont."""
    peaks = np.abs(raw).max(axis=1)
    if (peaks < SILENCE_PEAK).any():
        bad = items[int(np.argmax(peaks < SILENCE_PEAK))]
        raise RenderError(f"{bad['key']} rendered as silence with program {bad['program']} "
                          f"from {font}; the soundfont may lack that General MIDI program")
    return featurise(raw)


def featurise(audio: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(N, S) float audio -> (int16 (N, S) peak-normalised PCM, float32 (N, T, 80) log-mel).

    Features are computed from the quantised audio (what the FLAC stores), batched over clips.
    Nonfinite input samples are zeroed first, so features are always finite.
    """
    audio = np.nan_to_num(np.asarray(audio, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    normalised = features.peak_normalise(torch.from_numpy(audio)).numpy()
    pcm = np.clip(np.round(normalised * 32767.0), -32768, 32767).astype(np.int16)
    feats = features.log_mel(torch.from_numpy(pcm.astype(np.float32) / 32768.0),
                             batch_size=batch_size).numpy()
    if not np.isfinite(feats).all():
        raise FloatingPointError("log-mel features are not finite")
    return pcm, feats.astype(np.float32)
