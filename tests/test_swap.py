import json

import numpy as np
import pytest
import soundfile as sf

from tsdsae import swap
from tsdsae.toy import synthesise

OUTPUTS = ("content_input", "timbre_input", "content_recon", "timbre_recon", "global_swap",
           "local_swap")


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    d = tmp_path_factory.mktemp("wavs")
    a = synthesise(np.array([60, 62, 64, 65, 67, 69, 71, 72]), "saw", 3.0, sr=44_100)
    sf.write(str(d / "a_stereo_44k.wav"), np.stack([a, 0.7 * a], axis=1), 44_100)
    b = synthesise(np.array([67, 64, 60, 55]), "clarinet", 5.0)
    sf.write(str(d / "b_mono_16k.flac"), b, 16_000)
    return d / "a_stereo_44k.wav", d / "b_mono_16k.flac"


def _check_outputs(out, seconds=4.0):
    for name in OUTPUTS:
        audio, sr = sf.read(str(out / f"{name}.wav"), dtype="float32")
        assert sr == 16_000 and audio.ndim == 1
        assert len(audio) == int(seconds * 16_000), name
        assert np.sqrt(np.mean(audio ** 2)) > 1e-3 and np.abs(audio).max() > 0.5, name
    assert (out / "swap_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "swap.json").read_text())


def test_swap_cli_writes_wavs_and_a_grid_from_files(checkpoint_path, wavs, tmp_path, capsys):
    content, timbre = wavs                 # 44.1 kHz stereo 3 s, and 16 kHz mono 5 s
    rc = swap.main(["--checkpoint", checkpoint_path, "--content", str(content),
                    "--timbre", str(timbre), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    summary = _check_outputs(tmp_path / "out")
    assert summary["content"] == str(content) and set(OUTPUTS) <= set(summary["files"])
    assert summary["checkpoint"] == checkpoint_path and "peak-normalised" in summary["audio"]
    assert json.loads(capsys.readouterr().out)["files"] == summary["files"]
    # the padding of the 3 s content clip decodes to silence in what follows its z
    for name in ("content_recon", "global_swap"):
        audio, _ = sf.read(str(tmp_path / "out" / f"{name}.wav"))
        assert np.abs(audio[int(3.2 * 16_000):]).max() < 1e-3


def test_swap_cli_takes_dataset_samples(checkpoint_path, small_dmelodies, tmp_path):
    from tsdsae.data import iter_split_samples, load_manifest

    keys = {split: next(iter_split_samples(small_dmelodies, split))["key"]
            for split in ("train", "val")}
    assert load_manifest(small_dmelodies)["clip_seconds"] == 4.0
    rc = swap.main(["--checkpoint", checkpoint_path,
                    "--content", f"{small_dmelodies}#train/{keys['train']}",
                    "--timbre", str(small_dmelodies), "--timbre-key", f"val/{keys['val']}",
                    "--out", str(tmp_path / "out"), "--quiet", "--pitch", "--crepe-model", "tiny"])
    assert rc == 0
    summary = _check_outputs(tmp_path / "out")
    assert summary["timbre"].endswith(f"#val/{keys['val']}")
    assert set(summary["rpa"]) == {"content_recon", "timbre_recon", "global_swap", "local_swap"}
    assert all(0.0 <= v <= 1.0 for v in summary["rpa"].values())


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"), ("empty", "holds no audio samples"),
    ("nan", "holds NaN"), ("junk", "is not readable audio"), ("silent", "is too quiet to use"),
    ("dither", "-90.3 dBFS, below the -60 dBFS floor"),
])
def test_swap_cli_refuses_bad_audio_clearly(checkpoint_path, wavs, tmp_path, capsys, case,
                                            message):
    bad = tmp_path / f"{case}.wav"
    if case == "empty":
        sf.write(str(bad), np.zeros((0, 2), np.float32), 16_000)
    elif case == "nan":
        sf.write(str(bad), np.full(8000, np.nan, np.float32), 16_000, subtype="FLOAT")
    elif case == "junk":
        bad.write_bytes(bytes(range(256)) * 8)
    elif case == "silent":
        sf.write(str(bad), np.zeros(8000, np.float32), 16_000)
    elif case == "dither":                     # +-1 LSB of 16 bit: about -90 dBFS
        lsb = np.random.default_rng(0).integers(-1, 2, 32_000).astype(np.int16)
        sf.write(str(bad), lsb, 16_000, subtype="PCM_16")
    rc = swap.main(["--checkpoint", checkpoint_path, "--content", str(wavs[0]),
                    "--timbre", str(bad), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}" in err and message in err
    assert not (tmp_path / "out").exists()


def test_swap_cli_has_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        swap.main(["--help"])
    assert exit_.value.code == 0 and "--content" in capsys.readouterr().out


def test_trial_artifacts_write_figures_and_swap_wavs(checkpoint_path, tmp_path):
    from tsdsae.figures import trial_artifacts
    from tsdsae.inference import load
    from tsdsae.toy import make_toy_dataset

    data = make_toy_dataset(n_clips=24, seconds=1.0, seed=2)
    paths = trial_artifacts(load(checkpoint_path).model, data, tmp_path, pairs=3, wavs=1)
    names = {p.relative_to(tmp_path).as_posix() for p in paths}
    assert {"swap_grid.png", "v_projection.png", "z_trajectories.png"} <= names
    assert {f"swaps/pair0_{n}.wav" for n in OUTPUTS if n != "timbre_recon"} <= names
    for p in paths:
        assert p.is_file() and p.stat().st_size > 1000
        if p.suffix == ".wav":
            audio, sr = sf.read(str(p))
            # Griffin-Lim gives (T - 1) * 256 samples: 15,872 for the 1 s source clips
            assert sr == 16_000 and 16_000 - 256 < len(audio) <= 16_000
            assert np.abs(audio).max() > 0.5
