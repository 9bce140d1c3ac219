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
