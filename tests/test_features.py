import torch

from tsdsae import features


def test_four_second_clip_gives_251_by_80_float32():
    t = torch.arange(features.CLIP_SAMPLES) / features.SAMPLE_RATE
    audio = features.peak_normalise(torch.sin(2 * torch.pi * 440.0 * t) * 0.3)
    assert audio.abs().max() == 1.0
    f = features.log_mel(audio)
    assert f.shape == (251, 80) and f.dtype == torch.float32
    # the 440 Hz energy lands in the mel bin holding 440 Hz (HTK scale, 0-8 kHz, 80 bins)
    mel = 2595 * torch.log10(torch.tensor(1 + 440 / 700))
    edges = torch.linspace(0, 2595 * torch.log10(torch.tensor(1 + 8000 / 700)), 82)
    expected = int(torch.searchsorted(edges, mel)) - 1
    assert abs(int(f[125].argmax()) - expected) <= 1


def test_batched_equals_single_and_silence_is_finite():
    audio = torch.randn(3, 16000) * 0.1
    audio[1] = 0.0
    batch = features.log_mel(features.peak_normalise(audio), batch_size=2)
    single = features.log_mel(features.peak_normalise(audio[2]))
    assert torch.allclose(batch[2], single, atol=1e-5)
    assert torch.isfinite(batch).all()
    assert features.num_frames(16000) == batch.shape[1] == 63


def test_inverse_gives_audio_of_matching_length():
    t = torch.arange(16000) / 16000
    f = features.log_mel(torch.sin(2 * torch.pi * 330 * t))
    audio = features.mel_to_audio(f, n_iter=4)
    assert audio.shape == ((f.shape[0] - 1) * features.HOP,)
    assert torch.isfinite(audio).all() and audio.abs().max() > 0.5


def test_front_end_matches_an_independent_librosa_computation():
    """log(|STFT|^2 @ librosa's HTK mel filterbank (norm=None) + eps), computed by librosa and
    numpy from FEATURE_PARAMS, equals tsdsae's log-mel (float64 reference, float32 features)."""
    import librosa
    import numpy as np

    p = features.FEATURE_PARAMS
    rng = np.random.default_rng(0)
    t = np.arange(features.SAMPLE_RATE) / features.SAMPLE_RATE
    audio = (0.5 * np.sin(2 * np.pi * 330.0 * t) + 0.3 * np.sin(2 * np.pi * 2100.0 * t)
             + 0.05 * rng.standard_normal(t.size))
    audio = audio / np.abs(audio).max()
    fb = librosa.filters.mel(sr=p["sample_rate"], n_fft=p["n_fft"], n_mels=p["n_mels"],
                             fmin=p["f_min"], fmax=p["f_max"], htk=True, norm=None)
    stft = librosa.stft(audio, n_fft=p["n_fft"], hop_length=p["hop_length"],
                        win_length=p["win_length"], window=p["window"], center=p["center"],
                        pad_mode=p["pad_mode"])
    reference = np.log(fb @ np.abs(stft) ** p["power"] + features.LOG_EPS).T      # (T, F)
    ours = features.log_mel(torch.from_numpy(audio).float()).double().numpy()
    assert ours.shape == reference.shape == (features.num_frames(t.size), features.N_MELS)
    # Bins with energy agree to float32 precision; near-silent bins (log of ~1e-10) may differ
    # more in absolute log terms, so compare the power where it matters and the log overall.
    loud = reference > np.log(1e-6)
    assert loud.mean() > 0.9
    np.testing.assert_allclose(ours[loud], reference[loud], atol=1e-3)
    np.testing.assert_allclose(np.exp(ours), np.exp(reference), rtol=1e-3, atol=1e-6)
    # and the filterbank torchaudio builds from the same dict is librosa's
    ta_fb = features.mel_spectrogram().mel_scale.fb.double().numpy()              # (freq, F)
    np.testing.assert_allclose(ta_fb.T, fb, atol=1e-5)             # float32 weights


def test_griffin_lim_equals_torchaudios_from_the_same_draws():
    import torchaudio

    from tsdsae.toy import synthesise

    audio = torch.from_numpy(synthesise([60, 64, 67, 72], "saw", 2.0))[None]
    stft = torch.stft(audio, 2048, 256, window=torch.hann_window(2048), return_complex=True)
    power = stft.abs() ** 2
    reference = torchaudio.transforms.GriffinLim(n_fft=2048, win_length=2048, hop_length=256,
                                                 power=2.0, n_iter=16)
    torch.manual_seed(3)
    expected = reference(power)
    torch.manual_seed(3)
    got = features.griffin_lim(power.sqrt(), n_iter=16)
    assert got.shape == expected.shape
    # Iterations amplify float32 rounding a little; a different phase start would differ by O(1).
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()
    torch.manual_seed(4)
    other = features.griffin_lim(power.sqrt(), n_iter=16)
    assert (other - expected).abs().max() > 0.05 * expected.abs().max()
