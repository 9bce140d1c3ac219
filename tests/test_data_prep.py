"""data_prep: the dMelodies factor space, FluidSynth rendering, shards, manifest, resume, verify."""
from __future__ import annotations

import io
import itertools
import json
import shutil
import tarfile
import time

import numpy as np
import pytest
import torch

from conftest import SMALL_DMELODIES, kill_after_first_shard
from data_prep import audio as audio_mod
from data_prep.dmelodies import (RHYTHMS, FactorSpace, Melody, main as dmelodies_main,
                                 parse_instruments, prepare_dmelodies)
from data_prep.shards import (Sample, parse_fractions, sanitize_key,
                              shard_bytes, stratified_split)
from data_prep.verify import main as verify_main, verify_dataset
from tsdsae import features
from tsdsae.data import load_dataset


# --- the factor space ------------------------------------------------------------------------


def test_factor_space_sizes_match_dmelodies():
    assert len(RHYTHMS) == 28
    assert len(FactorSpace()) == 12 * 3 * 3 * 28 * 28 * 16 == 1_354_752
    paper = FactorSpace.filtered()                      # C4 major + the rhythm filter
    assert len(paper.rhythms_bar1) == len(paper.rhythms_bar2) == 21
    assert len(paper) == 7_056
    assert all(RHYTHMS[r][0] == 0 for r in paper.rhythms_bar1)
    assert all(RHYTHMS[r][-1] == 7 for r in paper.rhythms_bar2)
    assert len(FactorSpace.filtered(None, None, None, False)) == len(FactorSpace())
    with pytest.raises(ValueError, match="tonic"):
        FactorSpace.filtered(tonic="H")


def test_melody_pitches_and_note_durations():
    # Rhythm 0 = onsets on eighths 0..5 (rests on 6, 7); the last pattern = onsets 2..7.
    melody = Melody("C", 4, "major", 0, len(RHYTHMS) - 1, ("up", "down", "up", "up"))
    assert melody.pitches() == [60, 64, 67, 72, 69, 65, 67, 71, 74, 60, 64, 67]
    notes = melody.notes()
    assert len(notes) == 12
    # Bar 1: six eighths, then two eighth rests (the sixth note does not ring to the bar's end).
    assert notes[0] == [60, 0.0, 0.25] and notes[5] == [65, 1.25, 0.25]
    # Bar 2 starts on its third eighth; the last note ends at 4 s.
    assert notes[6] == [67, 2.5, 0.25] and notes[11] == [67, 3.75, 0.25]
    blues = Melody("A", 5, "blues", 3, 3, ("up",) * 4)
    assert blues.pitches()[:3] == [81, 81 + 3, 81 + 6]
    assert Melody("C", 4, "minor", 0, 0, ("up",) * 4).pitches()[:3] == [60, 63, 67]


def test_every_paper_melody_follows_the_original_rule():
    """All 7,056 melodies of the paper's space against the rule stated independently: 16 eighth
    slots of 0.25 s; a slot that is an onset of its bar's rhythm holds exactly one note of one
    eighth, every other slot is silent."""
    space = FactorSpace.filtered()
    assert len(space) == 7_056
    patterns = list(itertools.combinations(range(8), 6))    # 6 onsets among 8 eighths, in order
    for index in range(len(space)):
        melody = space.melody(index)
        bar1 = patterns[melody.rhythm_bar1]
        bar2 = patterns[melody.rhythm_bar2]
        assert bar1[0] == 0 and bar2[-1] == 7                # the paper's rhythm filter
        onset_slots = [s for s in bar1] + [8 + s for s in bar2]
        notes = melody.notes()
        assert len(notes) == 12
        sounding = np.zeros(16, dtype=int)
        for pitch, onset, duration in notes:
            assert duration == 0.25, (index, notes)
            slot = onset / 0.25
            assert slot == int(slot)
            sounding[int(slot)] += 1
        assert sorted(np.flatnonzero(sounding).tolist()) == onset_slots, index
        assert sounding.max() == 1                           # one note per onset, none elsewhere
        assert [n[0] for n in notes] == melody.pitches()


