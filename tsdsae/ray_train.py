"""Ray Train: the one trainer (tsdsae.trainer.Trainer) inside Ray workers, one DDP job per stage.

Functions are named by the process they run in (Ray's Train/Tune interop pattern):

    train_loop_per_worker(config)   every worker: one job (tsdsae.runs.Job: one stage of one run,
                                    or of a pack of runs) as one DDP rank of the trainer
    run_job(job, ...)               the driver: one TorchTrainer for one job
    train_driver_fn(config)         the driver: a run's jobs in order (tsdsae.runs.run_jobs), then
                                    the evaluation of its best checkpoint; returns its summary
    tune/ (next)                    a Ray Tune Tuner over these

1. Data: every worker loads the dataset and trains on its part of every global batch
   (tsdsae.trainer.batch_parts, Ranks): the update is the gradient of the global batch's mean
   loss whatever the number of workers.
2. One DDP job per stage. Stage 2 starts from stage 1's last.pt, takes the informed-prior
   snapshot, sets the stage-2 trainable set, and only then wraps the model in DDP.
3. Checkpoints and resume: rank 0 writes the run folder's last.pt, best.pt and stage markers
   (tsdsae.runs), exactly as one process does; every rank reports each epoch (a barrier). A
   restarted worker group, a rerun, or a run first trained on one process all continue from
   the run's own last.pt: one resume rule.
4. Tracking: the driver opens the MLflow run (tsdsae.tracking), rank 0 logs each epoch, the
   driver logs the evaluation, a reconstruction PNG and the best checkpoint.

A rerun with the same name skips finished stages (their markers), resumes an unfinished one, and
returns the stored summary when the run is complete.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from tsdsae import checkpoint, tracking
from tsdsae.config import PRESETS, RunConfig, apply_overrides
from tsdsae.runs import (DIVERGED, RESULT, Job, RunFolder, pending,
                         resolve_locations, run_jobs)
from tsdsae.train_step import keep_freed_memory
from tsdsae.progress import RunWatcher, write_progress
from tsdsae.trainer import Trainer, TrainingDiverged, load_data

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Options of the driver


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """How the driver runs a training on Ray. Not part of the model's configuration, so neither
    an MLflow param nor a checkpoint field.

    num_workers      data-parallel workers (DDP ranks)
    use_gpu          one GPU per worker (NCCL); else CPU workers (gloo). On Ray this, not the
                     config's `device`, places the model
    cpus_per_worker  Ray CPU resources per worker (fractions let 2 workers share 1 CPU)
    gpus_per_worker  with use_gpu: the GPU share of a worker; a fraction packs several small
                     trials on one GPU (a sweep's --gpus-per-trial 0.25 puts 4 on each)
    threads          torch threads per worker; 0 = max(1, int(cpus_per_worker))
    max_failures     worker-group restarts per stage job (FailureConfig); -1 = unlimited
    parent_run_id    MLflow run to nest this run's run under (a sweep's run)
    evaluate         evaluate the best checkpoint and log it at the end
    progress         show the run's progress line (time left) on the driver's console
                     (RunWatcher); a collapse warning is printed and tagged either way
    page             with evaluate: also write the run's page (tsdsae.tracking.write_page)
    start            a run folder this run's stage 2 starts from (a sweep's shared stage 1,
                     under the same checkpoint root); "": the run trains every stage itself
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    threads: int = 0
    max_failures: int = 3
    parent_run_id: str = ""
    evaluate: bool = True
    progress: bool = False
    page: bool = False
    start: str = ""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers={self.num_workers} must be >= 1")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker} must be > 0")
        if not 0 < self.gpus_per_worker <= 1:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker} must be in (0, 1]")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0 (0 = from cpus_per_worker)")
        if self.max_failures < -1:
            raise ValueError(f"max_failures={self.max_failures} must be >= -1 (-1 = unlimited)")

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.cpus_per_worker))


OPTION_KEYS = tuple(f.name for f in dataclasses.fields(RayOptions))


def split_config(config: Mapping[str, Any]) -> tuple[RunConfig, RayOptions]:
    """A driver config -> (RunConfig, RayOptions).

    `config` holds RayOptions keys, optionally "run_config" (a RunConfig) or "preset" (a name in
    tsdsae.config.PRESETS, default "paper") as the base, and dotted config keys applied over it
    (the form of a Tune param space).
    """
    config = dict(config)
    base = config.pop("run_config", None)
    preset = config.pop("preset", "paper")
    if base is None:
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r}: choose one of {sorted(PRESETS)}")
        base = PRESETS[preset]()
    options = {k: config.pop(k) for k in OPTION_KEYS if k in config}
    if options.get("parent_run_id") is None:
        options["parent_run_id"] = ""
    return apply_overrides(base, config), RayOptions(**options)


