import numpy as np
import pytest
import torch

from tsdsae import features
from tsdsae.config import debug
from tsdsae.evaluate import evaluate, listen, pair_other_instrument, pitch_metrics
from tsdsae.model.dsae import DSAE
from tsdsae.pitch import PitchTrack, crepe_f0, mean_rpa, raw_pitch_accuracy
from tsdsae.toy import make_toy_dataset, synthesise

MELODY = np.array([60, 64, 67, 72, 71, 67, 64, 62])


def _track(*f0s):
    f0 = np.array(f0s, dtype=np.float64)
    return PitchTrack(f0, np.ones_like(f0), np.arange(f0.shape[1]) * 0.01)


def test_raw_pitch_accuracy_counts_voiced_reference_frames_within_50_cents():
    ref = _track([440.0, 440.0, 440.0, 440.0, 0.0])
    cents = lambda c: 440.0 * 2 ** (c / 1200)            # noqa: E731
    est = _track([cents(40), cents(-40), cents(60), 0.0, 300.0])
    # frame 1-2 within 50 cents; 3 off by 60; 4 judged unvoiced; 5 is unvoiced in the reference
    assert raw_pitch_accuracy(ref, est)[0] == pytest.approx(0.5)
    silent = _track([0.0] * 5)
    rpa = raw_pitch_accuracy(_track([440.0] * 5, [0.0] * 5), _track([440.0] * 5, [440.0] * 5))
    assert rpa[0] == 1.0 and np.isnan(rpa[1])
    assert mean_rpa(rpa) == 1.0 and np.isnan(mean_rpa(raw_pitch_accuracy(silent, silent)))


def test_crepe_rpa_is_one_against_itself_and_low_two_semitones_off():
    clips = np.stack([synthesise(MELODY, "saw", 2.0), synthesise(MELODY + 2, "saw", 2.0),
                      synthesise(MELODY + 0.2, "saw", 2.0)])
    audio = torch.from_numpy(clips)
    gl = listen(features.log_mel(audio), torch.ones(3, 126, dtype=torch.bool))   # Griffin-Lim
    tracks = crepe_f0(torch.cat([audio, gl]), model="tiny")
    assert tracks.f0.shape == (6, 201) and (tracks.f0[0] > 0).mean() > 0.8
    ref = tracks[[0, 0, 0, 3, 3]]
    rpa = raw_pitch_accuracy(ref, tracks[[0, 1, 2, 3, 4]])
    assert rpa[0] == 1.0 and rpa[3] == 1.0                    # the input against itself
    assert rpa[1] < 0.1 and rpa[4] < 0.1                      # 2 semitones up: wrong pitch
    assert rpa[2] > 0.9                                        # 20 cents: within tolerance
    # the detected pitch is the melody's (MIDI 60 = 261.6 Hz in the first note)
    first_note = tracks.f0[0, 5:20]
    assert np.all(np.abs(1200 * np.log2(first_note / 261.63)) < 50)


def test_crepe_f0_equals_torchcrepe_and_frame_selection_keeps_the_chosen_frames():
    import torchcrepe

    audio = torch.from_numpy(np.stack([synthesise(MELODY, "saw", 2.0),
                                       synthesise(MELODY + 5, "flute", 2.0)]))
    ours = crepe_f0(audio, model="tiny", threshold=0.0)
    f0, periodicity = torchcrepe.predict(
        audio.float(), features.SAMPLE_RATE, 160, model="tiny",
        decoder=torchcrepe.decode.weighted_argmax, return_periodicity=True, batch_size=512)
    assert ours.f0.shape == tuple(f0.shape) == (2, 201)
    np.testing.assert_allclose(ours.f0, f0.double().numpy(), rtol=1e-4)
    np.testing.assert_allclose(ours.periodicity, periodicity.double().numpy(), atol=1e-4)
    only = np.zeros((2, 201), dtype=bool)
    only[0, 10:50] = only[1, 150:] = True
    picked = crepe_f0(audio, model="tiny", threshold=0.0, only=only)
    np.testing.assert_allclose(picked.f0[only], ours.f0[only], rtol=1e-5)
    assert (picked.f0[~only] == 0).all() and (picked.periodicity[~only] == 0).all()
    with pytest.raises(ValueError, match="viterbi"):
        crepe_f0(audio, model="tiny", decoder="viterbi", only=only)


class _Oracle(torch.nn.Module):
    """Decodes the input whose z it should use (a perfectly disentangled model) or, with
    `wrong`, the other one."""

    def __init__(self, wrong=False):
        super().__init__()
        self.wrong = wrong

    def reconstruct(self, x, m):
        return x

    def swap_global(self, x_i, m_i, x_j, m_j):     # decode(z_i, v_j): pitch of i
        return x_j if self.wrong else x_i

    def swap_local(self, x_i, m_i, x_j, m_j):      # decode(z_j, v_i): pitch of j
        return x_i if self.wrong else x_j


@pytest.fixture(scope="module")
def toy():
    return make_toy_dataset(n_clips=24, seconds=1.0, seed=1)


def test_pitch_metrics_compare_each_output_with_the_input_whose_z_it_decodes(toy):
    ev = toy["val"]
    partner = pair_other_instrument(ev.instrument.numpy(), 0)
    good = pitch_metrics(_Oracle(), ev, partner, crepe_model="tiny", clips=3)
    bad = pitch_metrics(_Oracle(wrong=True), ev, partner, crepe_model="tiny", clips=3)
    assert good["rpa_n_clips"] == 3
    # Griffin-Lim twice from random phases: the same melody scores about 0.8, another one ~0
    assert min(good["rpa_recon"], good["rpa_gswap"], good["rpa_lswap"]) > 0.6
    assert max(bad["rpa_gswap"], bad["rpa_lswap"]) < 0.2


def test_evaluate_adds_pitch_metrics_only_when_asked(toy):
    torch.manual_seed(0)
    model = DSAE(debug().model)
    plain = evaluate(model, toy)
    with_pitch = evaluate(model, toy, pitch=True, crepe_model="tiny", pitch_clips=2)
    assert {k: with_pitch[k] for k in plain} == plain
    assert set(with_pitch) - set(plain) == {"rpa_recon", "rpa_gswap", "rpa_lswap", "rpa_n_clips"}
    for k in ("rpa_recon", "rpa_gswap", "rpa_lswap"):
        assert np.isnan(with_pitch[k]) or 0.0 <= with_pitch[k] <= 1.0
