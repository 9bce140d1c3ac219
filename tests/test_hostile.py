"""Hostile and malformed inputs: credentials stay in the process, a checkpoint does not steer
where data comes from, divergence says so, a run stays inside its root, a dataset's keys are
unique and its manifest fits the schema, the same run name with another configuration is
refused. Each test fails on code without the rule it names."""
from __future__ import annotations

import json
import shutil
import tarfile

import pytest
import torch

from conftest import free_port
from data_prep.shards import tar_bytes
from test_cli_errors import _one_error_line
from test_data_reader import _rewrite_shard
from tsdsae import checkpoint
from tsdsae.config import apply_overrides, debug, to_flat, toy
from tsdsae.storage import StorageError, open_store, redact_text, redact_url

SECRET = "s3cr3tPASSw0rd"


def _no_secret_anywhere(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text


# --- 1. credentials in URLs ----------------------------------------------------------------------


def test_redact_url_strips_userinfo_and_query_and_leaves_the_rest():
    assert redact_url(f"http://AKIA:{SECRET}@127.0.0.1:9000") == "http://127.0.0.1:9000"
    assert redact_url(f"https://host/path?X-Amz-Signature={SECRET}#f") == "https://host/path"
    assert redact_url("s3://bucket/prefix") == "s3://bucket/prefix"
    assert redact_url("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert redact_url("data/dmelodies") == "data/dmelodies"
    assert redact_text(f"endpoint http://u:{SECRET}@h:1 is down") == "endpoint http://h:1 is down"
    cfg = apply_overrides(debug(), [f"data.endpoint_url=http://u:{SECRET}@127.0.0.1:9",
                                    f"tracking.uri=http://u:{SECRET}@127.0.0.1:5000"])
    flat = to_flat(cfg)
    assert flat["data.endpoint_url"] == "http://127.0.0.1:9"
    assert flat["tracking.uri"] == "http://127.0.0.1:5000"
    assert SECRET in to_flat(cfg, redact=False)["data.endpoint_url"]    # the connection's copy


def test_storage_errors_do_not_print_the_endpoints_password(s3_server):
    endpoint = f"http://user:{SECRET}@127.0.0.1:{free_port()}"       # nothing listens there
    with pytest.raises(StorageError) as info:
        open_store("s3://some-bucket/data", endpoint).check()
    _no_secret_anywhere(str(info.value))
    assert "127.0.0.1" in str(info.value)


def test_credentials_in_endpoint_and_tracking_urls_are_never_logged_or_stored(
        mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from tsdsae import train
    from tsdsae.export import main as export_main

    host = mlflow_server.uri.split("://", 1)[1]
    tracking = f"http://tsdsae:{SECRET}@{host}"          # basic-auth user info in the URL
    endpoint = f"http://AKIAEXAMPLE:{SECRET}@127.0.0.1:{free_port()}"
    argv = ["--preset", "toy", "--data", "toy", "--name", "secret-run", "--no-eval",
            "--endpoint-url", endpoint, f"checkpoint.root={tmp_path}", "tracking.enabled=true",
            f"tracking.uri={tracking}", "schedule.switch_epoch=1", "schedule.max_epochs=2",
            "data.toy_clips=64"]
    assert train.main(argv) == 0
    out = capsys.readouterr()
    _no_secret_anywhere(out.out, out.err)
    summary = json.loads(out.out.strip().splitlines()[-1])
    for name in ("best.pt", "last.pt"):
        state = checkpoint.load(str(tmp_path / "secret-run" / name))
        _no_secret_anywhere(json.dumps(state["config"]))
        assert state["config"]["data.endpoint_url"] == endpoint.replace(
            f"AKIAEXAMPLE:{SECRET}@", "")
    run = MlflowClient(mlflow_server.uri).get_run(summary["mlflow_run_id"])
    _no_secret_anywhere(json.dumps(run.data.params), json.dumps(run.data.tags))
    assert run.data.params["data.endpoint_url"].startswith("http://127.0.0.1:")
    # An older checkpoint that still holds one: the export's manifest does not repeat it.
    state = checkpoint.load(str(tmp_path / "secret-run" / "best.pt"))
    state["config"]["data.endpoint_url"] = endpoint
    checkpoint.save(state, str(tmp_path / "old.pt"))
    assert export_main(["--checkpoint", str(tmp_path / "old.pt"), "--out",
                        str(tmp_path / "export")]) == 0
    capsys.readouterr()
    _no_secret_anywhere((tmp_path / "export" / "manifest.json").read_text())


# --- 2. a checkpoint does not decide where data comes from -----------------------------------------


def test_evaluate_does_not_follow_a_checkpoints_s3_data_or_endpoint(checkpoint_path, tmp_path,
                                                                     capsys):
    from tsdsae.evaluate import main as evaluate_main

    state = checkpoint.load(checkpoint_path)
    state["config"].update({"data.uri": "s3://attacker-bucket/data",
                            "data.endpoint_url": f"http://127.0.0.1:{free_port()}"})
    checkpoint.save(state, str(tmp_path / "foreign.pt"))
    assert evaluate_main([str(tmp_path / "foreign.pt")]) == 2
    line = _one_error_line(capsys.readouterr().err, "s3://attacker-bucket/data", "--data")
    assert "unreachable" not in line                    # nothing was contacted
    # A local folder the checkpoint names but that is not there: say --data, not "prepare".
    state["config"]["data.uri"] = str(tmp_path / "not-here")
    checkpoint.save(state, str(tmp_path / "moved.pt"))
    assert evaluate_main([str(tmp_path / "moved.pt")]) == 2
    _one_error_line(capsys.readouterr().err, "not-here", "--data")


def test_a_stage_marker_is_data_and_a_foreign_one_is_refused_naming_it(tmp_path):
    """Stage markers hold numbers only (no location to follow): where a run continues from is its
    own last.pt or its job's start, never a stored file's say. A marker that is not one of ours
    is one clear error naming the file."""
    from tsdsae.runs import MarkerError, RunFolder, StageMarker

    folder = RunFolder(str(tmp_path / "run"))
    marker = StageMarker(stage=1, epoch=4, val_loss=2.5, best_val=float("inf"), best_epoch=-1,
                         stopped_early=False)
    folder.write_marker(marker)
    assert folder.marker(1) == marker and folder.marker(2) is None
    for bad in (b'{"checkpoint": "/etc/ckpt", "metrics": {}}', b"[1, 2]", b"not json"):
        (tmp_path / "run" / "stage_2.json").write_bytes(bad)
        with pytest.raises(MarkerError, match=r"stage_2\.json .*delete it"):
            folder.marker(2)


# --- 3. divergence and non-finite values -----------------------------------------------------------


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr=nan", "optim.eps=-inf",
                                      "schedule.swap_weights=nan,1,1,1",
                                      "schedule.swap_weights=1,inf,1,1", "data.toy_seconds=inf"])
def test_float_overrides_must_be_finite(override):
    with pytest.raises(ValueError, match="finite"):
        apply_overrides(debug(), [override])


def test_training_that_diverges_stops_naming_epoch_and_term_and_keeps_the_last_checkpoint(
        tmp_path):
    from tsdsae.trainer import Trainer, TrainingDiverged

    cfg = apply_overrides(toy(), [f"checkpoint.root={tmp_path}", "data.toy_clips=64",
                                  "schedule.switch_epoch=1", "schedule.max_epochs=4",
                                  "checkpoint.every=1"])
    trainer = Trainer(cfg, progress=False)
    trainer.run.callbacks.append(lambda record: record["epoch"] == 1 and _poison(trainer.run.model))
    with pytest.raises(TrainingDiverged, match=r"diverged at epoch 2 \(train_") as info:
        trainer.fit()
    assert str(tmp_path / "toy" / "last.pt") in str(info.value)
    last = checkpoint.load(str(tmp_path / "toy" / "last.pt"))
    assert last["epoch"] == 1 and not checkpoint.non_finite(last["model"])
    assert not checkpoint.non_finite(checkpoint.load(str(tmp_path / "toy" / "best.pt"))["model"])


def _poison(model) -> None:
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))


