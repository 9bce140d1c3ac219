"""data_prep.varied (varied renders, four instruments) and the step budget of a user's own data."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data_prep.varied import BPM, PITCH_RANGE, SCALES, prepare_varied, random_melody
from tsdsae import features
from tsdsae.config import paper, step_budget
from tsdsae.data import load_dataset
from tsdsae.train import build_parser, config_from_args


def test_random_melodies_vary_within_their_ranges():
    rng = np.random.default_rng(0)
    melodies = [random_melody(rng) for _ in range(400)]
    assert {m["scale"] for m in melodies} == set(SCALES)
    assert len({m["tonic"] for m in melodies}) == 12
    bpms = [m["bpm"] for m in melodies]
    assert BPM[0] <= min(bpms) < 95 and 135 < max(bpms) <= BPM[1]
    assert 0.25 < np.mean([m["vibrato"] > 0 for m in melodies]) < 0.42
    assert 0.25 < np.mean([m["reverb"] for m in melodies]) < 0.42
    for m in melodies:
        pitch, onset, duration, velocity = (np.array(x) for x in zip(*m["notes"]))
        assert PITCH_RANGE[0] <= pitch.min() and pitch.max() <= PITCH_RANGE[1]
        # Every pitch is on the melody's scale.
        assert set(((pitch - m["tonic"]) % 12).tolist()) <= set(SCALES[m["scale"]])
        assert onset[0] == 0 and (np.diff(onset) > 0).all()
        assert (duration > 0).all() and (onset + duration <= features.CLIP_SECONDS + 1e-6).all()
        assert ((1 <= velocity) & (velocity <= 127)).all()
    lengths = np.concatenate([[n[2] for n in m["notes"]] for m in melodies])
    assert lengths.min() < 0.15 and lengths.max() > 1.0          # staccato eighths .. long notes


def test_varied_dataset_of_four_instruments_reads_back(tmp_path):
    out = tmp_path / "varied"
    prepare_varied(str(out), n_clips=16, samples_per_shard=8, progress=False)
    data = load_dataset(str(out), with_audio=True)
    assert data["train"].instruments == ("piano", "violin", "clarinet", "trumpet")
    assert sum(len(data[s]) for s in data.splits) == 16
    for split in data.splits:
        assert sorted(set(data[split].instrument.tolist())) == [0, 1, 2, 3]
        assert (data[split].audio.abs().amax(dim=1) > 0.5).all()       # peak-normalised, sounding
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["made_by"]["tool"] == "data_prep.varied"


def test_step_budget_is_in_steps_whatever_the_dataset_size():
    cfg = step_budget(paper(), 800, 1400, 2100)              # 7 steps an epoch at batch 128
    s = cfg.schedule
    assert (s.switch_epoch, s.max_epochs, s.patience) == (200, 500, 500)
    s = step_budget(paper(), 4000, 1400, 2100).schedule      # 32 steps an epoch
    assert (s.switch_epoch, s.max_epochs) == (44, 44 + 66)
    with pytest.raises(ValueError, match="empty"):
        step_budget(paper(), 0)


def test_own_data_gets_the_step_budget_unless_a_budget_is_set(small_dmelodies, tmp_path, capsys):
    def schedule(data, *extra):
        args = build_parser().parse_intermixed_args(["--data", str(data), *extra])
        return config_from_args(args).schedule

    # dMelodies keeps the paper's budget.
    assert schedule(small_dmelodies).max_epochs == paper().schedule.max_epochs
    own = tmp_path / "own"
    shutil.copytree(small_dmelodies, own)
    manifest = json.loads((own / "dataset.json").read_text())
    manifest["made_by"]["tool"] = "data_prep.folder"
    (own / "dataset.json").write_text(json.dumps(manifest))
    n_train = manifest["splits"]["train"]["num_samples"]           # 16 clips: one step an epoch
    s = schedule(own)
    expected = step_budget(paper(), n_train).schedule
    assert (s.switch_epoch, s.max_epochs) == (expected.switch_epoch, expected.max_epochs)
    assert "budget for your own data" in capsys.readouterr().err
    mine = schedule(own, "schedule.switch_epoch=10", "schedule.max_epochs=30")
    assert (mine.switch_epoch, mine.max_epochs) == (10, 30)
    assert schedule(own, "--preset", "debug").max_epochs == 12