def runtime_env() -> dict:
    """The job-level Ray runtime_env for `ray.init`: when tsdsae runs from a source checkout
    rather than an installed package, its root goes on the workers' PYTHONPATH (Ray's workers
    and the Train controller unpickle tsdsae objects and need to import it). Process-wide
    allocator settings are not here: see WORKER_ENV."""
    import tsdsae

    env = {}
    root = str(Path(tsdsae.__file__).resolve().parents[1])
    if "site-packages" not in root and "dist-packages" not in root:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": env}


def init_ray(address: str | None = None, worker_logs: bool = True) -> None:
    """Connect to the Ray cluster at `address` (default: RAY_ADDRESS, else start a local one)
    with runtime_env(). `worker_logs` off: what Ray's processes print stays in Ray's log files,
    and so does Ray's start-up note on token authentication (on by default for a local Ray)."""
    import ray

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.WARNING if worker_logs else logging.ERROR)
    ray.init(address=address, runtime_env=runtime_env(), log_to_driver=worker_logs,
             logging_level=logging.WARNING)


# The Train workers' own environment (RunConfig.worker_runtime_env, merged over the job's), and
# only theirs: MALLOC_ARENA_MAX=1. Ray Train runs the training loop in a thread of the worker
# process, and glibc serves other threads from separate arenas, which do not keep freed
# activations the way the main heap does under `keep_freed_memory`: the same step measured
# 6-8 % slower in a thread than in a main thread, and one arena, set before the threads exist,
# removed the difference. Ray's other processes (idle workers, the Train controller, Tune
# trials) keep glibc's defaults.
WORKER_ENV = {"env_vars": {"MALLOC_ARENA_MAX": "1"}}


# ---------------------------------------------------------------------------------------------
# Worker side


EpochCallback = Callable[[dict, int], None]

def configure_device(device: torch.device) -> None:
    """GPU: TF32 matmuls and convolutions. Their rounding (about 1e-3 relative) is far below the
    sampling noise of the objective; AMP is not used because the KL terms (variance ratios and
    logs of small scales, KL_v near 1e-3) are where half precision would change results."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _load_worker_data(cfg: RunConfig, device: torch.device):
    data = load_data(cfg.data)
    if device.type == "cuda":
        # Pinned host memory: the one host-to-device copy of each split is a fast DMA.
        for split in data.splits.values():
            if split.in_memory:
                split.features, split.mask = split.features.pin_memory(), split.mask.pin_memory()
    return data


def _worker_setup(config: dict) -> tuple[int, int, torch.device]:
    """A Ray Train worker's rank, world size and device; its torch threads (config "threads"),
    the device's settings and, on CPU, the allocator setting for training steps."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    torch.set_num_threads(int(config.get("threads", 1)))
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    configure_device(device)
    if device.type == "cpu":
        keep_freed_memory()   # process-wide allocator setting for CPU steps (see its docstring)
    return ctx.get_world_rank(), ctx.get_world_size(), device


def train_loop_per_worker(config: dict) -> None:
    """One job (tsdsae.runs.Job) on one Ray Train worker: the trainer of its members as this
    rank, each member resumed by the one rule (its last.pt, else the job's start).

    config: job, tracking_uri and mlflow_run_ids (one per member, or None), threads, use_gpu,
    epoch_callbacks (callables `f(record, rank)` run on every rank after each epoch of each
    member, after it is logged; see train_driver_fn).
    """
    import ray.train

    job: Job = config["job"]
    rank, world_size, device = _worker_setup(config)
    trainer = Trainer(job.members, data=_load_worker_data(job.members[0], device), device=device,
                      progress=False, rank=rank, world_size=world_size, until=job.until,
                      starts=job.starts)
    trainer.resume()
    run_ids = config.get("mlflow_run_ids") or [None] * len(job.members)
    for run, run_id in zip(trainer.runs, run_ids):
        tracker = tracking.attach(config.get("tracking_uri"), run_id, active=rank == 0)
        if not run.done:
            # One point per worker-group start: restarts and resumes show in the run's history.
            tracker.log_metrics({"start_epoch": run.epoch}, step=run.epoch)
        run.callbacks.append(tracker)
        run.callbacks += [(lambda record, cb=cb: cb(record, rank))
                          for cb in config.get("epoch_callbacks") or ()]
        if rank == 0:
            run.callbacks.append(lambda record, run=run: write_progress(run))

    def report(records: list[dict]) -> None:      # every rank: keeps the ranks' epochs in step
        ray.train.report({"epoch": max(r["epoch"] for r in records) if records else -1,
                          "runs_training": sum(not r.done for r in trainer.runs)})

    try:
        trainer.fit(resume=False, after_epoch=report)
    except TrainingDiverged:
        # Not raised: Ray would restart the worker group from the last checkpoint and diverge
        # again. Rank 0 leaves the message for the driver; every rank ends here.
        if rank == 0:
            for run in trainer.runs:
                if run.diverged:
                    run.folder.write_json(DIVERGED, {"message": run.diverged.split("; ")[0]})