def test_cli_divergence_is_one_line_and_exit_2(tmp_path, capsys):
    from tsdsae import train

    assert train.main(["--preset", "toy", "--data", "toy", "--name", "boom", "--quiet",
                       f"checkpoint.root={tmp_path}", "optim.lr=1e9", "data.toy_clips=64",
                       "schedule.switch_epoch=1", "schedule.max_epochs=3"]) == 2
    _one_error_line(capsys.readouterr().err, "boom", "diverged at epoch", "optim.lr")


def test_checkpoints_with_nan_weights_are_refused_by_every_tool(checkpoint_path, tmp_path,
                                                               capsys):
    from tsdsae import train
    from tsdsae.evaluate import main as evaluate_main
    from tsdsae.export import main as export_main
    from tsdsae.swap import main as swap_main

    state = checkpoint.load(checkpoint_path)
    name = sorted(state["model"])[0]
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    bad = tmp_path / "nan.pt"
    checkpoint.save(state, str(bad))
    import soundfile as sf

    from tsdsae.toy import synthesise
    for name_, pitch in (("a.wav", 60), ("b.wav", 67)):
        sf.write(tmp_path / name_, synthesise([pitch] * 4, "saw", 1.0), 16000)
    calls = [(evaluate_main, [str(bad), "--data", "toy"]),
             (export_main, ["--checkpoint", str(bad), "--out", str(tmp_path / "x")]),
             (swap_main, ["--checkpoint", str(bad), "--content", str(tmp_path / "a.wav"),
                          "--timbre", str(tmp_path / "b.wav"), "--out", str(tmp_path / "s")])]
    for main, argv in calls:
        assert main(argv) == 2, main.__module__
        _one_error_line(capsys.readouterr().err, "non-finite weights", name)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    # Resuming: the run's last.pt holds NaN weights.
    run = tmp_path / "runs" / "debug"
    run.mkdir(parents=True)
    checkpoint.save(state, str(run / "last.pt"))
    assert train.main(["--preset", "debug", "--quiet", f"checkpoint.root={tmp_path / 'runs'}",
                       *(f"{k}={v}" for k, v in state["config"].items()
                         if k.startswith(("model.", "schedule.", "data.toy", "optim.")))]) == 2
    _one_error_line(capsys.readouterr().err, "non-finite weights")


