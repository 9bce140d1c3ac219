"""data_prep.folder on real files with every kind of bad input (written with soundfile)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch

from data_prep.folder import file_label, main as folder_main, prepare_folder, segment_starts
from data_prep.verify import verify_dataset
from tsdsae import features
from tsdsae.data import load_dataset


def tone(seconds: float, sr: int, f0: float = 440.0, channels: int = 1) -> np.ndarray:
    """A harmonic tone (three partials) at 0.3 peak, (S,) or (S, channels)."""
    t = np.arange(int(seconds * sr)) / sr
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3)) * 0.3 / 1.84
    x = x.astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.fixture()
def messy_folder(tmp_path):
    """Two labelled folders with good, fixable and broken files."""
    root = tmp_path / "recordings"
    (root / "violin").mkdir(parents=True)
    (root / "trumpet").mkdir()
    sf.write(root / "violin" / "a_44k.wav", tone(6.0, 44_100), 44_100)                 # 3 segments
    sf.write(root / "violin" / "b_48k_stereo.flac", tone(5.0, 48_000, 330, channels=2), 48_000)
    sf.write(root / "violin" / "c.ogg", tone(4.5, 16_000, 500), 16_000, format="OGG")
    sf.write(root / "violin" / "silent.wav", np.zeros(5 * 16_000, np.float32), 16_000)
    sf.write(root / "violin" / "empty.wav", np.zeros(0, np.float32), 16_000)
    (root / "violin" / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage" * 10)
    (root / "violin" / "notes.txt").write_text("not audio")
    sf.write(root / "trumpet" / "u8.wav", tone(5.0, 16_000, 262), 16_000, subtype="PCM_U8")
    with_nan = tone(5.0, 16_000, 392)
    with_nan[1000:1100] = np.nan
    with_nan[2000] = np.inf
    sf.write(root / "trumpet" / "nan.wav", with_nan, 16_000, subtype="FLOAT")
    sf.write(root / "trumpet" / "short.wav", tone(2.0, 22_050, 294), 22_050)
    return root


def test_bad_input_is_fixed_or_skipped_with_reasons(messy_folder, tmp_path):
    out = tmp_path / "ds"
    prepare_folder(str(messy_folder), str(out), crepe_model=None, samples_per_shard=3,
                   fractions=(0.6, 0.2, 0.2), progress=False)
    manifest = json.loads((out / "dataset.json").read_text())
    reasons = manifest["report"]["reasons"]
    assert reasons["skipped:unreadable"] == 1
    assert reasons["skipped:empty"] == 1
    assert reasons["skipped:too_quiet"] == 1
    assert reasons["skipped:not_audio"] == 1                  # notes.txt
    assert reasons["fixed:nonfinite_replaced"] == 1
    assert reasons["fixed:downmixed"] == 1
    assert reasons["fixed:resampled"] == 3                   # 44.1 kHz, 48 kHz, 22.05 kHz
    assert reasons["fixed:padded_short"] == 1
    # Segments: a_44k 3, b 2, c 1, u8 2, nan 2, short 1 (padded).
    assert reasons["segments_kept"] == 11 == manifest["num_samples"]
    by_file = {f["file"]: f for f in manifest["report"]["files"]}
    assert by_file["violin/corrupt.wav"]["reason"] == "unreadable"
    assert "extension .txt" in by_file["violin/notes.txt"]["detail"]
    assert {f["file"] for f in manifest["report"]["not_used"]} == {
        "violin/corrupt.wav", "violin/empty.wav", "violin/silent.wav", "violin/notes.txt"}
    assert by_file["trumpet/u8.wav"]["status"] == "kept"
    assert manifest["instruments"] == ["trumpet", "violin"]
    assert manifest["counts"] == {"trumpet": 5, "violin": 6}
    assert set(manifest["splits"]) == {"train", "val", "test"}
    assert verify_dataset(str(out)).ok

    data = load_dataset(out, with_audio=True)
    every = [data[s] for s in data]
    for split in every:
        assert torch.isfinite(split.features).all()
        assert (split.notes == -1).all()                     # real audio: notes unknown
        assert split.instruments == ("trumpet", "violin")
    short = next((s, i) for s in every for i, k in enumerate(s.keys) if "short" in k)
    split, i = short
    valid = features.num_frames(2 * features.SAMPLE_RATE)
    assert split.mask[i].sum() == valid                      # padding is masked ...
    assert (split.features[i, valid:] == 0).all()            # ... and zero, like pad_stack
    nan_keys = [k for s in every for k in s.keys if "_nan_" in k]
    assert len(nan_keys) == 2


def test_short_files_can_be_dropped(messy_folder, tmp_path):
    out = tmp_path / "ds"
    prepare_folder(str(messy_folder), str(out), crepe_model=None, short="drop",
                   fractions=(0.8, 0.2), progress=False)
    reasons = json.loads((out / "dataset.json").read_text())["report"]["reasons"]
    assert reasons["skipped:too_short"] == 1 and "fixed:padded_short" not in reasons
    assert reasons["segments_kept"] == 10


def test_labels_from_folders_urmp_names_and_patterns():
    assert file_label("violin/take1.wav", None) == "violin"
    assert file_label("01_Jupiter_vn_vc/AuSep_1_vn_01_Jupiter.wav", None) == "vn"
    assert file_label("AuSep_2_tpt_05_Entertainer.wav", None) == "tpt"
    assert file_label("loose.wav", None) is None
    pattern = re.compile(r"^(?P<label>[a-z]+)_\d+\.wav$")
    assert file_label("oboe_12.wav", pattern) == "oboe"
    assert file_label("x/oboe_12.wav", pattern) is None
    assert segment_starts(6 * 16_000, "pad") == [(0, 64_000), (16_000, 64_000), (32_000, 64_000)]
    assert segment_starts(20_000, "pad") == [(0, 20_000)] and segment_starts(20_000, "drop") == []


def test_urmp_layout_with_instrument_selection(tmp_path, capsys):
    root = tmp_path / "urmp" / "01_Jupiter_vn_vc"
    root.mkdir(parents=True)
    sf.write(root / "AuSep_1_vn_01_Jupiter.wav", tone(4.0, 48_000, 440), 48_000)
    sf.write(root / "AuSep_2_vc_01_Jupiter.wav", tone(4.0, 48_000, 110), 48_000)
    sf.write(root / "AuMix_01_Jupiter_vn_vc.wav", tone(4.0, 48_000, 220), 48_000)
    out = tmp_path / "ds"
    folder_main([str(tmp_path / "urmp"), str(out), "--instrument", "vn", "--no-crepe",
                 "--fractions", "1,0,0", "--no-progress"])
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["instruments"] == ["vn"] and manifest["num_samples"] == 1
    assert manifest["report"]["reasons"]["skipped:label_not_selected"] == 2
    assert "segments_kept" in capsys.readouterr().out




# --- real-world folders -------------------------------------------------------------------------


def run_cli(argv, capsys):
    """data_prep.folder's CLI -> (exit code, stdout, stderr)."""
    try:
        folder_main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


