"""tsdsae.tracking against a real `mlflow server` (and the default local sqlite store)."""
import json
import uuid
from pathlib import Path

import pytest

from tsdsae import tracking
from tsdsae.config import apply_overrides, debug, to_flat


def _cfg(server_uri: str, experiment: str, *overrides):
    return apply_overrides(debug(), ["tracking.enabled=true", f"tracking.uri={server_uri}",
                                     f"tracking.experiment={experiment}", *overrides])


def _steps(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _experiment():
    return f"test-{uuid.uuid4().hex[:8]}"


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path}/sub/x.db"
    assert tracking.resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.resolve_tracking_uri() == "http://127.0.0.1:1"
    assert tracking.resolve_tracking_uri("http://h:2") == "http://h:2"


def test_the_null_tracker_logs_nothing():
    null = tracking.start_run(debug(), "key")                 # tracking.enabled is off in debug
    assert isinstance(null, tracking.NullTracker) and not null.active and null.run_id is None
    null.log_params({"a": 1})
    null.log_epoch({"epoch": 0, "stage": 1})
    null({"epoch": 1})
    null.finish()
    tracking.log_final(null, model=None, data=None, scores={"pre_swap": 1.0})  # returns at once
    assert isinstance(tracking.attach("http://x", "run", active=False), tracking.NullTracker)
    assert isinstance(tracking.attach("http://x", None), tracking.NullTracker)


def test_one_run_per_key_and_each_epoch_once(mlflow_server):
    experiment = _experiment()
    cfg = _cfg(mlflow_server.uri, experiment)
    first = tracking.start_run(cfg, "runs/a")
    first.log_epoch({"epoch": 0, "stage": 1, "train_loss": 2.0, "improved": True})
    first.log_epoch({"epoch": 1, "stage": 1, "train_loss": 1.5, "improved": False})
    first.finish("FAILED")

    again = tracking.start_run(cfg, "runs/a")                 # a restart: the same run, resumed
    assert again.run_id == first.run_id
    client = mlflow_server.client()
    assert client.get_run(again.run_id).info.status == "RUNNING"
    again.log_epoch({"epoch": 1, "stage": 1, "train_loss": 9.9})   # repeated: not logged again
    again.log_epoch({"epoch": 2, "stage": 2, "train_loss": 1.0})
    again.finish()
    assert _steps(client, again.run_id, "train_loss") == [0, 1, 2]
    assert [m.value for m in client.get_metric_history(again.run_id, "train_loss")
            if m.step == 1] == [1.5]
    run = client.get_run(again.run_id)
    assert run.data.params == {k: str(v) for k, v in to_flat(cfg).items()}
    assert run.data.tags[tracking.RUN_KEY_TAG] == "runs/a" and run.info.run_name == "debug"
    assert "improved" not in run.data.metrics

    with pytest.raises(ValueError, match="optim.lr"):
        tracking.start_run(apply_overrides(cfg, ["optim.lr=0.5"]), "runs/a")
    fresh = tracking.start_run(cfg, "runs/a", resume=False)       # --no-resume: a new run
    assert fresh.run_id != first.run_id
    assert [r.info.run_id for r in tracking.find_runs(mlflow_server.uri, experiment, "runs/a")] \
        == [fresh.run_id]
    fresh.fail(KeyboardInterrupt())                             # Ctrl-C: KILLED, not FAILED
    assert client.get_run(fresh.run_id).info.status == "KILLED"
    other = tracking.start_run(cfg, "runs/b")
    other.fail(RuntimeError("worker died"))
    assert client.get_run(other.run_id).info.status == "FAILED"


def test_child_runs_nest_under_an_explicit_parent_run(mlflow_server):
    experiment = _experiment()
    parent = tracking.open_run(mlflow_server.uri, experiment, "sweep/grid", run_name="grid")
    children = [tracking.start_run(_cfg(mlflow_server.uri, experiment, f"seed={seed}",
                                        f"name=trial-{seed}"),
                                   f"runs/trial-{seed}", parent_run_id=parent.run_id)
                for seed in (8, 172)]
    client = mlflow_server.client()
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert {r.info.run_id for r in found} == {c.run_id for c in children}
    assert {r.data.params["seed"] for r in found} == {"8", "172"}
    # resuming a child keeps it under its parent
    again = tracking.start_run(_cfg(mlflow_server.uri, experiment, "seed=8", "name=trial-8"),
                               "runs/trial-8", parent_run_id=parent.run_id)
    assert again.run_id == children[0].run_id
    with pytest.raises(Exception, match="(?i)run"):
        tracking.start_run(_cfg(mlflow_server.uri, experiment), "runs/orphan",
                           parent_run_id="0" * 32)


