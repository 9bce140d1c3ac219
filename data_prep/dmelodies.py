"""dMelodies-style melodies rendered to audio (METHOD s1), written as shards.

    python -m data_prep.dmelodies data/dmelodies                 # the paper's configuration
    python -m data_prep.dmelodies s3://bucket/dmel --endpoint-url http://127.0.0.1:9000

A melody is two bars of 4/4: four arpeggiated chords I-IV-V-I of three notes each (12 notes).
Nine factors: tonic (12), octave (4, 5, 6), scale (major, harmonic minor, blues), the rhythm of
each bar (6 onsets among 8 eighths: 28 patterns) and the arpeggio direction of each chord (up /
down): 12 * 3 * 3 * 28 * 28 * 2^4 = 1,354,752 melodies. As in the original generator, each onset
eighth holds a note one eighth long and every other eighth is a rest (notes never reach the next
onset). The paper's configuration (the default) fixes C, octave 4, major and
keeps bar-1 rhythms that start on the first eighth and bar-2 rhythms with an onset on the last
eighth: 21 * 21 * 16 = 7,056 melodies; 3,600 of them, half violin, half trumpet, split
train 2,400 / val 600 / test 600. Train and val have the paper's sizes; the test split is held
out for reporting, so the checkpoint is chosen on val and scored on test (METHOD s5 warns against
the reference's use of val for both).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from typing import Iterable, Sequence

import numpy as np

from data_prep import audio as audio_mod
from data_prep.parallel import add_ray_options, executor_from_args
from data_prep.shards import (Sample, ShardTask, build_dataset, parse_fractions, sanitize_key,
                              stratified_split)
from tsdsae import features
from tsdsae.cli import cli_main, exit_status
from tsdsae.storage import open_store

TONICS = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
OCTAVES = (4, 5, 6)
# Semitones of scale degrees 0..8 (two octaves' worth reaches the V chord's 9th degree).
SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11, 12, 14),
    "minor": (0, 2, 3, 5, 7, 8, 11, 12, 14),      # harmonic minor
    "blues": (0, 2, 3, 5, 6, 9, 10, 12, 14),
}
# Scale degrees of the chords I, IV, V, I (root position triads), played in this order.
CHORDS = ((0, 2, 4), (3, 5, 7), (4, 6, 8), (0, 2, 4))
RHYTHMS = tuple(itertools.combinations(range(8), 6))       # onset eighths of one bar, 28 patterns
DIRECTIONS = ("up", "down")
# train / val / test: 2,400 / 600 / 600 of the default 3,600 clips (largest-remainder rounding
# per instrument in stratified_split makes the counts exact).
DEFAULT_FRACTIONS = (4 / 6, 1 / 6, 1 / 6)
FULL_SHAPE = (len(TONICS), len(OCTAVES), len(SCALES), len(RHYTHMS), len(RHYTHMS), 2, 2, 2, 2)

# General MIDI programs (0-based) for a few melodic instruments; any other: name=program.
# Identifies the melody rule in a dataset's parameters: 2 = notes one eighth long with rests on
# the other positions (the original generator); 1 (absent) = the earlier legato notes. A dataset
# made by another version is not reused (build_dataset names the differing parameter).
GENERATOR_VERSION = 2

GM_PROGRAMS = {"piano": 0, "violin": 40, "viola": 41, "cello": 42, "trumpet": 56,
               "trombone": 57, "horn": 60, "alto_sax": 65, "oboe": 68, "clarinet": 71,
               "flute": 73}


@dataclasses.dataclass(frozen=True)
class Melody:
    """One point of the factor space; rhythm_bar1/2 index RHYTHMS, arpeggio is 4 x up|down."""

    tonic: str
    octave: int
    scale: str
    rhythm_bar1: int
    rhythm_bar2: int
    arpeggio: tuple[str, str, str, str]

    def pitches(self) -> list[int]:
        """The 12 MIDI pitches in playing order (C4 = 60)."""
        root = 12 * (self.octave + 1) + TONICS.index(self.tonic)
        degrees = SCALES[self.scale]
        out = []
        for chord, direction in zip(CHORDS, self.arpeggio):
            for degree in (chord if direction == "up" else chord[::-1]):
                out.append(root + degrees[degree])
        return out

    def notes(self, qpm: float = 120.0,
              clip_seconds: float = features.CLIP_SECONDS) -> list[list[float]]:
        """[[pitch, onset_s, duration_s], ...] (seconds), 12 notes in playing order.

        METHOD s1 (the original generator's rule): within a bar of 8 eighth positions, each onset
        position holds a note one eighth long and each other position is an eighth rest; a note
        never extends to the next onset. Notes are cut at clip_seconds (only matters for
        qpm < 120, when the melody is longer than the clip).
        """
        eighth = 60.0 / qpm / 2.0
        pitches = iter(self.pitches())
        out = []
        for bar, rhythm in enumerate((RHYTHMS[self.rhythm_bar1], RHYTHMS[self.rhythm_bar2])):
            for onset in rhythm:
                start = (bar * 8 + onset) * eighth
                stop = min(start + eighth, clip_seconds)
                pitch = next(pitches)
                if start < clip_seconds:
                    out.append([pitch, round(start, 6), round(stop - start, 6)])
        return out

    @property
    def full_index(self) -> int:
        """Index in the unfiltered space (stable whatever the filters)."""
        idx = (TONICS.index(self.tonic), OCTAVES.index(self.octave), list(SCALES).index(self.scale),
               self.rhythm_bar1, self.rhythm_bar2, *(DIRECTIONS.index(d) for d in self.arpeggio))
        return int(np.ravel_multi_index(idx, FULL_SHAPE))

    def factors(self) -> dict:
        """The factor values, as stored in each sample's labels."""
        out = {"tonic": self.tonic, "octave": self.octave, "scale": self.scale,
               "rhythm_bar1": self.rhythm_bar1, "rhythm_bar2": self.rhythm_bar2,
               "rhythm_bar1_onsets": list(RHYTHMS[self.rhythm_bar1]),
               "rhythm_bar2_onsets": list(RHYTHMS[self.rhythm_bar2]),
               "melody_index": self.full_index}
        out.update({f"arp_chord{i + 1}": d for i, d in enumerate(self.arpeggio)})
        return out


@dataclasses.dataclass(frozen=True)
class FactorSpace:
    """The allowed values of each factor (after filters); melodies are enumerated mixed-radix."""

    tonics: tuple[str, ...] = TONICS
    octaves: tuple[int, ...] = OCTAVES
    scales: tuple[str, ...] = tuple(SCALES)
    rhythms_bar1: tuple[int, ...] = tuple(range(len(RHYTHMS)))
    rhythms_bar2: tuple[int, ...] = tuple(range(len(RHYTHMS)))

    @classmethod
    def filtered(cls, tonic: str | None = "C", octave: int | None = 4, scale: str | None = "major",
                 rhythm_filter: bool = True) -> "FactorSpace":
        """None leaves a factor free. rhythm_filter keeps bar-1 patterns starting on the first
        eighth and bar-2 patterns with an onset on the last eighth (the paper's filter)."""
        if tonic is not None and tonic not in TONICS:
            raise ValueError(f"tonic {tonic!r} must be one of {TONICS}")
        if octave is not None and octave not in OCTAVES:
            raise ValueError(f"octave {octave!r} must be one of {OCTAVES}")
        if scale is not None and scale not in SCALES:
            raise ValueError(f"scale {scale!r} must be one of {tuple(SCALES)}")
        all_rhythms = tuple(range(len(RHYTHMS)))
        return cls(
            tonics=TONICS if tonic is None else (tonic,),
            octaves=OCTAVES if octave is None else (int(octave),),
            scales=tuple(SCALES) if scale is None else (scale,),
            rhythms_bar1=tuple(i for i in all_rhythms if RHYTHMS[i][0] == 0) if rhythm_filter
            else all_rhythms,
            rhythms_bar2=tuple(i for i in all_rhythms if RHYTHMS[i][-1] == 7) if rhythm_filter
            else all_rhythms)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.tonics), len(self.octaves), len(self.scales), len(self.rhythms_bar1),
                len(self.rhythms_bar2), 2, 2, 2, 2)

    def __len__(self) -> int:
        return int(np.prod(self.shape))

    def melody(self, index: int) -> Melody:
        t, o, s, r1, r2, *arp = np.unravel_index(int(index), self.shape)
        return Melody(self.tonics[t], self.octaves[o], self.scales[s], self.rhythms_bar1[r1],
                      self.rhythms_bar2[r2], tuple(DIRECTIONS[int(a)] for a in arp))

    def sample(self, n: int, seed: int) -> list[Melody]:
        """n distinct melodies drawn uniformly, reproducibly from `seed`."""
        if n > len(self):
            raise ValueError(f"asked for {n} distinct melodies but the filtered space has only "
                             f"{len(self)}; relax the filters or lower n_clips")
        rng = np.random.default_rng(seed)
        return [self.melody(i) for i in rng.choice(len(self), size=n, replace=False)]