FAST = ["--no-crepe", "--no-progress"]


def test_symlinked_label_folders_are_followed_and_unused_files_listed(tmp_path, capsys):
    root, elsewhere = tmp_path / "input", tmp_path / "elsewhere" / "tpt"
    (root / "violin").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    for k in range(3):
        sf.write(root / "violin" / f"v{k}.wav", tone(4.0, 16_000, 440 + 20 * k), 16_000)
    for k in range(2):
        sf.write(elsewhere / f"t{k}.wav", tone(4.0, 16_000, 262 + 20 * k), 16_000)
    (root / "trumpet").symlink_to(elsewhere, target_is_directory=True)
    (root / "violin" / "gone.wav").symlink_to(tmp_path / "missing.wav")
    (root / "violin" / "loop").symlink_to(root, target_is_directory=True)       # a cycle
    (root / "a_alias").symlink_to(root / "violin", target_is_directory=True)    # read once
    code, out, err = run_cli([str(root), str(tmp_path / "ds"), "--fractions", "1,0,0", *FAST],
                             capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert manifest["counts"] == {"trumpet": 2, "violin": 3}
    not_used = {f["file"]: f["reason"] for f in manifest["report"]["not_used"]}
    assert not_used == {"violin/gone.wav": "dangling_link", "violin/loop/": "link_cycle",
                        "a_alias/": "folder_seen_twice"}
    assert "violin/gone.wav: dangling_link" in out and "violin/loop/: link_cycle" in out


def test_every_format_soundfile_reads_is_used(tmp_path, capsys):
    root = tmp_path / "input"
    (root / "horn").mkdir(parents=True)
    (root / "oboe").mkdir()
    x = tone(4.0, 48_000, 330)
    sf.write(root / "horn" / "a.aif", x, 48_000, format="AIFF")
    sf.write(root / "horn" / "b.aiff", x, 48_000, format="AIFF")
    sf.write(root / "oboe" / "c.mp3", x, 48_000, format="MP3")
    sf.write(root / "oboe" / "d.opus", x, 48_000, format="OGG", subtype="OPUS")
    (root / "oboe" / "cover.jpg").write_bytes(b"\xff\xd8\xff\xe0 not audio")
    code, out, err = run_cli([str(root), str(tmp_path / "ds"), "--fractions", "1,0,0", *FAST],
                             capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert manifest["counts"] == {"horn": 2, "oboe": 2}
    assert manifest["report"]["files_found"] == 5
    assert [(f["file"], f["reason"]) for f in manifest["report"]["not_used"]] == [
        ("oboe/cover.jpg", "not_audio")]
    assert "oboe/cover.jpg: not_audio (extension .jpg" in out


def test_unicode_labels_stay_distinct_and_readable(tmp_path, capsys):
    root = tmp_path / "input"
    names = ["小提琴", "小号", "Flûte", "Flöte"]
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        sf.write(root / name / f"take {name}.wav", tone(4.0, 16_000, 262 + 50 * k), 16_000)
    out_dir = tmp_path / "ds"
    code, out, err = run_cli([str(root), str(out_dir), "--fractions", "1,0,0", *FAST], capsys)
    assert code == 0, err
    manifest = json.loads((out_dir / "dataset.json").read_text(encoding="utf-8"))
    assert sorted(manifest["instruments"]) == sorted(names)
    assert manifest["counts"] == {name: 1 for name in names}
    assert verify_dataset(str(out_dir)).ok               # tar member names are sanitised
    data = load_dataset(out_dir)
    assert set(data["train"].instruments) == set(names)
    # Two folders whose names differ only in Unicode normalisation give one label: refused.
    clash = tmp_path / "clash"
    composed, decomposed = "Fl\u00fbte", "Flu\u0302te"
    for name in (composed, decomposed):
        (clash / name).mkdir(parents=True)
        sf.write(clash / name / "a.wav", tone(4.0, 16_000), 16_000)
    code, out, err = run_cli([str(clash), str(tmp_path / "ds2"), "--fractions", "1,0,0", *FAST],
                             capsys)
    assert code == 2 and "Traceback" not in err
    assert f"{composed}/a.wav" in err and f"{decomposed}/a.wav" in err and "rename" in err
    assert not (tmp_path / "ds2" / "dataset.json").exists()


def test_odd_sample_rates_cost_little_and_a_bad_file_is_skipped(tmp_path, capsys):
    import resource
    import time

    root = tmp_path / "input"
    (root / "violin").mkdir(parents=True)
    for k, rate in enumerate((48_000, 47_999, 11_127, 44_100)):
        sf.write(root / "violin" / f"r{rate}.wav", tone(5.5, rate, 300 + 40 * k), rate)
    (root / "violin" / "broken.flac").write_bytes(b"fLaC" + b"\x00" * 100)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    code, out, err = run_cli([str(root), str(tmp_path / "ds"), "--fractions", "1,0,0", *FAST],
                             capsys)
    took = time.perf_counter() - start
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert code == 0, err
    manifest = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert manifest["counts"] == {"violin": 8}                 # 4 files x 2 segments
    assert manifest["report"]["reasons"]["fixed:resampled"] == 4
    assert [f["file"] for f in manifest["report"]["not_used"]] == ["violin/broken.flac"]
    assert took < 20 and grew_mb < 300, (took, grew_mb)


def test_cancelling_channels_and_dc_offset(tmp_path, capsys):
    root = tmp_path / "input"
    (root / "violin").mkdir(parents=True)
    (root / "flute").mkdir()
    rng = np.random.default_rng(0)
    x = tone(4.0, 16_000, 440) * 2.5
    noise = rng.normal(0, 0.003, (len(x), 2)).astype(np.float32)
    stereo = np.stack([x, -0.95 * x], axis=1) + noise       # left is louder
    sf.write(root / "violin" / "cancel.wav", stereo, 16_000, subtype="FLOAT")
    sf.write(root / "flute" / "dc.wav", tone(4.0, 16_000, 523) + 0.4, 16_000, subtype="FLOAT")
    out_dir = tmp_path / "ds"
    code, out, err = run_cli([str(root), str(out_dir), "--fractions", "1,0,0", *FAST], capsys)
    assert code == 0, err
    manifest = json.loads((out_dir / "dataset.json").read_text())
    by_file = {f["file"]: f for f in manifest["report"]["files"]}
    assert "channels_cancel_used_louder" in by_file["violin/cancel.wav"]["fixes"]
    assert "dc_removed" in by_file["flute/dc.wav"]["fixes"]
    assert "violin/cancel.wav: its channels cancel when averaged; used the louder channel" in out
    data = load_dataset(out_dir, with_audio=True)["train"]
    for i, key in enumerate(data.keys):
        audio = data.audio[i].numpy()
        # The stored clip is the tone (not the noise) and has no DC left.
        assert abs(audio.mean()) < 0.01, key
        if "cancel" in key:
            expected = x / np.abs(x).max()
            assert np.corrcoef(audio[:len(expected)], expected)[0, 1] > 0.99


def test_empty_splits_are_refused_naming_label_and_counts(tmp_path, capsys):
    root = tmp_path / "input"
    for k, name in enumerate(("violin", "trumpet")):
        (root / name).mkdir(parents=True)
        sf.write(root / name / "only.wav", tone(5.0, 16_000, 300 + 100 * k), 16_000)
    # One recording per label cannot fill three splits.
    code, out, err = run_cli([str(root), str(tmp_path / "a"), *FAST], capsys)
    assert code == 2 and "Traceback" not in err
    assert "split 'val'" in err and "violin: train 2, val 0, test 0" in err
    assert "recordings per label: trumpet 1, violin 1" in err
    assert "--split-by segment" in err
    # Two segments per label leave no val split even when segments are split.
    code, out, err = run_cli([str(root), str(tmp_path / "b"), "--split-by", "segment", *FAST],
                             capsys)
    assert code == 2 and "split 'val'" in err and "trumpet: train 2, val 0, test 0" in err
    assert not (tmp_path / "b" / "dataset.json").exists()
    # A label missing from a split that others fill: a warning naming it, kept in the manifest.
    for k in (1, 2):
        sf.write(root / "violin" / f"more{k}.wav", tone(5.0, 16_000, 300 + 10 * k), 16_000)
    code, out, err = run_cli([str(root), str(tmp_path / "c"), *FAST], capsys)
    assert code == 0, err
    warning = ("label 'trumpet' has no segments in split(s) val, test (it has 1 recording(s); "
               "trumpet: train 2, val 0, test 0; violin: train 2, val 2, test 2)")
    assert f"WARNING: {warning}" in err and f"WARNING: {warning}" in out
    report = json.loads((tmp_path / "c" / "dataset.json").read_text())["report"]
    assert report["warnings"][0].startswith(warning)


def test_too_quiet_is_the_projects_one_rule(tmp_path):
    from tsdsae import audio as shared

    assert audio_mod_silence() == pytest.approx(10 ** (shared.QUIET_DBFS / 20))
    root = tmp_path / "input"
    (root / "violin").mkdir(parents=True)
    dither = np.random.default_rng(0).integers(-1, 2, 5 * 16_000).astype(np.int16)
    sf.write(root / "violin" / "dither.wav", dither, 16_000, subtype="PCM_16")   # ~-90 dBFS
    sf.write(root / "violin" / "ok.wav", tone(5.0, 16_000), 16_000)
    out_dir = tmp_path / "ds"
    prepare_folder(str(root), str(out_dir), crepe_model=None, fractions=(1, 0, 0),
                   progress=False)
    report = json.loads((out_dir / "dataset.json").read_text())["report"]
    (entry,) = report["not_used"]
    assert entry["file"] == "violin/dither.wav" and entry["reason"] == "too_quiet"
    assert "-90.3 dBFS, below the -60 dBFS floor" in entry["detail"]


def audio_mod_silence() -> float:
    from data_prep import audio as audio_mod
    return audio_mod.SILENCE_PEAK


def write_recordings(root, seconds: float):
    """Three 16 kHz tone recordings of `seconds` per label (violin, trumpet) under `root`."""
    for j, name in enumerate(("violin", "trumpet")):
        (root / name).mkdir(parents=True)
        for k in range(3):
            sf.write(root / name / f"rec{k}.wav", tone(seconds, 16_000, 200 + 100 * j + 30 * k),
                     16_000)
    return root


@pytest.fixture()
def three_recordings(tmp_path):
    """Three 6 s recordings (3 segments each) per label."""
    return write_recordings(tmp_path / "input", 6.0)


def sources_by_split(out_dir) -> dict[str, set]:
    """Source recordings per split, read from the samples' stored labels in the shards."""
    import tarfile

    manifest = json.loads((out_dir / "dataset.json").read_text())
    out = {}
    for split, info in manifest["splits"].items():
        out[split] = set()
        for shard in info["shards"]:
            with tarfile.open(out_dir / shard["name"]) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".json"):
                        out[split].add(json.load(tar.extractfile(member))["source_file"])
    return out


def test_folder_splits_by_recording_by_default(three_recordings, tmp_path, capsys):
    out_dir = tmp_path / "by_rec"
    code, out, err = run_cli([str(three_recordings), str(out_dir), *FAST], capsys)
    assert code == 0, err
    manifest = json.loads((out_dir / "dataset.json").read_text())
    assert {s: info["counts"] for s, info in manifest["splits"].items()} == {
        s: {"trumpet": 3, "violin": 3} for s in ("train", "val", "test")}
    sources = sources_by_split(out_dir)
    assert all(len(files) == 2 for files in sources.values())
    assert not (sources["train"] & sources["val"] or sources["train"] & sources["test"]
                or sources["val"] & sources["test"])
    assert manifest["report"]["splits_share_audio"] is False
    assert "no recording in two splits" in out

    seg_dir = tmp_path / "by_seg"
    code, out, err = run_cli([str(three_recordings), str(seg_dir), "--split-by", "segment",
                              "--fractions", "0.6,0.2,0.2", *FAST], capsys)
    assert code == 0, err
    manifest = json.loads((seg_dir / "dataset.json").read_text())
    report = manifest["report"]
    assert report["split_by"] == "segment" and report["splits_share_audio"] is True
    assert "share audio" in report["split_note"] and "SPLITS SHARE AUDIO" in out
    assert manifest["made_by"]["params"]["split_by"] == "segment"
    sources = sources_by_split(seg_dir)
    assert sources["train"] & (sources["val"] | sources["test"])      # what the note says


def test_crepe_kept_fraction_per_label_and_loud_warning(tmp_path, capsys):
    import inspect

    assert inspect.signature(prepare_folder).parameters["crepe_model"].default == "full"
    root = tmp_path / "input"
    (root / "flute").mkdir(parents=True)
    (root / "hiss").mkdir()
    sf.write(root / "flute" / "tone.wav", tone(4.0, 16_000, 523.25), 16_000)
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 4 * 16_000).astype(np.float32)
    sf.write(root / "hiss" / "noise.wav", noise, 16_000)
    code, out, err = run_cli([str(root), str(tmp_path / "ds"), "--crepe-model", "tiny",
                              "--fractions", "1,0,0"], capsys)
    assert code == 0, err
    # Said up front, then progress in seconds of audio (not batches of files).
    assert ("CREPE tiny confidence filter over 8 s of audio in 2 files on this CPU" in err
            and "--no-crepe" in err)
    assert "8/8 s of audio" in err.replace("\r", "\n")
    report = json.loads((tmp_path / "ds" / "dataset.json").read_text())["report"]
    assert report["crepe"]["model"] == "tiny"
    assert report["crepe"]["labels"] == {
        "flute": {"segments": 1, "kept": 1, "kept_fraction": 1.0},
        "hiss": {"segments": 1, "kept": 0, "kept_fraction": 0.0}}
    assert "WARNING: CREPE tiny kept only 0 of 1 segments of label 'hiss'" in err
    assert "flute 1/1 (100%), hiss 0/1 (0%)" in out
    data = load_dataset(tmp_path / "ds")
    assert data["train"].keys == ["000000_tone_0000"]


