"""Ray Train path: real local Ray (2 CPUs, gloo DDP), a real MLflow server, S3 over HTTP (moto)."""
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from tsdsae import checkpoint, tracking
from tsdsae.config import apply_overrides, debug, to_flat
from tsdsae.progress import RunWatcher
from tsdsae.ray_train import RayOptions, driver_config, split_config, train_driver_fn
from tsdsae.runs import PROGRESS, Job, pack_jobs, resolve_locations, run_jobs
from tsdsae.storage import open_store
from tsdsae.toy import make_toy_dataset
from tsdsae.trainer import Ranks, Trainer, batch_parts

pytestmark = pytest.mark.slow


def _debug(root, name, *overrides):
    return apply_overrides(debug(), [f"checkpoint.root={root}", f"name={name}", *overrides])


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---------------------------------------------------------------------------------------------
# Without Ray


def test_split_config_applies_dotted_keys_over_a_preset_and_separates_ray_options():
    cfg, opts = split_config({"preset": "debug", "model.z_dim": 5, "num_workers": 2,
                              "cpus_per_worker": 0.5, "parent_run_id": "abc"})
    assert cfg.model.z_dim == 5 and cfg.name == "debug"
    assert opts == RayOptions(num_workers=2, cpus_per_worker=0.5, parent_run_id="abc")
    assert opts.torch_threads == 1
    base = debug(name="x")
    cfg, opts = split_config(driver_config(base, num_workers=3))
    assert cfg == base and opts.num_workers == 3
    with pytest.raises(ValueError, match="num_workers"):
        split_config({"num_workers": 0})
    with pytest.raises(ValueError, match="unknown config key 'modle.z_dim'"):
        split_config({"modle.z_dim": 4})
    with pytest.raises(ValueError, match="preset"):
        split_config({"preset": "nope"})


def test_one_job_per_stage_and_one_for_dsae():
    cfg = debug()                                   # C = 5, 12 epochs
    jobs = run_jobs(cfg)
    assert [(j.stage, j.until, j.starts) for j in jobs] == [(1, [5], (None,)), (2, [12], (None,))]
    dsae = apply_overrides(cfg, ["schedule.variant=dsae"])
    assert [(j.stage, j.until) for j in run_jobs(dsae)] == [(1, [12])]
    # a forked stage 2 starts from the shared stage 1's folder; stage 1 is not its job
    assert [(j.stage, j.starts) for j in run_jobs(cfg, "/runs/shared")] == [(2, ("/runs/shared",))]
    # jobs of one stage merge into packs of up to `size` runs, in order
    cfgs = [apply_overrides(cfg, [f"name=r{i}"]) for i in range(5)]
    packed = pack_jobs([j for c in cfgs for j in run_jobs(c)][::2] , 2)
    assert [(j.stage, [m.name for m in j.members]) for j in packed] == [
        (1, ["r0", "r1"]), (1, ["r2", "r3"]), (1, ["r4"])]
    assert pack_jobs(run_jobs(cfg), 1) == run_jobs(cfg)
    with pytest.raises(ValueError, match="one start"):
        Job(1, (cfg,), ())


def test_every_rank_gets_one_entry_per_global_batch():
    parts = [batch_parts(10, 4, 1, 0, rank, 3) for rank in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    assert [[len(i) for i, _ in p] for p in parts] == [[2, 2, 1], [1, 1, 1], [1, 1, 0]]
    assert all(size == [4, 4, 2] for size in ([s for _, s in p] for p in parts))


def _hook_worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    share = Ranks(rank, world)
    ddp = share.wrap(model, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 3, generator=g), torch.randn(7, 1, generator=g)
    part = torch.arange(7).tensor_split(world)[rank]          # uneven: 4 and 3 clips
    share.share = len(part) / 7
    torch.nn.functional.mse_loss(ddp(x[part]), y[part]).backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], out)
    dist.destroy_process_group()
    # Leave without interpreter finalisation: gloo's worker thread may still be releasing the
    # last all-reduce's work object, which needs the GIL; during finalisation that thread exits
    # and the process aborts ("terminate called without an active exception", seen in about 1
    # run in 5; the core dump shows ~AsyncWork in ProcessGroupGloo's run loop). The result file
    # is closed by now, so nothing is lost.
    os._exit(0)