# ---------------------------------------------------------------------------------------------
# Driver side


def scaling_config(options: RayOptions):
    """ray.train.ScalingConfig of a stage or pack job: the workers and each one's CPUs (and GPU
    share)."""
    import ray.train

    resources = {"CPU": options.cpus_per_worker}
    if options.use_gpu:
        resources["GPU"] = options.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=options.num_workers, use_gpu=options.use_gpu,
                                   resources_per_worker=resources)


def run_job(job: Job, options: RayOptions, trackers: Sequence[tracking.Tracker],
            callbacks: list | None = None, epoch_callbacks: Sequence[EpochCallback] = ()):
    """Fit the TorchTrainer of one job (Ray run `stage_<k>` in its first member's folder).
    `trackers`: one per member (rank 0 logs each member's epochs to it); `callbacks`:
    ray.train.UserCallback objects; `epoch_callbacks`: see train_loop_per_worker. The members'
    configs must hold driver-resolved locations (tsdsae.runs.resolve_locations). Returns
    ray.train.Result; raises ray.train.TrainingFailedError when training failed."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path, filesystem = RunFolder.of(job.members[0]).store.arrow_filesystem()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job, "tracking_uri": trackers[0].uri,
            "mlflow_run_ids": [t.run_id for t in trackers],
            "threads": options.torch_threads, "use_gpu": options.use_gpu,
            "epoch_callbacks": list(epoch_callbacks)},
        scaling_config=scaling_config(options),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=storage_path, storage_filesystem=filesystem,
            callbacks=callbacks, worker_runtime_env=WORKER_ENV,
            # Train's own INFO lines (worker-group starts, reports) stay in Ray's log files.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures)))
    return trainer.fit()


def check_job(job: Job) -> None:
    """After a job: raise TrainingDiverged for a member whose loss became NaN or inf (naming the
    last good checkpoint, which is kept), RuntimeError for one without its stage marker."""
    for cfg in job.members:
        folder = RunFolder.of(cfg)
        diverged = folder.read_json(DIVERGED)
        if diverged is not None:
            folder.store.delete(DIVERGED)
            kept = (f"the last good checkpoint {folder.last} is kept"
                    if folder.store.exists("last.pt") else "no checkpoint was written before it")
            raise TrainingDiverged(f"{diverged.get('message')}; {kept}; lower optim.lr or check "
                                   "the data for extreme values")
        if folder.marker(job.stage) is None:
            raise RuntimeError(f"{cfg.name}: the stage {job.stage} job ended without finishing "
                               f"the stage; rerun to resume it from {folder.last}")


def train_driver_fn(config: Mapping[str, Any], callbacks: list | None = None,
                    epoch_callbacks: Sequence[EpochCallback] = ()) -> dict:
    """Train one run on Ray: each stage that has no marker yet as its own DDP job, in order,
    then evaluate.

    `config`: see split_config (dotted config keys over a preset, or a run_config, plus RayOptions
    keys; `parent_run_id` nests the MLflow run under a sweep's run; `start` forks stage 2 from a
    shared stage 1). The run's `name` decides its folder, so distinct runs need distinct names.
    `callbacks` go to every job's TorchTrainer (ray.train.UserCallback); `epoch_callbacks` run on
    every worker after each epoch as `f(record, rank)` (picklable; an exception there fails the
    worker like any training error). Starts a local Ray with runtime_env() unless Ray is
    initialised. Returns the summary: run_dir, best_checkpoint, last_checkpoint, epochs_run,
    best_epoch, best_val, stopped_early, eval (LDA F1 scores), mlflow_run_id, tracking_uri. A
    finished run returns its stored summary without training. Raises TrainingDiverged, or
    ray.train.TrainingFailedError after the job's retries.
    """
    import ray

    cfg, options = split_config(config)
    cfg = resolve_locations(cfg)
    folder = RunFolder.of(cfg)
    stored = folder.read_json(RESULT)
    if stored is not None:
        return stored
    if options.evaluate:
        from tsdsae.evaluate import check_eval_split
        check_eval_split(cfg)                  # before any training, not after it
    jobs = run_jobs(cfg, options.start or None)
    todo = [job for job in jobs if pending(job)[0]]
    if todo and not ray.is_initialized():
        init_ray()
    tracker = tracking.start_run(
        cfg, tracking.run_key(folder.uri), parent_run_id=options.parent_run_id or None,
        tags={"tsdsae.run_dir": folder.uri, "tsdsae.num_workers": options.num_workers,
              "tsdsae.use_gpu": options.use_gpu})
    try:
        with RunWatcher(cfg, folder.uri, tracker, show=options.progress,
                        every=2.0 if options.progress else 15.0):
            for job in todo:
                run_job(job, options, [tracker], callbacks, epoch_callbacks)
                check_job(job)
                marker = folder.marker(job.stage)
                logger.info("%s: stage %d finished at epoch %d, val loss %.4f%s", cfg.name,
                            job.stage, marker.epoch, marker.val_loss, _best_text(marker))
        last = folder.marker(jobs[-1].stage)
        summary = {
            "run_dir": folder.uri, "best_checkpoint": folder.best,
            "last_checkpoint": folder.last, "epochs_run": last.epoch + 1,
            "best_epoch": last.best_epoch, "best_val": last.best_val,
            "stopped_early": last.stopped_early,
            "mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri}
        if options.evaluate:
            summary["eval"] = _evaluate_best(cfg, summary, tracker,
                                             folder.uri if options.page else None)
        folder.write_json(RESULT, summary)
    except BaseException as exc:
        tracker.fail(exc)
        raise
    tracker.finish()
    return summary


def _best_text(marker) -> str:
    """" (best 27.1 at epoch 3)" from a stage marker (nothing before the last stage)."""
    if marker.best_epoch < 0:
        return ""
    return f" (best {marker.best_val:.4f} at epoch {marker.best_epoch})"


def _evaluate_best(cfg: RunConfig, summary: dict, tracker: tracking.Tracker,
                   page_in: str | None = None) -> dict:
    """LDA F1 scores of the best checkpoint (on the driver's CPU), logged with a reconstruction
    PNG and the checkpoint file; the run's page in `page_in` when given."""
    from tsdsae.model.dsae import DSAE

    from tsdsae.evaluate import evaluation_plan

    logger.info("%s: %s", cfg.name, evaluation_plan(cfg))
    endpoint = cfg.data.endpoint_url or None
    state = checkpoint.load(summary["best_checkpoint"], "cpu", endpoint)
    model = DSAE(cfg.model)
    checkpoint.restore_model(model, state, summary["best_checkpoint"])
    threads = torch.get_num_threads()
    torch.set_num_threads(_free_cpus(threads))
    try:
        return tracking.evaluate_and_log(tracker, cfg, model, load_data(cfg.data), summary,
                                         summary["best_checkpoint"], endpoint, page_in=page_in)
    finally:
        torch.set_num_threads(threads)


def _free_cpus(at_least: int) -> int:
    """Torch threads for an evaluation on the driver: on a one-node Ray, the CPUs that Ray holds
    for nobody at this moment (the run's own workers have just ended), at least `at_least`;
    elsewhere `at_least` (free CPUs of other nodes are not this node's)."""
    import ray

    if not ray.is_initialized() or len([n for n in ray.nodes() if n.get("Alive")]) != 1:
        return at_least
    free = int(ray.available_resources().get("CPU", 0.0))
    return max(at_least, min(os.cpu_count() or 1, free))


def driver_config(cfg: RunConfig, **options) -> dict:
    """The driver config of a RunConfig plus RayOptions keys (what the CLI passes)."""
    return {"run_config": cfg, **options}


__all__ = ["RayOptions", "WORKER_ENV", "init_ray", "split_config", "train_loop_per_worker", "run_job",
           "check_job", "train_driver_fn", "driver_config", "configure_device", "runtime_env",
           "scaling_config"]