def test_killed_folder_prep_resumes_from_its_plan(tmp_path):
    """SIGKILL a real prep process after its first shard, then finish it: same dataset."""
    import sys

    from conftest import kill_after_first_shard

    root = write_recordings(tmp_path / "input", 24.0)
    args = ["--no-crepe", "--no-progress", "--samples-per-shard", "1", "--workers", "1"]
    parts = tmp_path / "parts"
    kill_after_first_shard([sys.executable, "-m", "data_prep.folder", str(root), str(parts),
                            *args], parts, timeout=120)
    written = len(list(parts.glob("*.tar")))
    assert (parts / "_prep_state.json").exists() and not (parts / "dataset.json").exists()
    assert 1 <= written < 126, written              # 6 files x 21 segments, one per shard
    folder_main([str(root), str(parts), *args])
    folder_main([str(root), str(tmp_path / "whole"), *args])
    assert ((parts / "dataset.json").read_bytes()
            == (tmp_path / "whole" / "dataset.json").read_bytes())


def test_crepe_batches_across_clips_give_the_per_clip_confidence():
    import torchcrepe

    from data_prep import audio as audio_mod

    clips = [tone(s, 16_000, f) for s, f in ((0.2, 262.0), (0.4, 440.0), (0.5, 660.0))]
    batched = audio_mod.crepe_confidences(clips, "tiny", batch_size=32)
    assert [len(c) for c in batched] == [1 + len(c) // 160 for c in clips]
    _, periodicity = torchcrepe.predict(
        torch.from_numpy(clips[1])[None], 16_000, 160, audio_mod.CREPE_FMIN, audio_mod.CREPE_FMAX,
        "tiny", decoder=torchcrepe.decode.argmax, return_periodicity=True, device="cpu")
    np.testing.assert_allclose(batched[1], periodicity[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(batched[2], audio_mod.crepe_confidence(clips[2], "tiny"), atol=1e-5)
