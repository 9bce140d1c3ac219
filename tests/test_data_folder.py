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
    assert reasons["skipped:silent"] == 1
    assert reasons["fixed:nonfinite_replaced"] == 1
    assert reasons["fixed:downmixed"] == 1
    assert reasons["fixed:resampled"] == 3                   # 44.1 kHz, 48 kHz, 22.05 kHz
    assert reasons["fixed:padded_short"] == 1
    # Segments: a_44k 3, b 2, c 1, u8 2, nan 2, short 1 (padded).
    assert reasons["segments_kept"] == 11 == manifest["num_samples"]
    by_file = {f["file"]: f for f in manifest["report"]["files"]}
    assert by_file["violin/corrupt.wav"]["reason"] == "unreadable"
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


def test_crepe_filter_keeps_pitched_segments_only(tmp_path):
    root = tmp_path / "in"
    (root / "flute").mkdir(parents=True)
    sf.write(root / "flute" / "tone.wav", tone(5.0, 16_000, 523.25), 16_000)
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 5 * 16_000).astype(np.float32)
    sf.write(root / "flute" / "noise.wav", noise, 16_000)
    out = tmp_path / "ds"
    prepare_folder(str(root), str(out), crepe_model="tiny", fractions=(1.0, 0.0, 0.0),
                   progress=False)
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["report"]["reasons"]["segments_skipped:low_crepe_confidence"] == 2
    data = load_dataset(out)
    assert len(data["train"]) == 2 and all("tone" in k for k in data["train"].keys)


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


def test_interrupted_folder_prep_resumes_from_its_plan(messy_folder, tmp_path):
    kwargs = dict(crepe_model=None, samples_per_shard=2, fractions=(0.6, 0.2, 0.2),
                  progress=False)
    prepare_folder(str(messy_folder), str(tmp_path / "whole"), **kwargs)
    from data_prep.shards import PrepInterrupted
    with pytest.raises(PrepInterrupted):
        prepare_folder(str(messy_folder), str(tmp_path / "parts"), workers=1,
                       stop_after_shards=2, **kwargs)
    assert (tmp_path / "parts" / "_prep_state.json").exists()
    prepare_folder(str(messy_folder), str(tmp_path / "parts"), **kwargs)
    assert ((tmp_path / "parts" / "dataset.json").read_bytes()
            == (tmp_path / "whole" / "dataset.json").read_bytes())
