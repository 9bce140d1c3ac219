"""tsdsae.audio: the shared conditioning (DC, downmix, resampling, the quiet level) and its use
by tsdsae.inference.read_clip on real files."""
from __future__ import annotations

import resource
import time

import numpy as np
import pytest
import soundfile as sf

from tsdsae import audio as shared
from tsdsae.inference import AudioError, read_clip


def sine(seconds: float, sr: int, f0: float = 440.0, peak: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (peak * np.sin(2 * np.pi * f0 * t)).astype(np.float32)


def test_quiet_level_is_one_dbfs_rule():
    assert shared.QUIET_DBFS == -60.0
    assert shared.peak_dbfs(np.full(4, 0.5)) == pytest.approx(-6.02, abs=0.01)
    assert shared.too_quiet(np.zeros(100)) and shared.too_quiet(np.full(100, 1 / 32768))
    assert not shared.too_quiet(np.full(100, 0.0011))
    assert shared.quiet_message(np.zeros(3)) == "digital silence, below the -60 dBFS floor"


def test_resampling_cost_is_bounded_whatever_the_rate():
    for rate in (8_000, 11_127, 16_001, 22_050, 44_100, 47_999, 48_000, 96_000, 192_000):
        up, down = shared.resample_ratio(rate)
        assert abs((up / down) / (16_000 / rate) - 1) <= shared.MAX_RATE_ERROR
        assert max(up, down) <= 16_000, rate
    assert shared.resample_ratio(44_100) == (160, 441)                    # exact when cheap
    x = sine(5.0, 47_999, 1000.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    y = shared.resample(x, 47_999)
    took = time.perf_counter() - start
    assert took < 2.0 and (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) < 200_000
    assert abs(len(y) - 80_000) <= 2
    # The tone keeps its pitch: the spectrum peaks at 1 kHz.
    spectrum = np.abs(np.fft.rfft(y[:16_000]))
    assert abs(np.argmax(spectrum) - 1000) <= 1


def test_condition_removes_dc_and_detects_cancelling_channels():
    x = sine(1.0, 16_000)
    out = shared.condition(x + 0.3, 16_000)
    assert out.fixes == ["dc_removed"] and abs(out.audio.mean()) < 1e-4
    rng = np.random.default_rng(0)
    stereo = np.stack([x, -0.9 * x]) + rng.normal(0, 0.002, (2, len(x))).astype(np.float32)
    out = shared.condition(stereo, 16_000)
    assert out.channel == 0 and "channels_cancel_used_louder" in out.fixes
    assert np.corrcoef(out.audio, x)[0, 1] > 0.99
    # Ordinary stereo (correlated, or independent) is averaged.
    out = shared.condition(np.stack([x, 0.5 * x]), 16_000)
    assert out.channel is None and out.fixes == ["downmixed"]
    np.testing.assert_allclose(out.audio, 0.75 * x, atol=1e-6)
    noise = rng.normal(0, 0.1, (2, 16_000)).astype(np.float32)
    assert shared.condition(noise, 16_000).channel is None


def test_read_clip_uses_the_shared_conditioning(tmp_path):
    x = sine(3.0, 16_001, 440.0)
    sf.write(tmp_path / "odd.wav", x, 16_001)
    start = time.perf_counter()
    clip = read_clip(tmp_path / "odd.wav")
    assert time.perf_counter() - start < 5.0
    assert clip.valid_samples == pytest.approx(48_000, abs=3)
    assert float(clip.audio.abs().max()) == pytest.approx(1.0)
    # Cancelling channels: the louder one is used, with a warning naming the file.
    rng = np.random.default_rng(1)
    stereo = np.stack([x, -x * 0.95], axis=1) + rng.normal(0, 0.001, (len(x), 2))
    sf.write(tmp_path / "cancel.wav", stereo.astype(np.float32), 16_001, subtype="FLOAT")
    with pytest.warns(UserWarning, match="cancel.wav: its channels cancel"):
        clip = read_clip(tmp_path / "cancel.wav")
    assert float(clip.audio[:clip.valid_samples].abs().mean()) > 0.5     # a tone, not noise
    # DC is removed before peak normalisation.
    sf.write(tmp_path / "dc.wav", x + 0.5, 16_001, subtype="FLOAT")
    clip = read_clip(tmp_path / "dc.wav")
    assert abs(float(clip.audio[:clip.valid_samples].mean())) < 0.01
    # Near silence is refused with the one rule: +-1 LSB dither of 16 bit is -90 dBFS.
    dither = rng.integers(-1, 2, 32_000).astype(np.int16)
    sf.write(tmp_path / "dither.wav", dither, 16_000, subtype="PCM_16")
    with pytest.raises(AudioError, match=r"dither.wav is too quiet to use .*-90.3 dBFS"):
        read_clip(tmp_path / "dither.wav")
