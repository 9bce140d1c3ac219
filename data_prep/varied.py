"""Varied music for measuring what a budget does beyond dMelodies, written as shards.

    python -m data_prep.varied data/varied                      # 1,200 clips, 4 instruments
    python -m data_prep.varied data/varied6 --instrument piano --instrument violin ...

dMelodies is easy: one tonic, one tempo, fixed rhythms, a fixed dynamic. Each clip here is its
own random melody (a seeded draw per clip) of 4 s:
- tonic: any of the 12 pitch classes; scale: major, natural minor, dorian, mixolydian, harmonic
  minor or major pentatonic; register: a start between MIDI 55 and 67;
- tempo 90-140 bpm; note lengths of 1/2, 1, 3/2 or 2 beats, played from staccato (50 % of the
  length) to legato (100 %), with rests (12 % of the notes);
- pitch: a random walk over the scale's degrees (mostly steps, some leaps), kept within MIDI
  48-84;
- dynamics: a clip level (velocity 55-115) with per-note accents (+-12); vibrato (MIDI CC 1,
  depth 30-90) on a third of the clips; FluidSynth's reverb and chorus on another third.
Instruments (General MIDI programs of the MuseScore General soundfont, at least two; default
four families: piano, violin, clarinet, trumpet) take turns clip by clip and the split is
stratified by instrument. Every clip is its own recording, so no recording is in two splits.
The labels of a clip (tonic, scale, bpm, velocity, vibrato, reverb, notes, per-note
velocities) are in its .json.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from data_prep import audio as audio_mod
from data_prep.dmelodies import DEFAULT_FRACTIONS, add_render_options, parse_instruments
from data_prep.parallel import executor_from_args
from data_prep.shards import Sample, ShardTask, build_dataset, parse_fractions, stratified_split
from tsdsae import features
from tsdsae.cli import cli_main, exit_status
from tsdsae.storage import open_store

GENERATOR_VERSION = 1
DEFAULT_INSTRUMENTS = ("piano", "violin", "clarinet", "trumpet")
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10),
          "dorian": (0, 2, 3, 5, 7, 9, 10), "mixolydian": (0, 2, 4, 5, 7, 9, 10),
          "harmonic_minor": (0, 2, 3, 5, 7, 8, 11), "pentatonic": (0, 2, 4, 7, 9)}
BPM = (90.0, 140.0)
BEATS = (0.5, 1.0, 1.5, 2.0)               # note lengths in beats
BEAT_WEIGHTS = (0.35, 0.35, 0.15, 0.15)
PITCH_RANGE = (48, 84)
STEPS = (-4, -3, -2, -1, 0, 1, 2, 3, 4)    # scale degrees from one note to the next
STEP_WEIGHTS = (0.03, 0.07, 0.15, 0.22, 0.06, 0.22, 0.15, 0.07, 0.03)
REST_P = 0.12


def random_melody(rng: np.random.Generator, seconds: float = features.CLIP_SECONDS) -> dict:
    """One clip's melody: {"tonic", "scale", "bpm", "velocity", "vibrato", "reverb", "notes"}
    with notes [(MIDI pitch, onset s, duration s, velocity), ...] starting at 0 s and ending
    before `seconds`. Draws from `rng` only."""
    tonic = int(rng.integers(12))
    scale_name = list(SCALES)[int(rng.integers(len(SCALES)))]
    scale = SCALES[scale_name]
    bpm = float(rng.uniform(*BPM))
    beat = 60.0 / bpm
    level = int(rng.integers(55, 116))
    effect = int(rng.integers(3))              # 0 dry, 1 vibrato, 2 reverb
    vibrato = int(rng.integers(30, 91)) if effect == 1 else 0
    start = int(rng.integers(55, 68))
    # Degree index d -> MIDI pitch on the scale of `tonic`, near `start`.
    octave_base = start - ((start - tonic) % 12)

    def pitch_of(d: int) -> int:
        octave, k = divmod(d, len(scale))
        return octave_base + 12 * octave + scale[k]

    degree = next(d for d in range(2 * len(scale)) if pitch_of(d) >= start)   # the first note
    notes, t = [], 0.0
    while t < seconds - 0.25:
        length = float(rng.choice(BEATS, p=BEAT_WEIGHTS)) * beat
        if notes and rng.random() < REST_P:
            t += length
            continue
        pitch = pitch_of(degree)
        articulation = float(rng.uniform(0.5, 1.0))
        accent = int(np.clip(level + rng.integers(-12, 13), 1, 127))
        notes.append((pitch, round(t, 4), round(min(length * articulation, seconds - t), 4),
                      accent))
        t += length
        for _ in range(8):                     # a step that stays within the range
            step = int(rng.choice(STEPS, p=STEP_WEIGHTS))
            if PITCH_RANGE[0] <= pitch_of(degree + step) <= PITCH_RANGE[1]:
                degree += step
                break
    return {"tonic": tonic, "scale": scale_name, "bpm": round(bpm, 2), "velocity": level,
            "vibrato": vibrato, "reverb": effect == 2, "notes": notes}


def prepare_varied(output_uri: str, *, n_clips: int = 1200, seed: int = 0,
                   instruments: Sequence[str] = DEFAULT_INSTRUMENTS,
                   fractions: Sequence[float] = DEFAULT_FRACTIONS, samples_per_shard: int = 256,
                   soundfont: str | None = None, gain: float = 0.5, render_batch: int = 64,
                   workers: int = 2, endpoint_url: str | None = None, overwrite: bool = False,
                   progress: bool = True,
                   executor=None) -> str:
    """Generate, render and shard a varied dataset (module docstring); returns the manifest's
    location. Clip i plays melody i (seeded by `seed`) on instrument i mod len(instruments).
    Raises ValueError for fewer than two instruments or bad fractions, RenderError when
    FluidSynth fails or renders a clip silent."""
    programs = parse_instruments(instruments)
    if len(programs) < 2:
        raise ValueError("give at least two instruments (--instrument A --instrument B ...)")
    fracs = parse_fractions(fractions)
    font = audio_mod.find_soundfont(soundfont)
    audio_mod.fluidsynth_binary()
    params = {"n_clips": n_clips, "seed": seed, "instruments": programs, "fractions": fracs,
              "samples_per_shard": samples_per_shard, "soundfont": font.name,
              "soundfont_bytes": font.stat().st_size, "gain": gain,
              "generator_version": GENERATOR_VERSION}
    names = list(programs)

    def make_plan() -> dict:
        rng = np.random.default_rng(seed)
        items = []
        for i in range(n_clips):
            name = names[i % len(names)]
            melody = random_melody(rng)
            items.append({"key": f"var_{i:06d}_{name}", "instrument": name,
                          "program": programs[name], **melody})
        split_idx = stratified_split([it["instrument"] for it in items], fracs, seed)
        return {"instruments": names,
                "splits": {split: [items[i] for i in idx] for split, idx in split_idx.items()},
                "report": {"generated": n_clips}}

    def render(task: ShardTask) -> list[Sample]:
        raw = np.zeros((len(task.items), features.CLIP_SAMPLES), dtype=np.float32)
        for reverb in (False, True):           # FluidSynth's reverb is per call, not per clip
            idx = [k for k, it in enumerate(task.items) if bool(it["reverb"]) == reverb]
            for start in range(0, len(idx), render_batch):
                part = idx[start:start + render_batch]
                clips = [audio_mod.Clip(task.items[k]["program"],
                                        tuple(tuple(n) for n in task.items[k]["notes"]),
                                        modulation=task.items[k]["vibrato"]) for k in part]
                raw[part] = audio_mod.render_clips(clips, font, gain=gain, reverb=reverb)
        pcm, feats = audio_mod.featurise_rendered(raw, task.items, font)
        frames = feats.shape[1]
        samples = []
        for item, a, f in zip(task.items, pcm, feats):
            labels = {"source": "varied", "valid_frames": frames, **item,
                      "notes": [list(n[:3]) for n in item["notes"]],       # the reader's form
                      "velocities": [int(n[3]) for n in item["notes"]]}
            samples.append(Sample(item["key"], f, labels, a))
        return samples

    store = open_store(output_uri, endpoint_url)
    return build_dataset(store, name="varied", tool="data_prep.varied", params=params,
                         make_plan=make_plan, render=render, samples_per_shard=samples_per_shard,
                         workers=workers, overwrite=overwrite, progress=progress,
                         extra_versions={"fluidsynth": audio_mod.fluidsynth_version(),
                                         "soundfont": str(font)},
                         executor=executor)


@cli_main
def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.varied", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("output", help="output folder or s3://bucket/prefix")
    p.add_argument("--n-clips", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instrument", action="append", dest="instruments",
                   help="instrument name or name=GM_PROGRAM; repeat for several "
                        f"(default: {', '.join(DEFAULT_INSTRUMENTS)})")
    p.add_argument("--fractions", default=None,
                   help="train,val,test fractions (default: 4/6, 1/6, 1/6)")
    add_render_options(p, render_batch=64)
    args = p.parse_args(argv)
    with executor_from_args(args) as executor:
        manifest = prepare_varied(
            args.output, n_clips=args.n_clips, seed=args.seed,
            instruments=args.instruments or DEFAULT_INSTRUMENTS,
            fractions=(DEFAULT_FRACTIONS if args.fractions is None
                       else [float(f) for f in args.fractions.split(",")]),
            samples_per_shard=args.samples_per_shard, soundfont=args.soundfont, gain=args.gain,
            render_batch=args.render_batch, workers=args.workers,
            endpoint_url=args.endpoint_url, overwrite=args.overwrite, progress=args.progress,
            executor=executor)
    print(manifest)
    return manifest


if __name__ == "__main__":
    sys.exit(exit_status(main()))