# --- 4. a run stays inside its root; a dataset's keys are unique; manifests fit the schema -------


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a\\b"])
def test_a_run_name_is_one_folder_name(name):
    with pytest.raises(ValueError, match="one folder name"):
        apply_overrides(debug(), [f"name={name}"])


def test_an_unwritable_checkpoint_root_is_refused_before_training(tmp_path, capsys):
    from tsdsae import train

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert train.main(["--preset", "toy", "--data", "toy", "--quiet",
                       f"checkpoint.root={blocker}"]) == 2
    _one_error_line(capsys.readouterr().err, str(blocker))


def test_a_sample_key_in_two_splits_is_named_by_reader_and_verify(small_dmelodies, tmp_path):
    from data_prep.verify import verify_dataset
    from tsdsae.data import ShardError, load_dataset, open_dataset

    root = tmp_path / "dup"
    shutil.copytree(small_dmelodies, root)
    manifest = json.loads((root / "dataset.json").read_text())
    # The test split's shard gets a copy of a train shard's samples (same keys): a leak.
    train_entry = manifest["splits"]["train"]["shards"][0]
    shutil.copy(root / train_entry["name"], root / "test-000009.tar")
    manifest["splits"]["test"]["shards"].append({**train_entry, "name": "test-000009.tar"})
    manifest["splits"]["test"]["num_samples"] += train_entry["num_samples"]
    (root / "dataset.json").write_text(json.dumps(manifest))
    with tarfile.open(root / train_entry["name"]) as tar:
        key = tar.getmembers()[0].name.split(".")[0]
    with pytest.raises(ShardError, match=f"sample key '{key}' is also in"):
        load_dataset(root)
    # Streamed, the train split's clips are checked against the splits held in memory, while
    # training (each rank's pass) and when the evaluation reads it whole.
    streamed = open_dataset(root, stream="on")["train"]
    with pytest.raises(ShardError, match=f"sample key '{key}' is also in the test split"):
        for _ in streamed.batches(4, seed=0, epoch=0):
            pass
    with pytest.raises(ShardError, match=f"sample key '{key}' is also in the test split"):
        for _ in streamed.chunks(4):
            pass
    report = verify_dataset(str(root))
    assert not report.ok and any(f["key"] == key and "also in" in f["problem"]
                                 for f in report.failures)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["splits"]["train"]["shards"][0].update(size="12"),
     "splits.train.shards[0].size"),
    (lambda m: m["splits"].update(val=[1, 2]), "splits.val"),
    (lambda m: m["splits"]["train"]["shards"][0].pop("sha256"), "splits.train.shards[0].sha256"),
    (lambda m: m.update(instruments="violin"), "instruments"),
    (lambda m: m.pop("num_frames"), "num_frames"),
])
def test_a_malformed_manifest_is_one_line_naming_the_field(small_dmelodies, tmp_path, capsys,
                                                           edit, field):
    from data_prep.verify import main as verify_main
    from tsdsae import train

    root = tmp_path / "bad"
    shutil.copytree(small_dmelodies, root)
    manifest = json.loads((root / "dataset.json").read_text())
    edit(manifest)
    (root / "dataset.json").write_text(json.dumps(manifest))
    assert verify_main([str(root)]) == 2
    _one_error_line(capsys.readouterr().err, field)
    assert train.main(["--preset", "debug", "--data", str(root), "--quiet",
                       f"checkpoint.root={tmp_path / 'runs'}"]) == 2
    _one_error_line(capsys.readouterr().err, field)


