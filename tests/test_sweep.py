"""The robustness sweep on a real local Ray, tracked in a real MLflow server."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import free_port
from tsdsae import checkpoint
from tune import robustness_sweep as sweep_mod

ROOT = Path(__file__).resolve().parents[1]

# The debug model on the toy data, every variant once: one DSAE trial and one shared-stage-1
# trial (dsae_freeze, ts_dsae_wo_reg, ts_dsae).
GRID = """
name: tiny
preset: debug
axes:
  schedule.variant: [dsae, dsae_freeze, ts_dsae_wo_reg, ts_dsae]
  seed: [831]
fixed:
  data.toy_clips: 96
  schedule.switch_epoch: 2
  schedule.max_epochs: 3
  schedule.patience: 3
  checkpoint.every: 1
  tracking.figures: true
  eval.pitch: true
  eval.crepe_model: tiny
  eval.pitch_clips: 4
"""


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "tiny.yaml"
    path.write_text(GRID)
    return path


def test_gpu_shares_split_across_workers():
    args = sweep_mod.build_parser().parse_args(["--data", "toy", "--gpus-per-trial", "0.5",
                                                "--workers-per-trial", "2"])
    options = sweep_mod._ray_options(args)
    assert options["use_gpu"] and options["gpus_per_worker"] == 0.25
    from tsdsae.ray_train import split_config
    assert split_config({"preset": "debug", **options})[1].gpus_per_worker == 0.25


def _args(grid_file, root: Path, mlflow_uri: str, name: str, *extra: str):
    return sweep_mod.build_parser().parse_args([
        "--grid", str(grid_file), "--data", "toy", "--name", name, "--storage",
        str(root / "sweeps"), "--tracking-uri", mlflow_uri, "--out", str(root / "results"),
        "--cpus-per-worker", "0.45", "--experiment", "sweeps-test", *extra])


def _children(client, parent_id: str):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.fixture(scope="module")
def smoke(ray_cluster, mlflow_server, grid_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    out = sweep_mod.run_sweep(_args(grid_file, root, mlflow_server.uri, "smoke"))
    return out, root


def test_smoke_sweep_writes_a_report_and_one_child_run_per_grid_point(smoke, mlflow_server):
    out, root = smoke
    assert out["errors"] == 0 and out["runs"] == 4
    for path in out["report"].values():
        assert Path(path).stat().st_size > 0
    summary = (Path(out["results"]) / "summary.md").read_text()
    for label in ("DSAE", "DSAE-freeze", "TS-DSAE w/o reg", "TS-DSAE"):
        assert f"| {label} |" in summary
    client = mlflow_server.client()
    children = _children(client, out["parent_run_id"])
    trials = [r for r in children if r.data.tags.get("tsdsae.role") == "trial"]
    shared = [r for r in children if r.data.tags.get("tsdsae.role") == "shared_stage_1"]
    assert sorted(r.data.tags["grid.schedule.variant"] for r in trials) == sorted(
        ["dsae", "dsae_freeze", "ts_dsae_wo_reg", "ts_dsae"])
    assert len(shared) == 1
    for run in trials:
        assert run.data.tags["grid.seed"] == "831" and run.data.tags["grid.data.uri"] == "toy"
        assert {"eval_pre_swap", "eval_gswap", "eval_lswap"} <= set(run.data.metrics)
        assert run.info.status == "FINISHED"
    # per-epoch history: stage-2 variants log only their own epochs (2), DSAE all 3
    for run in trials:
        epochs = client.get_metric_history(run.info.run_id, "stage")
        n = 3 if run.data.tags["grid.schedule.variant"] == "dsae" else 1
        assert len(epochs) == n, run.data.tags["grid.schedule.variant"]
        files = {f.path for f in client.list_artifacts(run.info.run_id, "figures")}
        assert {"figures/swap_grid.png", "figures/v_projection.png",
                "figures/z_trajectories.png", "figures/swaps"} <= files, files
        assert "eval_rpa_recon" in run.data.metrics or "eval_rpa_n_clips" in run.data.metrics
    parent_files = {f.path for f in client.list_artifacts(out["parent_run_id"], "report")}
    assert {"report/summary.md", "report/summary.csv"} <= parent_files
    assert any(f.startswith("report/robustness-") and f.endswith("-adam.png") for f in parent_files)


def test_shared_stage_one_equals_an_unshared_run(smoke, mlflow_server, grid_file):
    out, root = smoke
    unshared = sweep_mod.run_sweep(_args(grid_file, root, mlflow_server.uri, "unshared",
                                         "--only", "schedule.variant=ts_dsae",
                                         "--no-share-stage-1"))
    assert unshared["runs"] == 1
    runs = root / "sweeps"
    shared_dir = next((runs / "smoke" / "runs").glob("*-ts_dsae"))
    alone_dir = next((runs / "unshared" / "runs").glob("*-ts_dsae"))
    a = json.loads((shared_dir / "result.json").read_text())
    b = json.loads((alone_dir / "result.json").read_text())
    assert a["eval"] == b["eval"] and a["best_val"] == b["best_val"]
    sa = checkpoint.load(str(shared_dir / "best.pt"))
    sb = checkpoint.load(str(alone_dir / "best.pt"))
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    for k in sa["snapshot"]:
        assert torch.equal(sa["snapshot"][k], sb["snapshot"][k]), k


def test_killed_sweep_resumes_without_duplicate_runs(ray_cluster, mlflow_server, grid_file,
                                                     tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, str(ROOT / "tune" / "robustness_sweep.py"), "--grid", str(grid_file),
           "--data", "toy", "--name", "killed", "--storage", str(tmp_path / "sweeps"),
           "--tracking-uri", mlflow_server.uri, "--out", str(tmp_path / "results"),
           "--cpus-per-worker", "0.45", "--experiment", "sweeps-kill", "--address", address]
    log = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    runs = tmp_path / "sweeps" / "killed" / "runs"
    deadline = time.monotonic() + 300
    while not list(runs.glob("*/result.json")):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no run finished within 300 s"
        time.sleep(1)
    finished = {p: p.stat().st_mtime for p in runs.glob("*/result.json")}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert len(finished) < 4, "the sweep finished before it could be interrupted"

    again = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming sweep killed" in again.stdout
    for path, mtime in finished.items():      # finished runs were not trained again
        assert path.stat().st_mtime == mtime
    client = mlflow_server.client()
    exp = client.get_experiment_by_name("sweeps-kill")
    parents = client.search_runs([exp.experiment_id], "tags.`tsdsae.role` = 'sweep'")
    assert len(parents) == 1
    children = _children(client, parents[0].info.run_id)
    trials = [r for r in children if r.data.tags.get("tsdsae.role") == "trial"]
    assert len(trials) == 4
    assert len({r.data.tags["tsdsae.run_key"] for r in trials}) == 4
    assert all(r.info.status == "FINISHED" for r in trials)
    # no epoch logged twice in any run's history
    for run in trials:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "stage")]
        assert len(steps) == len(set(steps))


def _kill_ray_head(temp_dir: str) -> None:
    """Stop exactly the processes of the head started with `temp_dir` (not every Ray on the
    machine, as `ray stop` would)."""
    for _ in range(2):
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if temp_dir in cmdline:
                try:
                    os.kill(int(pid_dir.name), signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(1)


@pytest.mark.slow
def test_ray_job_submit_runs_the_smoke_sweep(mlflow_server, grid_file, tmp_path):
    """`ray start --head` on 127.0.0.1, then `ray job submit` (token auth) of the sweep."""
    bin_dir = Path(sys.executable).parent
    temp_dir = f"/tmp/rayjs_{uuid.uuid4().hex[:6]}"
    dash = free_port()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    ports = ["--port", str(free_port()), "--dashboard-port", str(dash),
             "--ray-client-server-port", str(free_port()),
             "--dashboard-agent-listen-port", str(free_port()),
             "--dashboard-agent-grpc-port", str(free_port()),
             "--metrics-export-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port()),
             "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port())]
    try:
        subprocess.run([str(bin_dir / "ray"), "start", "--head", "--temp-dir", temp_dir,
                        "--dashboard-host", "127.0.0.1", "--num-cpus", "2",
                        "--disable-usage-stats", *ports], env=env, check=True,
                        capture_output=True, timeout=120)
        submit = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
             "--working-dir", str(ROOT), "--", "python", "tune/robustness_sweep.py",
             "--smoke-test", "--grid", str(grid_file), "--only",
             "schedule.variant=dsae,ts_dsae", "--name", "job", "--storage",
             str(tmp_path / "sweeps"), "--out", str(tmp_path / "results"),
             "--tracking-uri", mlflow_server.uri, "--experiment", "sweeps-job",
             "--cpus-per-worker", "0.45"],
            env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=900)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
        assert "succeeded" in submit.stdout + submit.stderr
    finally:
        _kill_ray_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    client = mlflow_server.client()
    exp = client.get_experiment_by_name("sweeps-job")
    parent = client.search_runs([exp.experiment_id], "tags.`tsdsae.role` = 'sweep'")[0]
    files = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/summary.md" in files
    assert any(f.startswith("report/robustness-") and f.endswith(".png") for f in files)
    assert (tmp_path / "results" / "job" / "summary.md").exists()


def test_local_dataset_paths_reach_workers_as_absolute_paths(tmp_path, monkeypatch):
    from tsdsae.config import apply_overrides, debug
    from tsdsae.ray_train import resolve_locations

    monkeypatch.chdir(tmp_path)
    cfg = resolve_locations(apply_overrides(debug(), {"data.uri": "data/dm"}))
    assert cfg.data.uri == str(tmp_path / "data" / "dm")
    assert resolve_locations(debug()).data.uri == "toy"
    args = sweep_mod.build_parser().parse_args(["--data", "data/dm", "--data", "s3://b/p"])
    assert sweep_mod._sweep_settings(args)[1] == [str(tmp_path / "data" / "dm"), "s3://b/p"]


# Waits for every image and for every audio element's metadata (or its error) and reports them.
PAGE_CHECK = """(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.complete ? null :
      new Promise(r => { i.onload = r; i.onerror = r; })));
  const audios = [...document.querySelectorAll('audio')];
  const sounds = await Promise.all(audios.map(a => new Promise(r => {
    const done = ok => r({file: a.dataset.file, ok: ok, duration: a.duration,
                          error: a.error ? a.error.code : null});
    if (a.readyState >= 1) return done(true);
    a.addEventListener('loadedmetadata', () => done(true));
    a.addEventListener('error', () => done(false));
    setTimeout(() => done(false), 20000);
  })));
  return {sounds: sounds, images: imgs.map(i => ({alt: i.alt, width: i.naturalWidth})),
          figures: document.querySelectorAll('img.figure').length,
          links: [...document.querySelectorAll('a[download]')].map(a => a.getAttribute('href')),
          text: document.body.innerText};
})()"""


def test_report_page_plays_and_shows_everything_in_a_browser(smoke, chromium):
    out, root = smoke
    page = Path(out["report"]["report_html"])
    assert page.name == "report.html" and page.parent == Path(out["results"])
    shot = page.with_name("report-screenshot.png")
    seen = chromium.inspect(page.as_uri(), PAGE_CHECK, screenshot=shot)
    wavs = sorted(p.name for p in (page.parent / "report_files").glob("*.wav"))
    # inputs A and B, then recon / global swap / local swap of each of the 4 models
    assert len(wavs) == 2 + 4 * 3
    assert sorted(s["file"] for s in seen["sounds"]) == wavs          # one player per file
    assert all(s["ok"] and s["duration"] > 0.5 for s in seen["sounds"]), seen["sounds"]
    assert len(seen["images"]) == len(wavs) + seen["figures"] and seen["figures"] >= 1
    assert all(img["width"] > 0 for img in seen["images"]), seen["images"]
    assert all((page.parent / href).is_file() for href in seen["links"])
    assert len(seen["links"]) == len(wavs)
    text = seen["text"]
    assert "melody of A, instrument of B" in text and "melody of B, instrument of A" in text
    assert "scored on the test split" in text
    for label in ("DSAE", "DSAE-freeze", "TS-DSAE w/o reg", "TS-DSAE"):
        assert f"{label}, z_dim" in text
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_experiment_opens_in_the_runs_view_with_descriptions(smoke, mlflow_server):
    out, _ = smoke
    client = mlflow_server.client()
    parent = client.get_run(out["parent_run_id"])
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "report/report.html" in exp.tags["mlflow.note.content"]
    note = parent.data.tags["mlflow.note.content"]
    assert "| TS-DSAE |" in note and "report/report.html" in note
    files = {f.path for f in client.list_artifacts(out["parent_run_id"], "report")}
    assert "report/report.html" in files and "report/report_files" in files
    line = sweep_mod.ProgressPrinter(mlflow_server.uri, out["parent_run_id"]).line()
    assert line.count(" done") == 5 and "stage 1 (shared)" in line and "ts_dsae" in line
    screen = sweep_mod.final_screen(out, 60.0)
    assert f"#/experiments/{exp.experiment_id}/runs" in screen
    assert str(out["report"]["report_html"]) in screen and "Model training" in screen


def test_packed_sweep_trains_seeds_and_variants_in_packs_with_one_child_run_each(
        smoke, mlflow_server, tmp_path_factory):
    """--pack 8 over every variant and two seeds: one Tune trial, two jobs of one trainer each
    (the two shared stage 1s beside the two DSAE runs, then the six stage 2s); each run still
    has its own child run (grid tags, per-epoch metrics, evaluation, figures), and seed 831's
    runs equal the same runs trained alone (the smoke sweep's) exactly."""
    out, root = smoke
    grid = tmp_path_factory.mktemp("grid2") / "two_seeds.yaml"
    grid.write_text(GRID.replace("seed: [831]", "seed: [831, 277]"))
    packed = sweep_mod.run_sweep(_args(grid, root, mlflow_server.uri, "packed", "--pack", "8"))
    assert packed["errors"] == 0 and packed["runs"] == 8
    sweeps = root / "sweeps" / "packed"
    assert len(list((sweeps / "tune" / "packed").glob("trial_*"))) == 1
    client = mlflow_server.client()
    children = _children(client, packed["parent_run_id"])
    trials = [r for r in children if r.data.tags.get("tsdsae.role") == "trial"]
    shared = [r for r in children if r.data.tags.get("tsdsae.role") == "shared_stage_1"]
    assert len(trials) == 8 and len(shared) == 2
    for run in shared:
        assert run.info.status == "FINISHED"
        assert run.data.tags["tsdsae.pack"].endswith("-stage1.0")
        assert run.data.tags["tsdsae.pack_size"] == "4"
    for run in trials:
        first = run.data.tags["grid.schedule.variant"] == "dsae"
        assert run.data.tags["tsdsae.pack"].endswith("-stage1.0" if first else "-stage2.1")
        assert run.data.tags["tsdsae.pack_size"] == ("4" if first else "6")
        assert run.info.status == "FINISHED" and run.data.tags["grid.seed"] in ("831", "277")
        assert {"eval_pre_swap", "eval_gswap", "eval_lswap"} <= set(run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "stage")) == (3 if first else 1)
        files = {f.path for f in client.list_artifacts(run.info.run_id, "figures")}
        assert {"figures/swap_grid.png", "figures/swaps"} <= files, files
    seed_831 = {r.data.tags["grid.schedule.variant"]: Path(r.data.tags["tsdsae.run_dir"])
                for r in trials if r.data.tags["grid.seed"] == "831"}
    assert len(seed_831) == 4
    for variant, location in seed_831.items():
        a = json.loads((location / "result.json").read_text())
        b = json.loads(next((root / "sweeps" / "smoke" / "runs").glob(f"*-{variant}")).joinpath(
            "result.json").read_text())
        assert a["best_val"] == b["best_val"], variant
        assert a["best_epoch"] == b["best_epoch"] and a["epochs_run"] == b["epochs_run"]
        assert a["eval"]["gswap"] == b["eval"]["gswap"], variant