def test_weighted_all_reduce_gives_the_global_batch_gradient(tmp_path):
    """Uneven parts: sum_r share_r * grad_r is the gradient of the global batch's mean loss."""
    out = tmp_path / "grads.pt"
    torch.multiprocessing.spawn(_hook_worker, args=(2, str(tmp_path / "rdv"), str(out)), nprocs=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 3, generator=g), torch.randn(7, 1, generator=g)
    torch.nn.functional.mse_loss(model(x), y).backward()
    for a, b in zip(torch.load(out, weights_only=True), model.parameters()):
        torch.testing.assert_close(a, b.grad)


def test_cli_lists_the_ray_options_and_rejects_bad_ones():
    out = subprocess.run([sys.executable, "-m", "tsdsae.train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--num-workers" in out and "--use-gpu" in out and "--address" in out
    bad = subprocess.run([sys.executable, "-m", "tsdsae.train", "--preset", "debug",
                          "--num-workers", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "num_workers" in bad.stderr


# ---------------------------------------------------------------------------------------------
# On Ray


class RecordAllocatorEnv:
    """An epoch callback writing each rank's MALLOC_ARENA_MAX to `folder`/rank<r>."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def __call__(self, record: dict, rank: int) -> None:
        os.makedirs(self.folder, exist_ok=True)
        Path(self.folder, f"rank{rank}").write_text(os.environ.get("MALLOC_ARENA_MAX", "unset"))


def _job_env_fn():
    return os.environ.get("MALLOC_ARENA_MAX")


def test_two_gloo_workers_match_a_single_process_run(tmp_path, ray_cluster, mlflow_server,
                                                     monkeypatch):
    """The debug preset, TS-DSAE with stage 2 from epoch 2: two DDP workers splitting each global
    batch give the single process's losses up to sampling noise; MLflow gets one run with the
    dotted params, each epoch once, the evaluation, a PNG and the checkpoint. The checkpoint root
    is relative to the driver's working directory (Ray's workers run in another one): best.pt
    lands under the driver's root."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # RecordAllocatorEnv
    experiment = f"ray-{uuid.uuid4().hex[:8]}"
    monkeypatch.chdir(tmp_path)
    cfg = _debug("ray", "two", "schedule.switch_epoch=2", "schedule.max_epochs=4",
                 "tracking.enabled=true", f"tracking.uri={mlflow_server.uri}",
                 f"tracking.experiment={experiment}")
    c = cfg.data
    data = make_toy_dataset(c.toy_clips, c.toy_seconds, c.toy_instruments, seed=c.toy_seed)
    single = Trainer(apply_overrides(cfg, [f"checkpoint.root={tmp_path / 'single'}"]), data=data,
                     progress=False)
    single.fit()

    summary = train_driver_fn(driver_config(cfg, num_workers=2, cpus_per_worker=1),
                              epoch_callbacks=[RecordAllocatorEnv(tmp_path / "env")])
    assert summary["epochs_run"] == 4 and summary["run_dir"] == str(tmp_path / "ray" / "two")
    # The allocator setting reaches the Train workers only (not the job's other processes).
    assert sorted(p.name for p in (tmp_path / "env").iterdir()) == ["rank0", "rank1"]
    assert {p.read_text() for p in (tmp_path / "env").iterdir()} == {"1"}
    assert ray_cluster.get(ray_cluster.remote(_job_env_fn).remote()) is None
    assert summary["best_checkpoint"] == str(tmp_path / "ray" / "two" / "best.pt")
    best = checkpoint.load(summary["best_checkpoint"])
    assert best["epoch"] == summary["best_epoch"] and best["stage"] == 2
    assert set(summary["eval"]) >= {"pre_swap", "gswap", "lswap"}

    client = mlflow_server.client()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "two"
    # Params as the workers ran them: locations resolved on the driver (an absolute root).
    assert run.data.params == {k: str(v) for k, v in to_flat(resolve_locations(cfg)).items()}
    assert run.data.params["checkpoint.root"] == str(tmp_path / "ray")
    assert run.data.tags["tsdsae.num_workers"] == "2"
    # Measured: loss and recon within 0.4 %, the small KL terms within 0.003 (sampling noise:
    # each rank draws its own noise and swap permutation for its part of the batch).
    for key, tolerance in (("train_loss", {"rel": 0.01}), ("val_loss", {"rel": 0.01}),
                           ("train_recon", {"rel": 0.01}), ("train_kl_z", {"abs": 0.01}),
                           ("train_kl_v", {"abs": 0.01}), ("val_kl_v", {"abs": 0.01})):
        logged = _history(client, run.info.run_id, key)
        assert [s for s, _ in logged] == [0, 1, 2, 3], key
        expected = [h[key] for h in single.run.history]
        assert [v for _, v in logged] == pytest.approx(expected, **tolerance), key
    assert [v for _, v in _history(client, run.info.run_id, "stage")] == [1, 1, 2, 2]
    assert [s for s, _ in _history(client, run.info.run_id, "train_gswap_v")] == [2, 3]
    assert run.data.metrics["eval_pre_swap"] == summary["eval"]["pre_swap"]
    artifacts = {a.path for d in ("figures", "checkpoint")
                 for a in client.list_artifacts(run.info.run_id, d)}
    assert artifacts == {"figures/reconstructions.png", "checkpoint/best.pt"}

    # Rank 0 leaves the latest epochs in progress.json; the driver's watcher reads them.
    location = Path(summary["run_dir"])
    progress = json.loads((location / PROGRESS).read_text())["records"]
    assert [r["epoch"] for r in progress] == [0, 1, 2, 3]
    assert [r["stage"] for r in progress] == [1, 1, 2, 2]
    watcher = RunWatcher(resolve_locations(cfg), str(location), tracking.NullTracker(),
                         show=False)
    watcher.poll()
    assert watcher.seen == 3 and watcher.left.seconds_left() == 0 and watcher.watch.tags() == {}

    # Each stage left its marker; the stage-2 job continued the run's own last.pt.
    assert json.loads((location / "stage_1.json").read_text())["epoch"] == 1
    assert json.loads((location / "stage_2.json").read_text())["epoch"] == 3
    final = checkpoint.load(summary["last_checkpoint"])
    assert final["epoch"] == 3 and [h["stage"] for h in final["history"]] == [1, 1, 2, 2]
    assert all(torch.equal(v, best["snapshot"][k]) for k, v in final["snapshot"].items())

    # A rerun of a finished run returns its summary: no training, no second MLflow run.
    again = train_driver_fn(driver_config(cfg, num_workers=2, cpus_per_worker=1))
    assert again == json.loads(json.dumps(summary))
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id]


def test_a_run_started_on_one_process_continues_on_two_ray_workers(tmp_path, ray_cluster):
    """One resume rule: a run trained on one process up to epoch 2 (into stage 2, its last.pt and
    stage-1 marker written) is continued by `--num-workers 2` from that last.pt: the stage-1 job
    is skipped, the stage-2 job trains epoch 3 only, and the history holds every epoch once."""
    cfg = _debug(tmp_path, "moved", "schedule.switch_epoch=2", "schedule.max_epochs=4",
                 "checkpoint.every=1")
    here = Trainer(cfg, progress=False, until=[3])
    here.fit()
    assert here.run.epoch == 3 and (tmp_path / "moved" / "stage_1.json").exists()
    summary = train_driver_fn(driver_config(cfg, num_workers=2, cpus_per_worker=1,
                                            evaluate=False))
    assert summary["epochs_run"] == 4
    final = checkpoint.load(summary["last_checkpoint"])
    assert [h["epoch"] for h in final["history"]] == [0, 1, 2, 3]
    assert [h["val_loss"] for h in final["history"][:3]] == [h["val_loss"]
                                                            for h in here.run.history]
    assert not (tmp_path / "moved" / "stage_1").exists()       # no stage-1 job ran


def _upload(folder: Path, uri: str, endpoint: str) -> None:
    store = open_store(uri, endpoint)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            store.upload_file(path, path.relative_to(folder).as_posix())


class KillWorker:
    """An epoch callback that SIGKILLs the worker process of `rank` after each epoch in
    `epochs`, once per epoch (a marker file in `marker_dir` remembers it across restarts)."""

    def __init__(self, rank: int, epochs: tuple[int, ...], marker_dir: Path):
        self.rank, self.epochs, self.marker_dir = rank, epochs, str(marker_dir)

    def __call__(self, record: dict, rank: int) -> None:
        if rank != self.rank or record["epoch"] not in self.epochs:
            return
        try:
            open(Path(self.marker_dir) / f"killed-{record['epoch']}", "x").close()
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


def test_worker_failures_in_stage_two_resume_with_s3_storage(tmp_path, ray_cluster, s3_server,
                                                             mlflow_server, small_dmelodies,
                                                             capsys):
    """Shards and checkpoints on S3 over HTTP. Rank 1's worker process is killed after epoch 3
    (stage 2): the worker group restarts from the epoch-2 checkpoint. It is killed again after
    epoch 4, beyond max_failures=1: the run stops; rerunning the same command resumes. One MLflow
    run, each epoch logged once, and the snapshot is bitwise the global encoder at the switch."""
    import ray.cloudpickle
    import ray.train

    from tsdsae.train import build_parser, config_from_args, main

    # Workers cannot import this test module: ship KillWorker by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    bucket = s3_server.make_bucket("ray")
    _upload(Path(small_dmelodies), f"s3://{bucket}/data/small", s3_server.endpoint_url)
    experiment = f"ray-s3-{uuid.uuid4().hex[:8]}"
    argv = ["--preset", "debug", "--data", f"s3://{bucket}/data/small", "--model", "ts_dsae",
            "--name", "s3run", "--endpoint-url", s3_server.endpoint_url, "--num-workers", "2",
            "--max-failures", "1", "--quiet", f"checkpoint.root=s3://{bucket}/runs",
            "checkpoint.every=1", "schedule.switch_epoch=2", "schedule.max_epochs=6",
            "tracking.enabled=true", f"tracking.uri={mlflow_server.uri}",
            f"tracking.experiment={experiment}"]
    cfg = config_from_args(build_parser().parse_args(argv))
    with pytest.raises(ray.train.TrainingFailedError):
        train_driver_fn(driver_config(cfg, num_workers=2, cpus_per_worker=1, max_failures=1),
                        epoch_callbacks=[KillWorker(1, (3, 4), tmp_path)])
    assert (tmp_path / "killed-3").exists() and (tmp_path / "killed-4").exists()
    client = mlflow_server.client()
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FAILED"
    # Rank 0 logs each epoch before the report barrier; whether it logs epoch 4 before the
    # controller stops it after rank 1's death is a race.
    logged = [s for s, _ in _history(client, run.info.run_id, "stage")]
    assert logged[:4] == [0, 1, 2, 3] and logged[4:] in ([], [4])

    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert f"results: checkpoints in s3://{bucket}/runs/s3run" in out
    assert summary["epochs_run"] == 6 and summary["mlflow_run_id"] == run.info.run_id
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    for key in ("stage", "train_loss", "val_loss", "train_gswap_v"):
        steps = [s for s, _ in _history(client, run.info.run_id, key)]
        assert steps == sorted(set(steps)) and steps[-1] == 5, (key, steps)
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # The CLI's run ends with its page, uploaded to the run folder and logged to MLflow.
    page = summary["eval"]["page"]
    assert page == f"s3://{bucket}/runs/s3run/report/report.html"
    report = open_store(f"s3://{bucket}/runs/s3run/report", s3_server.endpoint_url)
    assert b"<audio" in report.read_bytes("report.html")
    assert json.loads(report.read_bytes("scores.json"))["gswap"] == summary["eval"]["gswap"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {
        "report/report.html", "report/scores.json"}
    # Worker groups started at: stage 1 (0), stage 2 (2), the retry after the kill after epoch
    # 3, the rerun after the kill after epoch 4. Each continues the run's own last.pt (written
    # every epoch here, by rank 0 before the epoch callbacks run): 4 and 5, or one epoch
    # earlier when the worker group was stopped before rank 0's write landed.
    starts = [s for s, _ in _history(client, run.info.run_id, "start_epoch")]
    assert starts[:2] == [0, 2] and len(starts) == 4, starts
    assert starts[2] in (3, 4) and starts[3] in (4, 5), starts

    store = open_store(f"s3://{bucket}/runs/s3run", s3_server.endpoint_url)
    assert {"best.pt", "last.pt", "result.json", "stage_1.json", "stage_2.json"} <= set(
        store.list())
    assert json.loads(store.read_bytes("stage_1.json"))["epoch"] == 1
    endpoint = s3_server.endpoint_url
    final = checkpoint.load(summary["last_checkpoint"], endpoint_url=endpoint)
    best = checkpoint.load(summary["best_checkpoint"], endpoint_url=endpoint)
    assert final["epoch"] == 5 and [h["epoch"] for h in final["history"]] == list(range(6))
    assert all(torch.equal(v, best["snapshot"][k]) for k, v in final["snapshot"].items())