def test_single_process_cli_logs_epochs_evaluation_png_and_checkpoint(tmp_path, mlflow_server,
                                                                      capsys):
    from tsdsae.train import main

    experiment = _experiment()
    argv = ["--preset", "debug", "--quiet", "--name", "cli", f"checkpoint.root={tmp_path}",
            "tracking.enabled=true", f"tracking.uri={mlflow_server.uri}",
            f"tracking.experiment={experiment}"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    client = mlflow_server.client()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id, "val_loss") == list(range(12))
    assert _steps(client, run.info.run_id, "train_gswap_z") == list(range(5, 12))
    assert run.data.metrics["eval_gswap"] == summary["eval"]["gswap"]
    png = Path(client.download_artifacts(run.info.run_id, "figures/reconstructions.png",
                                         str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = client.download_artifacts(run.info.run_id, "checkpoint/best.pt", str(tmp_path))
    assert Path(ckpt).read_bytes() == (tmp_path / "cli" / "best.pt").read_bytes()

    assert main(argv) == 0                  # resumes the finished run: nothing logged twice
    capsys.readouterr()
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    assert _steps(client, run.info.run_id, "val_loss") == list(range(12))
    assert len(client.get_metric_history(run.info.run_id, "eval_gswap")) == 1


def test_default_store_is_a_sqlite_file_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = apply_overrides(debug(), ["tracking.enabled=true"])
    tracker = tracking.start_run(cfg, "runs/local")
    tracker.log_epoch({"epoch": 0, "stage": 1, "val_loss": 3.0})
    tracker.finish()
    assert tracker.uri == f"sqlite:///{tmp_path}/mlflow.db" and (tmp_path / "mlflow.db").is_file()
    (run,) = tracking.find_runs(tracker.uri, "tsdsae", "runs/local")
    assert run.data.metrics["val_loss"] == 3.0 and run.info.status == "FINISHED"


def test_the_evaluation_is_the_same_with_tracking_on_or_off(mlflow_server):
    """The pitch metric and the split scored follow cfg.eval, not the logging switch; MLflow
    gets the test split as eval_*, the val split beside it as val_*, and the split's name."""
    import math

    import torch

    from tsdsae.model.dsae import DSAE
    from tsdsae.toy import make_toy_dataset

    data = make_toy_dataset(n_clips=24, seconds=1.0, seed=1)
    overrides = ["eval.pitch=true", "eval.crepe_model=tiny", "eval.pitch_clips=2"]
    cfg_on = _cfg(mlflow_server.uri, _experiment(), *overrides)
    cfg_off = apply_overrides(cfg_on, ["tracking.enabled=false"])
    torch.manual_seed(0)
    model = DSAE(cfg_on.model)
    result = {"best_epoch": 3, "best_val": 1.5, "epochs_run": 4}
    off = tracking.evaluate_and_log(tracking.start_run(cfg_off, "runs/off"), cfg_off, model,
                                    data, result)
    tracker = tracking.start_run(cfg_on, "runs/on")
    on = tracking.evaluate_and_log(tracker, cfg_on, model, data, result)
    tracker.finish()
    same = lambda a, b: a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))  # noqa: E731
    assert on.keys() == off.keys() and all(same(on[k], off[k]) for k in on)
    assert {"rpa_recon", "rpa_gswap", "rpa_lswap", "val_gswap"} <= set(on)
    assert on["split"] == "test" and on["n_eval"] == len(data["test"])
    run = mlflow_server.client().get_run(tracker.run_id)
    metrics = run.data.metrics
    assert metrics["eval_gswap"] == on["gswap"] and metrics["val_gswap"] == on["val_gswap"]
    assert metrics["eval_n_eval"] == len(data["test"]) and "eval_val_gswap" not in metrics
    assert run.data.tags[tracking.EVAL_SPLIT_TAG] == "test"
    assert run.data.params["eval.split"] == "test"