def parse_instruments(instruments: Iterable[str]) -> dict[str, int]:
    """["violin", "horn=60"] -> {"violin": 40, "horn": 60} (General MIDI programs, 0-based)."""
    out = {}
    for spec in instruments:
        name, _, program = str(spec).partition("=")
        name = sanitize_key(name.strip().lower())
        if program:
            out[name] = int(program)
        elif name in GM_PROGRAMS:
            out[name] = GM_PROGRAMS[name]
        else:
            raise ValueError(f"unknown instrument {name!r}: use one of {sorted(GM_PROGRAMS)} or "
                             "name=PROGRAM (General MIDI, 0-127)")
        if not 0 <= out[name] <= 127:
            raise ValueError(f"General MIDI program {out[name]} for {name!r} must be in 0..127")
    if len(out) < 1:
        raise ValueError("give at least one instrument")
    return out


def prepare_dmelodies(output_uri: str, *, n_clips: int = 3600, seed: int = 0,
                      instruments: Sequence[str] = ("violin", "trumpet"),
                      tonic: str | None = "C", octave: int | None = 4,
                      scale: str | None = "major", rhythm_filter: bool = True,
                      qpm: float = 120.0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                      samples_per_shard: int = 256, soundfont: str | None = None,
                      gain: float = 0.5, reverb: bool = False, render_batch: int = 128,
                      workers: int = 2, endpoint_url: str | None = None, overwrite: bool = False,
                      progress: bool = True,
                      executor=None) -> str:
    """Generate, render and shard a dMelodies audio dataset; returns the manifest's location.

    Clip i plays melody i (distinct melodies drawn from the filtered space with `seed`) on
    instrument i mod len(instruments); the split is stratified by instrument.
    """
    programs = parse_instruments(instruments)
    space = FactorSpace.filtered(tonic, octave, scale, rhythm_filter)
    fracs = parse_fractions(fractions)
    font = audio_mod.find_soundfont(soundfont)
    audio_mod.fluidsynth_binary()
    if qpm <= 0:
        raise ValueError(f"qpm={qpm} must be positive")
    params = {"n_clips": n_clips, "seed": seed, "instruments": programs, "tonic": tonic,
              "octave": octave, "scale": scale, "rhythm_filter": rhythm_filter, "qpm": qpm,
              "fractions": fracs, "samples_per_shard": samples_per_shard,
              "soundfont": font.name, "soundfont_bytes": font.stat().st_size, "gain": gain,
              "reverb": reverb, "velocity": 100, "generator_version": GENERATOR_VERSION}
    names = list(programs)

    def make_plan() -> dict:
        melodies = space.sample(n_clips, seed)
        items = []
        for i, melody in enumerate(melodies):
            name = names[i % len(names)]
            items.append({"key": f"dmel_{i:06d}_{name}", "instrument": name,
                          "program": programs[name], "factors": melody.factors(),
                          "notes": melody.notes(qpm)})
        split_idx = stratified_split([it["instrument"] for it in items], fracs, seed)
        return {"instruments": names, "space_size": len(space),
                "splits": {split: [items[i] for i in idx] for split, idx in split_idx.items()},
                "report": {"generated": n_clips, "space_size": len(space)}}

    def render(task: ShardTask) -> list[Sample]:
        rendered = []
        for start in range(0, len(task.items), render_batch):
            batch = task.items[start:start + render_batch]
            clips = [audio_mod.Clip(it["program"], tuple(tuple(n) for n in it["notes"]))
                     for it in batch]
            rendered.append(audio_mod.render_clips(clips, font, gain=gain, reverb=reverb))
        raw = np.concatenate(rendered)
        pcm, feats = audio_mod.featurise_rendered(raw, task.items, font)
        frames = feats.shape[1]
        samples = []
        for item, a, f in zip(task.items, pcm, feats):
            labels = {"key": item["key"], "source": "dmelodies", "instrument": item["instrument"],
                      "program": item["program"], "notes": item["notes"], "valid_frames": frames,
                      **item["factors"]}
            samples.append(Sample(item["key"], f, labels, a))
        return samples

    store = open_store(output_uri, endpoint_url)
    return build_dataset(store, name="dmelodies", tool="data_prep.dmelodies", params=params,
                         make_plan=make_plan, render=render, samples_per_shard=samples_per_shard,
                         workers=workers, overwrite=overwrite,
                         progress=progress,
                         extra_versions={"fluidsynth": audio_mod.fluidsynth_version(),
                                         "soundfont": str(font)},
                         executor=executor)


