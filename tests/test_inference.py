import numpy as np
import pytest
import soundfile as sf
import torch

from tsdsae import features, inference
from tsdsae.data import load_dataset
from tsdsae.inference import AudioError, prepare_audio, read_clip
from tsdsae.toy import synthesise

MELODY = np.array([60, 62, 64, 65, 67, 69, 71, 72])


@pytest.fixture(scope="module")
def model(checkpoint_path):
    return inference.load(checkpoint_path)


def test_load_gives_the_checkpoint_model_and_its_probes(model):
    torch.manual_seed(0)
    x_a, x_b = torch.randn(2, 30, 80), torch.randn(2, 17, 80)
    enc = model.encode(x_a)
    assert enc.v.shape == (2, 8) and enc.z.shape == (2, 30, 8) and enc.mask.all()
    assert model.decode(enc.z, enc.v).shape == (2, 30, 80)
    m_a, m_b = torch.ones(2, 30, dtype=torch.bool), torch.ones(2, 17, dtype=torch.bool)
    dsae = model.model
    # the same maths as the model's own probes: global = decode(z_a, v_b), local = decode(z_b, v_a)
    torch.testing.assert_close(model.swap_global(x_a, x_b), dsae.swap_global(x_a, m_a, x_b, m_b))
    torch.testing.assert_close(model.swap_local(x_a, x_b), dsae.swap_local(x_a, m_a, x_b, m_b))
    assert model.swap_local(x_a, x_b).shape == (2, 17, 80)
    torch.testing.assert_close(model.reconstruct(x_a[0]), dsae.reconstruct(x_a[:1], m_a[:1]))
    # one v broadcast over a batch of z
    assert model.decode(enc.z, enc.v[0]).shape == (2, 30, 80)
    with pytest.raises(ValueError, match="sample_rate"):
        model.encode(torch.randn(2, 16000))


def test_audio_inputs_are_prepared_like_the_training_data(model):
    audio = torch.from_numpy(synthesise(MELODY, "saw", 1.0))
    feats = features.log_mel(features.peak_normalise(audio - audio.mean()))   # DC removed
    from_audio = model.encode(0.3 * audio, sample_rate=16_000)
    from_feats = model.encode(feats)
    torch.testing.assert_close(from_audio.v, from_feats.v)
    torch.testing.assert_close(from_audio.z, from_feats.z)
    out = model.to_audio(model.reconstruct(feats))
    assert out.shape == (1, (feats.shape[0] - 1) * features.HOP)


def test_prepare_audio_resamples_downmixes_pads_and_crops():
    left = synthesise(MELODY, "saw", 3.0, sr=44_100)
    stereo = np.stack([left, 0.5 * left])                       # (C, S) at 44.1 kHz
    clip = prepare_audio(stereo, 44_100, seconds=4.0, name="stereo")
    assert clip.audio.shape == (64_000,) and clip.valid_samples == 48_000
    assert float(clip.audio.abs().max()) == pytest.approx(1.0)
    assert float(clip.audio[48_000:].abs().max()) == 0.0
    assert clip.mask.shape == (251,) and clip.mask[:187].all() and not clip.mask[188:].any()
    assert (clip.features[~clip.mask] == 0).all()
    long = prepare_audio(np.tile(left, 2), 44_100, seconds=4.0, offset=1.0)
    assert long.audio.shape == (64_000,) and long.mask.all()
    assert prepare_audio(left, 44_100, seconds=None).audio.shape == (48_000,)


def _write(path, data, sr=16_000, subtype=None):
    sf.write(str(path), data, sr, subtype=subtype)
    return path


def test_bad_audio_files_are_refused_with_the_file_named(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav does not exist"):
        read_clip(missing)
    empty = _write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32))
    with pytest.raises(AudioError, match="empty.wav holds no audio samples"):
        read_clip(empty)
    nan = np.ones(16_000, np.float32)
    nan[100] = np.nan
    with pytest.raises(AudioError, match="nan.wav holds NaN"):
        read_clip(_write(tmp_path / "nan.wav", nan, subtype="FLOAT"))
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    with pytest.raises(AudioError, match="junk.wav is not readable audio"):
        read_clip(junk)
    with pytest.raises(AudioError, match="silent.wav is too quiet to use .*digital silence"):
        read_clip(_write(tmp_path / "silent.wav", np.zeros(16_000, np.float32)))
    with pytest.raises(AudioError, match="too short"):
        prepare_audio(np.ones(100), 16_000, seconds=None)


def test_dataset_samples_are_named_by_uri_and_key(small_dmelodies):
    data = load_dataset(small_dmelodies, splits=["val"], with_audio=True)
    val = data["val"]
    key = val.keys[0]
    clip = read_clip(f"{small_dmelodies}#val/{key}")
    assert clip.name.endswith(f"#val/{key}") and clip.mask.all()
    same = read_clip(str(small_dmelodies), key=key)              # split searched for
    torch.testing.assert_close(clip.audio, same.audio)
    # the audio gives back the stored features (the one front end)
    torch.testing.assert_close(clip.features, val.features[0], atol=2e-3, rtol=1e-4)
    with pytest.raises(KeyError, match="no sample 'missing'"):
        read_clip(f"{small_dmelodies}#val/missing")