def test_a_shard_longer_than_its_manifest_is_refused_before_it_is_read_whole(small_dmelodies,
                                                                             tmp_path):
    from tsdsae.data import ShardError, read_shard_bytes

    root = tmp_path / "long"
    shutil.copytree(small_dmelodies, root)
    entry = json.loads((root / "dataset.json").read_text())["splits"]["val"]["shards"][0]
    path = root / entry["name"]
    path.write_bytes(path.read_bytes() + b"\0" * 10_000_000)
    with pytest.raises(ShardError, match=f"more than the {entry['size']} bytes"):
        read_shard_bytes(str(path), None, entry["size"])


def test_a_member_that_is_not_flac_fails_when_the_sample_is_read(small_dmelodies, tmp_path):
    from tsdsae.data import ShardError, load_dataset

    root = tmp_path / "noflac"
    shutil.copytree(small_dmelodies, root)
    _rewrite_shard(root, "val-000000.tar", lambda members: [
        (n, b"RIFF-not-flac" if n.endswith(".flac") else d) for n, d in members])
    with pytest.raises(ShardError, match="is not FLAC"):
        load_dataset(root)                        # features only: FLAC is not decoded
    assert tar_bytes                              # (the helper writes the rewritten shard)


# --- 5. the same run name with another configuration ----------------------------------------------


def test_the_same_run_name_with_another_model_is_refused_and_leaves_the_run_as_it_was(
        tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from tsdsae import train

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--preset", "toy", "--data", "toy", "--quiet", "--no-eval",
              f"checkpoint.root={tmp_path}", "schedule.switch_epoch=1", "schedule.max_epochs=2",
              "data.toy_clips=64"]
    for tracking in (["tracking.enabled=false"], ["tracking.enabled=true", f"tracking.uri={db}"]):
        name = f"run-{tracking[0][-4:]}"
        assert train.main([*common, "--name", name, *tracking]) == 0
        capsys.readouterr()
        before = (tmp_path / name / "last.pt").read_bytes()
        assert train.main([*common, "--name", name, "--model", "dsae", *tracking]) == 2
        _one_error_line(capsys.readouterr().err, name, "schedule.variant", "'ts_dsae' there",
                        "'dsae' here")
        assert (tmp_path / name / "last.pt").read_bytes() == before
    runs = MlflowClient(db).search_runs([e.experiment_id for e in MlflowClient(db)
                                         .search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]


@pytest.mark.slow
def test_divergence_on_ray_workers_is_one_error_not_retries(tmp_path, ray_cluster):
    from tsdsae.ray_train import driver_config, train_driver_fn
    from tsdsae.trainer import TrainingDiverged

    cfg = apply_overrides(toy(), [f"checkpoint.root={tmp_path}", "data.toy_clips=64",
                                  "schedule.switch_epoch=1", "schedule.max_epochs=3",
                                  "optim.lr=1e9", "name=ray-boom"])
    with pytest.raises(TrainingDiverged, match="ray-boom: training diverged at epoch 0"):
        train_driver_fn(driver_config(cfg, num_workers=1, cpus_per_worker=1, max_failures=3,
                                      evaluate=False))
    assert not (tmp_path / "ray-boom" / "result.json").exists()
