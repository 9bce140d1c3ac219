"""Every command line tool ends an expected error with one line on stderr and exit status 2: a
checkpoint that does not fit its configuration, a missing bucket, an unreachable endpoint, an
empty folder, a dataset without a validation split. Nothing finished is touched."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from tsdsae import checkpoint


def _one_error_line(err: str, *parts: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def misfits(checkpoint_path, tmp_path_factory):
    """Two checkpoints that do not fit their config: one without a module's weights, one whose
    config asks for other shapes (z_dim) than its weights have."""
    d = tmp_path_factory.mktemp("misfits")
    state = checkpoint.load(checkpoint_path)
    dropped = sorted(state["model"])[-1]          # one module weight, whatever its name
    missing = {**state, "model": {k: v for k, v in state["model"].items() if k != dropped}}
    checkpoint.save(missing, str(d / "missing_key.pt"))
    z_dim = state["config"]["model.z_dim"]
    reshaped = {**state, "config": {**state["config"], "model.z_dim": z_dim + 3}}
    checkpoint.save(reshaped, str(d / "other_shapes.pt"))
    return {"missing_key": str(d / "missing_key.pt"), "dropped": dropped,
            "other_shapes": str(d / "other_shapes.pt"), "z_dim": z_dim}


def test_swap_refuses_a_checkpoint_without_a_key(misfits, tmp_path, capsys):
    from tsdsae import swap
    from tsdsae.toy import synthesise
    import soundfile as sf
    import numpy as np

    wav = tmp_path / "a.wav"
    sf.write(str(wav), synthesise(np.array([60, 62, 64, 65]), "saw", 2.0), 16_000)
    rc = swap.main(["--checkpoint", misfits["missing_key"], "--content", str(wav),
                    "--timbre", str(wav), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 2
    _one_error_line(capsys.readouterr().err, misfits["missing_key"], "does not fit",
                    f"missing {misfits['dropped']}")
    assert not (tmp_path / "out").exists()


def test_evaluate_and_export_refuse_weights_of_other_shapes(misfits, tmp_path, capsys):
    from tsdsae import evaluate, export

    assert evaluate.main([misfits["other_shapes"]]) == 2
    line = _one_error_line(capsys.readouterr().err, misfits["other_shapes"], "does not fit",
                           "shape")
    assert str(misfits["z_dim"]) in line and str(misfits["z_dim"] + 3) in line
    assert export.main(["--checkpoint", misfits["other_shapes"],
                        "--out", str(tmp_path / "art")]) == 2
    _one_error_line(capsys.readouterr().err, misfits["other_shapes"], "shape")


def test_resume_from_a_last_checkpoint_of_another_config_says_what_to_do(checkpoint_path,
                                                                         tmp_path, capsys):
    from tsdsae.train import main

    last = tmp_path / "runs" / "r" / "last.pt"
    last.parent.mkdir(parents=True)
    shutil.copyfile(checkpoint_path, last)
    before = last.read_bytes()
    z_dim = checkpoint.load(str(last))["config"]["model.z_dim"]
    rc = main(["--preset", "debug", "--name", "r", "--quiet", "--no-eval",
               f"checkpoint.root={tmp_path / 'runs'}", f"model.z_dim={z_dim + 1}"])
    assert rc == 2
    # Refused before the weights are read: the stored run's configuration names what differs.
    _one_error_line(capsys.readouterr().err, str(last.parent), "another configuration",
                    f"model.z_dim: {z_dim} there, {z_dim + 1} here", "--no-resume", "--name")
    assert last.read_bytes() == before                         # the finished work is kept


def test_storage_errors_end_every_tool_with_one_line(s3_server, tmp_path, capsys):
    from data_prep import dmelodies, verify
    from tsdsae import train
    from tune import robustness_sweep

    endpoint = s3_server.endpoint_url
    missing = "s3://no-such-bucket-xyz/data"
    calls = [
        (verify.main, [missing, "--endpoint-url", endpoint]),
        (dmelodies.main, [missing, "--n-clips", "8", "--endpoint-url", endpoint,
                          "--no-progress"]),
        (train.main, ["--preset", "debug", "--data", missing, "--endpoint-url", endpoint,
                      f"checkpoint.root={tmp_path / 'runs'}"]),
        (robustness_sweep.main, ["--smoke-test", "--storage", missing, "--endpoint-url",
                                 endpoint, "--out", str(tmp_path / "results")]),
    ]
    for main, argv in calls:
        assert main(argv) == 2, main.__module__
        _one_error_line(capsys.readouterr().err, missing, "does not exist")

    unreachable = f"http://127.0.0.1:{free_port()}"            # nothing listens there
    start = time.monotonic()
    assert train.main(["--preset", "debug", "--data", "s3://some-bucket/data",
                       "--endpoint-url", unreachable]) == 2
    _one_error_line(capsys.readouterr().err, "s3://some-bucket", unreachable, "unreachable")
    assert time.monotonic() - start < 10

    (tmp_path / "empty").mkdir()
    out = subprocess.run([sys.executable, "-m", "data_prep.folder", str(tmp_path / "empty"),
                          str(tmp_path / "out"), "--no-crepe", "--no-progress"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    _one_error_line(out.stderr, str(tmp_path / "empty"))

    odd = "s3://bkt-x/exp?x/ds"
    assert train.main(["--preset", "debug", "--data", odd, "--endpoint-url", endpoint]) == 2
    _one_error_line(capsys.readouterr().err, odd, "'?'")


def test_training_names_a_missing_split(small_dmelodies, tmp_path, capsys):
    data = tmp_path / "no_val"
    shutil.copytree(small_dmelodies, data)
    manifest = json.loads((data / "dataset.json").read_text())
    del manifest["splits"]["val"]
    (data / "dataset.json").write_text(json.dumps(manifest))
    from tsdsae.train import main

    assert main(["--preset", "debug", "--data", str(data),
                 f"checkpoint.root={tmp_path / 'runs'}"]) == 2
    _one_error_line(capsys.readouterr().err, str(data), "'val'", "--fractions")
    assert not (tmp_path / "runs").exists()


def test_exit_status_and_one_line_from_a_real_process(tmp_path):
    """The `python -m` entry point itself: status 2, one line, no traceback."""
    missing = tmp_path / "none.pt"
    out = subprocess.run([sys.executable, "-m", "tsdsae.evaluate", str(missing)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    _one_error_line(out.stderr, str(missing), "no checkpoint")
    assert not Path(tmp_path / "none.pt").exists()