def _optional(value: str) -> str | None:
    return None if value.lower() in ("any", "none", "all") else value


def add_render_options(p: argparse.ArgumentParser, render_batch: int) -> None:
    """The options every rendering prep shares (data_prep.dmelodies, data_prep.varied): shard
    size, soundfont, gain, FluidSynth batch, workers, endpoint, overwrite, progress, and where
    the shards are rendered (--ray / --address: Ray tasks, data_prep.parallel)."""
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--soundfont", default=None,
                   help="soundfont path (default: MuseScore General, found automatically)")
    p.add_argument("--gain", type=float, default=0.5, help="FluidSynth gain")
    p.add_argument("--render-batch", type=int, default=render_batch,
                   help="clips per FluidSynth call")
    p.add_argument("--workers", type=int, default=2, help="shards rendered in parallel")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset made with other parameters at the output")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_ray_options(p)


@cli_main
def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.dmelodies", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("output", help="output folder or s3://bucket/prefix")
    p.add_argument("--n-clips", type=int, default=3600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instrument", action="append", dest="instruments",
                   help="instrument name or name=GM_PROGRAM; repeat for several "
                        "(default: violin, trumpet)")
    p.add_argument("--tonic", default="C", type=_optional, help="tonic, or 'any'")
    p.add_argument("--octave", default="4", type=_optional, help="4, 5, 6 or 'any'")
    p.add_argument("--scale", default="major", type=_optional, help="major, minor, blues or 'any'")
    p.add_argument("--no-rhythm-filter", dest="rhythm_filter", action="store_false",
                   help="keep all 28 x 28 rhythm pairs")
    p.add_argument("--qpm", type=float, default=120.0)
    p.add_argument("--fractions", default=None,
                   help="train,val,test fractions (default: 4/6, 1/6, 1/6, i.e. 2,400 / 600 / 600 "
                        "of 3,600 clips)")
    p.add_argument("--reverb", action="store_true", help="render with FluidSynth reverb/chorus")
    add_render_options(p, render_batch=128)
    args = p.parse_args(argv)
    with executor_from_args(args) as executor:
        manifest = prepare_dmelodies(
            args.output, n_clips=args.n_clips, seed=args.seed,
            instruments=args.instruments or ("violin", "trumpet"), tonic=args.tonic,
            octave=None if args.octave is None else int(args.octave), scale=args.scale,
            rhythm_filter=args.rhythm_filter, qpm=args.qpm,
            fractions=(DEFAULT_FRACTIONS if args.fractions is None
                       else [float(f) for f in args.fractions.split(",")]),
            samples_per_shard=args.samples_per_shard, soundfont=args.soundfont, gain=args.gain,
            reverb=args.reverb, render_batch=args.render_batch, workers=args.workers,
            endpoint_url=args.endpoint_url, overwrite=args.overwrite,
            progress=args.progress, executor=executor)
    print(manifest)
    return manifest


if __name__ == "__main__":
    sys.exit(exit_status(main()))