def test_rendered_rests_are_quieter_than_notes():
    # Bar 1 plays eighths 0..5 and rests on 6, 7 (1.5 .. 2.0 s); the violin's release may ring
    # into the rest, so compare energies rather than expect silence.
    melody = Melody("C", 4, "major", 0, len(RHYTHMS) - 1, ("up",) * 4)
    audio = audio_mod.render_clips([audio_mod.Clip(40, tuple(tuple(n) for n in melody.notes()))])
    sr = features.SAMPLE_RATE

    def rms(t0: float, t1: float) -> float:
        seg = audio[0, int(t0 * sr):int(t1 * sr)]
        return float(np.sqrt(np.mean(seg.astype(np.float64) ** 2)))

    notes = rms(0.25, 1.5)                 # eighths 1..5: notes sounding
    rest = rms(1.6, 2.0)                   # eighths 6..7 after the last note's first 0.1 s
    bar2_rest = rms(2.1, 2.5)              # bar 2's rests (onsets start on its third eighth)
    assert rest < 0.5 * notes, (rest, notes)
    assert bar2_rest < 0.5 * notes, (bar2_rest, notes)


def test_sampling_is_reproducible_and_distinct():
    space = FactorSpace.filtered()
    a, b = space.sample(500, seed=7), space.sample(500, seed=7)
    assert a == b and len(set(a)) == 500
    assert space.sample(500, seed=8) != a
    with pytest.raises(ValueError, match="only 7056"):
        space.sample(8000, seed=0)
    assert parse_instruments(["violin", "Trumpet", "horn=60"]) == {
        "violin": 40, "trumpet": 56, "horn": 60}
    with pytest.raises(ValueError, match="unknown instrument"):
        parse_instruments(["kazoo"])


# --- rendering -------------------------------------------------------------------------------


def _crepe_pitch(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torchcrepe
    x = torch.from_numpy(audio.astype(np.float32))[None]
    f0, conf = torchcrepe.predict(x, features.SAMPLE_RATE, 160, 50.0, 2000.0, model="tiny",
                                  decoder=torchcrepe.decode.argmax, return_periodicity=True,
                                  batch_size=512)
    midi = 69 + 12 * np.log2(f0[0].numpy() / 440.0)
    return midi, conf[0].numpy()


def test_rendered_notes_have_the_midi_pitch():
    sustained = [audio_mod.Clip(40, ((69, 0.0, 4.0),)), audio_mod.Clip(56, ((62, 0.0, 4.0),))]
    melody = Melody("C", 4, "major", 0, 27, ("up", "down", "up", "down"))
    notes = melody.notes()
    clips = sustained + [audio_mod.Clip(40, tuple(tuple(n) for n in notes))]
    audio = audio_mod.render_clips(clips)
    assert audio.shape == (3, features.CLIP_SAMPLES) and audio.dtype == np.float32
    assert (np.abs(audio).max(axis=1) > 0.01).all()                  # not silent
    for clip, target in zip(audio[:2], (69, 62)):
        midi, conf = _crepe_pitch(clip)
        middle = midi[50:350][conf[50:350] > 0.5]                      # 0.5 .. 3.5 s
        assert len(middle) > 200
        assert abs(np.median(middle) - target) < 0.5                  # within 50 cents
    # A whole melody: away from note edges, CREPE agrees with the note labels.
    midi, conf = _crepe_pitch(audio[2])
    times = np.arange(len(midi)) * 0.01
    truth = np.full(len(midi), -1)
    for pitch, onset, duration in notes:
        inside = (times >= onset + 0.05) & (times < onset + duration - 0.05)
        truth[inside] = pitch
    judged = truth >= 0
    accuracy = np.mean(np.abs(midi[judged] - truth[judged]) < 0.5)
    assert accuracy > 0.85, accuracy


def test_render_is_deterministic_and_slots_do_not_leak():
    clips = [audio_mod.Clip(56, ((60, 0.0, 4.0),)), audio_mod.Clip(40, ((72, 3.5, 0.5),))]
    a, b = audio_mod.render_clips(clips), audio_mod.render_clips(clips)
    assert np.array_equal(a, b)
    # The second clip is silent until its only note at 3.5 s: nothing from clip 1's tail.
    assert np.abs(a[1, :int(3.4 * features.SAMPLE_RATE)]).max() < 1e-4


def test_missing_fluidsynth_or_soundfont_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(audio_mod.RenderError, match="apt-get install fluidsynth"):
        audio_mod.fluidsynth_binary()
    monkeypatch.undo()
    monkeypatch.setattr(audio_mod, "SOUNDFONT_CANDIDATES", ())
    monkeypatch.setattr(audio_mod, "SOUNDFONT_SEARCH_DIRS", (str(tmp_path),))
    monkeypatch.delenv(audio_mod.SOUNDFONT_ENV, raising=False)
    with pytest.raises(audio_mod.RenderError, match="apt-get install musescore-general-soundfont"):
        audio_mod.find_soundfont()
    with pytest.raises(audio_mod.RenderError, match="does not exist"):
        audio_mod.find_soundfont(tmp_path / "nope.sf2")
    monkeypatch.setenv(audio_mod.SOUNDFONT_ENV, str(tmp_path / "missing.sf3"))
    with pytest.raises(audio_mod.RenderError, match="missing.sf3"):
        audio_mod.find_soundfont()


# --- splits, keys and tar files ------------------------------------------------------------------


def test_stratified_split_is_deterministic_and_balanced():
    labels = ["violin"] * 50 + ["trumpet"] * 30
    fracs = parse_fractions((0.8, 0.1, 0.1))
    split = stratified_split(labels, fracs, seed=1)
    assert split == stratified_split(labels, fracs, seed=1)
    assert sorted(sum(split.values(), [])) == list(range(80))
    for name, expected in (("train", (40, 24)), ("val", (5, 3)), ("test", (5, 3))):
        got = (sum(labels[i] == "violin" for i in split[name]),
               sum(labels[i] == "trumpet" for i in split[name]))
        assert got == expected
    assert stratified_split(labels, fracs, seed=2) != split
    with pytest.raises(ValueError, match="sum to 1"):
        parse_fractions((0.8, 0.3))


def test_grouped_split_keeps_each_recording_in_one_split():
    from data_prep.shards import group_counts, grouped_split

    assert group_counts(3, (0.8, 0.1, 0.1)) == [1, 1, 1]          # every split gets one
    assert group_counts(10, (0.8, 0.1, 0.1)) == [8, 1, 1]
    assert group_counts(2, (0.8, 0.1, 0.1)) == [1, 1, 0]          # too few: test stays empty
    assert group_counts(4, (1.0, 0.0, 0.0)) == [4, 0, 0]
    groups = [f"{lab}{k}" for lab in ("v", "t") for k in range(5) for _ in range(3)]
    labels = [g[0] for g in groups]
    fracs = parse_fractions((0.6, 0.2, 0.2))
    split = grouped_split(labels, groups, fracs, seed=3)
    assert split == grouped_split(labels, groups, fracs, seed=3)
    assert sorted(sum(split.values(), [])) == list(range(30))
    owner = {}
    for name, idx in split.items():
        for i in idx:
            assert owner.setdefault(groups[i], name) == name           # one split per group
    assert {n: sorted({groups[i] for i in idx if labels[i] == "v"}).__len__()
            for n, idx in split.items()} == {"train": 3, "val": 1, "test": 1}
    with pytest.raises(ValueError, match="holds items of labels"):
        grouped_split(["a", "b"], ["g", "g"], fracs, seed=0)


def test_keys_are_sanitised_and_tar_bytes_are_reproducible():
    assert sanitize_key("../a b/c.d.wav") == "a_b_c_d_wav"
    assert sanitize_key("...") == "sample"
    feats = np.zeros((251, 80), np.float32)
    audio = np.zeros(features.CLIP_SAMPLES, np.int16)
    sample = Sample("k_1", feats, {"instrument": "violin", "notes": []}, audio)
    assert shard_bytes([sample]) == shard_bytes([sample])
    with tarfile.open(fileobj=io.BytesIO(shard_bytes([sample]))) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["k_1.flac", "k_1.json", "k_1.npy"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o444 for m in members)
    with pytest.raises(ValueError, match="not sanitised"):
        shard_bytes([Sample("a.b", feats, {}, audio)])


# --- whole preparations ------------------------------------------------------------------------


def test_dmelodies_write_verify_read(small_dmelodies):
    manifest = json.loads((small_dmelodies / "dataset.json").read_text())
    assert sorted(p.name for p in small_dmelodies.iterdir()) == [
        "dataset.json", "test-000000.tar", "train-000000.tar", "train-000001.tar",
        "train-000002.tar", "train-000003.tar", "val-000000.tar"]
    assert manifest["feature_params"] == features.FEATURE_PARAMS
    assert manifest["instruments"] == ["violin", "trumpet"]
    assert manifest["counts"] == {"trumpet": 12, "violin": 12}
    assert manifest["splits"]["train"]["counts"] == {"trumpet": 8, "violin": 8}
    assert manifest["splits"]["val"]["counts"] == {"trumpet": 2, "violin": 2}
    assert manifest["splits"]["test"]["counts"] == {"trumpet": 2, "violin": 2}
    assert manifest["made_by"]["params"]["seed"] == SMALL_DMELODIES["seed"]
    assert {"fluidsynth", "torch", "soundfont"} <= set(manifest["made_by"]["versions"])
    for entry in manifest["splits"]["train"]["shards"]:
        assert len(entry["sha256"]) == 64 and entry["size"] > 0

    report = verify_dataset(str(small_dmelodies))
    assert report.ok and report.shards_checked == 6 and report.samples_checked == 24

    data = load_dataset(small_dmelodies, with_audio=True)
    train = data["train"]
    assert train.features.shape == (16, 251, 80) and train.features.dtype == torch.float32
    assert train.mask.all() and train.audio.shape == (16, features.CLIP_SAMPLES)
    # No clip is in two splits.
    keys = [set(data[split].keys) for split in ("train", "val", "test")]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    for i, key in enumerate(train.keys):
        assert train.instruments[train.instrument[i]] == key.rsplit("_", 1)[1]
    # The original generator's rule at 120 qpm: an eighth is 0.25 s = 15.625 frames (hop 256 at
    # 16 kHz), a bar 125 frames. Bar 1 starts with a note; each bar has 6 eighth notes and 2
    # eighth rests, so 2 x 15.625 frames of rest per bar (30-32 whole frames); the frame at 4.0 s
    # is after the last note.
    assert (train.notes[:, :15] >= 60).all() and (train.notes <= 72 + 14).all()
    assert ((train.notes == -1) | (train.notes >= 60)).all()
    for bar in (slice(0, 125), slice(125, 250)):
        rests = (train.notes[:, bar] == -1).sum(dim=1)
        assert ((rests >= 30) & (rests <= 32)).all(), rests
    assert (train.notes[:, -1] == -1).all()
    # The stored audio is what the features were computed from.
    again = features.log_mel(train.audio[:2])
    assert torch.allclose(again, train.features[:2], atol=1e-3)
    # The labels carry every factor.
    with tarfile.open(small_dmelodies / "val-000000.tar") as tar:
        label = json.loads(tar.extractfile(tar.getmembers()[1]).read())
    assert {"tonic", "octave", "scale", "rhythm_bar1", "rhythm_bar2", "arp_chord1",
            "arp_chord4", "program", "notes"} <= set(label)
    assert label["tonic"] == "C" and label["octave"] == 4 and label["scale"] == "major"


def test_rerun_with_same_parameters_returns_at_once(small_dmelodies):
    before = {p.name: p.stat().st_mtime_ns for p in small_dmelodies.iterdir()}
    start = time.monotonic()
    out = prepare_dmelodies(str(small_dmelodies), **SMALL_DMELODIES)
    assert time.monotonic() - start < 2.0
    assert out == str(small_dmelodies / "dataset.json")
    assert before == {p.name: p.stat().st_mtime_ns for p in small_dmelodies.iterdir()}
    with pytest.raises(ValueError, match="other parameters .seed: 3 there, 4 here"):
        prepare_dmelodies(str(small_dmelodies), **{**SMALL_DMELODIES, "seed": 4})


def test_dataset_of_an_earlier_generator_is_not_reused(small_dmelodies, tmp_path):
    # A dataset whose manifest lacks the generator version (the legato melodies) is refused with
    # a message naming the version, and --overwrite makes it again.
    old = tmp_path / "old"
    shutil.copytree(small_dmelodies, old)
    manifest = json.loads((old / "dataset.json").read_text())
    del manifest["made_by"]["params"]["generator_version"]
    (old / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match='generator_version: "absent" there, 2 here.*--overwrite'):
        prepare_dmelodies(str(old), **SMALL_DMELODIES)
    prepare_dmelodies(str(old), **SMALL_DMELODIES, overwrite=True)
    again = json.loads((old / "dataset.json").read_text())
    assert again["made_by"]["params"]["generator_version"] == 2


def test_killed_prep_resumes_to_the_same_manifest(small_dmelodies, tmp_path):
    """SIGKILL a real prep process once its first shard is written, then finish it."""
    import sys

    reference = (small_dmelodies / "dataset.json").read_bytes()
    out = tmp_path / "resumed"
    p = SMALL_DMELODIES
    kill_after_first_shard(
        [sys.executable, "-m", "data_prep.dmelodies", str(out), "--n-clips", str(p["n_clips"]),
         "--seed", str(p["seed"]), "--samples-per-shard", str(p["samples_per_shard"]),
         "--fractions", ",".join(repr(f) for f in p["fractions"]), "--render-batch",
         str(p["render_batch"]), "--workers", "1", "--no-progress"], out)
    assert not (out / "dataset.json").exists()                   # no half-written dataset
    assert (out / "_prep_state.json").exists() and 1 <= len(list(out.glob("*.tar"))) < 6
    prepare_dmelodies(str(out), **SMALL_DMELODIES)
    assert (out / "dataset.json").read_bytes() == reference
    assert not (out / "_prep_state.json").exists()

    # A run killed after some shards: its manifest and last shards are gone, one shard is
    # half-written garbage. Rerunning rewrites exactly what is missing or bad.
    (out / "dataset.json").unlink()
    (out / "val-000000.tar").unlink()
    (out / "train-000002.tar").write_bytes((out / "train-000002.tar").read_bytes()[:5000])
    kept = (out / "train-000000.tar").stat().st_mtime_ns
    prepare_dmelodies(str(out), **SMALL_DMELODIES)
    assert (out / "dataset.json").read_bytes() == reference
    assert (out / "train-000000.tar").stat().st_mtime_ns == kept  # finished shards skipped
    assert verify_dataset(str(out)).ok


def corrupt_member(path, suffix: str) -> str:
    """Overwrite the first bytes of the first member ending in `suffix`; returns its sample key."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
    data = bytearray(path.read_bytes())
    data[member.offset_data:member.offset_data + 8] = b"garbage!"
    path.write_bytes(bytes(data))
    return member.name.split(".")[0]


def test_verify_cli_names_the_bad_shard_and_key(small_dmelodies, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(small_dmelodies, bad)
    assert verify_main([str(bad)]) == 0
    # Only the checksum can see a changed byte in the tar's end padding.
    data = bytearray((bad / "train-000001.tar").read_bytes())
    data[-1] ^= 0xFF
    (bad / "train-000001.tar").write_bytes(bytes(data))
    (bad / "val-000000.tar").write_bytes((bad / "val-000000.tar").read_bytes()[:3000])
    key = corrupt_member(bad / "train-000002.tar", ".npy")
    capsys.readouterr()
    assert verify_main([str(bad)]) == 1
    err = capsys.readouterr().err
    assert "3 of 6 shards failed" in err
    assert "train-000001.tar: sha256 differs" in err
    assert "val-000000.tar" in err and "truncated" in err
    assert f"train-000002.tar key {key}: undecodable {key}.npy" in err
    assert "train-000000.tar" not in err


def test_cli_help_runs(capsys):
    from data_prep.folder import main as folder_main
    for main in (dmelodies_main, verify_main, folder_main):
        with pytest.raises(SystemExit) as info:
            main(["--help"])
        assert info.value.code == 0
    assert "--endpoint-url" in capsys.readouterr().out


def test_dmelodies_default_split_is_2400_600_600():
    """The default plan keeps the paper's train/val sizes and holds out a test split."""
    from data_prep.dmelodies import DEFAULT_FRACTIONS, prepare_dmelodies
    import inspect

    n_clips = inspect.signature(prepare_dmelodies).parameters["n_clips"].default
    assert n_clips == 3600
    labels = [("violin", "trumpet")[i % 2] for i in range(n_clips)]
    split = stratified_split(labels, parse_fractions(DEFAULT_FRACTIONS), seed=0)
    assert {name: len(idx) for name, idx in split.items()} == {"train": 2400, "val": 600,
                                                               "test": 600}
    for idx in split.values():
        assert sum(labels[i] == "violin" for i in idx) * 2 == len(idx)
