"""Ray Train: the single-process trainer's step inside Ray workers, one DDP job per stage.

Functions are named by the process they run in (Ray's Train/Tune interop pattern):

    train_loop_per_worker(config)   every worker: one stage's epochs on its part of each global
                                    batch (tsdsae.trainer.Trainer as one rank, DDP between ranks)
    train_driver_fn(config)         the driver: one TorchTrainer per stage, in order, then the
                                    evaluation of the best checkpoint; returns the run's summary
    tune/ (next)                    a Ray Tune Tuner over train_driver_fn

1. Data: every worker loads the dataset (tsdsae.data / toy) and trains on its part of every
   global batch (tsdsae.trainer.batch_parts): the paper's batch of 128 is split across the
   workers, and each rank's gradient is weighted by its share of the batch before the sum, so
   the update is the gradient of the global batch's mean loss whatever the number of workers.
2. One DDP job per stage. Stage 1 trains the global encoder and the decoder. Stage 2 starts from
   stage 1's last checkpoint, takes the informed-prior snapshot, sets the stage-2 trainable set,
   and only then wraps the model in a fresh DDP; requires_grad never changes under a DDP wrapper.
   DSAE (one stage) is one job.
3. Checkpoints: rank 0 writes, every rank reports (ray.train.report is a barrier). One every
   `checkpoint.every` epochs and at each stage end; a retried worker group resumes from
   ray.train.get_checkpoint() (model, snapshot, optimiser, RNG, early stopping, history).
4. Tracking: the driver opens the MLflow run (tsdsae.tracking), rank 0 logs each epoch, the
   driver logs the evaluation, a reconstruction PNG and the best checkpoint.

Layout under `checkpoint.root/name` (a local folder or s3://bucket/prefix):
    stage_1/ stage_2/        Ray Train runs: epoch_NNNNNN/state.pt checkpoints and Ray's snapshot
    stage_1.json ...         written when a stage's job has finished: its last checkpoint
    best.pt                  the best-validation checkpoint of the last stage (rank 0 writes it)
    result.json              the summary of a finished run
A rerun with the same name skips finished stages, lets Ray resume an unfinished one, and returns
the stored summary when the run is complete.

Driver keys (besides dotted tsdsae.config keys, applied over `preset`, or a whole `run_config`):
see RayOptions.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from tsdsae import checkpoint, schedule, tracking
from tsdsae.config import PRESETS, RunConfig, apply_overrides
from tsdsae.packed_train import PackedTrainer
from tsdsae.storage import absolute_location, open_store, resolve_endpoint
from tsdsae.train_step import keep_freed_memory
from tsdsae.trainer import Trainer, TrainingDiverged, check_finite, load_data

STATE_FILE = "state.pt"
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
    keep_checkpoints Ray checkpoints kept per stage (the latest is always kept)
    progress         show the run's progress line (time left) on the driver's console
                     (RunWatcher); a collapse warning is printed and tagged either way
    page             with evaluate: also write the run's page (tsdsae.tracking.write_page)
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    threads: int = 0
    max_failures: int = 3
    parent_run_id: str = ""
    evaluate: bool = True
    keep_checkpoints: int = 2
    progress: bool = False
    page: bool = False

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
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints={self.keep_checkpoints} must be >= 1")

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


def run_dir(cfg: RunConfig) -> str:
    """The run's location: absolute `checkpoint.root/name` (a path or an s3:// URI)."""
    return open_store(f"{cfg.checkpoint.root.rstrip('/')}/{cfg.name}").uri


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


class BatchShare:
    """This rank's share of the current global batch (clips here / clips in the global batch):
    the state of the DDP comm hook, set before every step."""

    def __init__(self, world_size: int):
        self.weight = 1.0 / world_size


def _weighted_sum_hook(share: BatchShare, bucket):
    """DDP comm hook: sum over ranks of share_r * grad_r, i.e. the gradient of the global batch's
    mean loss even when the parts differ in size (DDP's default is the plain mean over ranks)."""
    import torch.distributed as dist

    buffer = bucket.buffer()
    buffer.mul_(share.weight)
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])


def ddp_wrap(model: torch.nn.Module, device: torch.device, share: BatchShare
             ) -> torch.nn.Module:
    """DistributedDataParallel over the parameters of `model` that require grad now, with the
    share-weighted gradient sum. The process group must exist (Ray Train sets it up)."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                  else None)
    ddp.register_comm_hook(share, _weighted_sum_hook)
    return ddp


class _Rank:
    """What makes a trainer one DDP rank: batch shares, a weighted gradient all-reduce and
    epoch sums across ranks (mixed into Trainer and PackedTrainer)."""

    def _before_train_step(self, share: float) -> None:
        self._share.weight = share

    def _sum_across_ranks(self, totals: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return totals
        import torch.distributed as dist

        totals = totals.detach().clone()
        dist.all_reduce(totals)
        return totals


class RankTrainer(_Rank, Trainer):
    """tsdsae.trainer.Trainer as one DDP rank. `wrap()` builds the DDP wrapper once the stage's
    trainable set is on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._share = BatchShare(self.world_size)

    def wrap(self) -> None:
        """Call once the stage's trainable set is on: DDP registers exactly those parameters."""
        if self.world_size == 1:
            self.step_model = self.pass_model   # a world of one: nothing to synchronise
            return
        self.step_model = ddp_wrap(self.pass_model, self.device, self._share)


class RankPackedTrainer(_Rank, PackedTrainer):
    """tsdsae.packed_train.PackedTrainer as one DDP rank: every member's batch is split across
    the ranks (each rank takes its part of each member's global batch). Every packed parameter
    gets a gradient in every step (frozen slices are masked in the optimiser), so one DDP
    wrapper serves all stages; with member passes (CPU) the stacked gradients are all-reduced
    after the members' backward instead."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._share = BatchShare(self.world_size)
        if self.world_size > 1 and not self.member_passes:
            self.step_model = ddp_wrap(self.model, self.device, self._share)

    def _reduce_member_gradients(self) -> None:
        """Member passes bypass the DDP wrapper: the stacked gradients get the same
        share-weighted sum over ranks as its comm hook computes, in one all-reduce."""
        if self.world_size == 1:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in self.model.parameters()]
        flat = _flatten_dense_tensors(grads).mul_(self._share.weight)
        dist.all_reduce(flat)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)


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
            split.features, split.mask = split.features.pin_memory(), split.mask.pin_memory()
    return data


def _read_state(ckpt, device: torch.device) -> dict:
    with ckpt.as_directory() as d:
        return checkpoint.load(str(Path(d) / STATE_FILE), device)


EpochCallback = Callable[[dict, int], None]


def _report(trainer: RankTrainer, record: dict, save: bool) -> None:
    """Every rank reports (a barrier); rank 0 writes best.pt on improvement and attaches the
    state as a Ray checkpoint when `save`."""
    import ray.train

    metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
    metrics.update(best_val=trainer.early["best_val"], best_epoch=trainer.early["best_epoch"],
                   stopped_early=trainer.should_stop())
    if trainer.rank != 0:
        ray.train.report(metrics)
        return
    if record["improved"]:
        trainer.save(trainer.best_uri)
    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save(trainer.state_dict(), str(Path(tmp) / STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch_{record['epoch']:06d}")


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
    """One stage of one run on one Ray Train worker.

    config: run_config (RunConfig), stage (1 or 2), init_checkpoint (ray.train.Checkpoint of the
    previous stage's end, or None), tracking_uri and mlflow_run_id (or None), threads, use_gpu,
    epoch_callbacks (callables `f(record, rank)` run on every rank after each epoch, before the
    epoch is logged and reported; see train_driver_fn).
    """
    import ray.train

    cfg: RunConfig = config["run_config"]
    stage = int(config["stage"])
    rank, world_size, device = _worker_setup(config)
    trainer = RankTrainer(cfg, data=_load_worker_data(cfg, device), device=device,
                          progress=False, rank=rank, world_size=world_size)
    s = cfg.schedule
    epochs = schedule.stage_epochs(s.variant, stage, s.switch_epoch, s.max_epochs)
    source = ray.train.get_checkpoint() or config.get("init_checkpoint")
    if source is not None:
        trainer.load_state_dict(_read_state(source, device), f"{source.path}/{STATE_FILE}")
    if not epochs.start <= trainer.epoch <= epochs.stop:
        raise RuntimeError(f"stage {stage} runs epochs {epochs.start}..{epochs.stop - 1} but its "
                           f"starting checkpoint ends at epoch {trainer.epoch - 1}")
    tracker = tracking.attach(config.get("tracking_uri"), config.get("mlflow_run_id"),
                              active=rank == 0)
    epoch_callbacks: Sequence[EpochCallback] = config.get("epoch_callbacks") or ()
    remaining = range(trainer.epoch, epochs.stop)
    if not remaining or trainer.should_stop():
        return
    trainer.prepare_epoch(remaining.start)   # the switch and this stage's trainable set
    trainer.wrap()                            # then a fresh DDP over exactly that set
    # One point per worker-group start: restarts and resumes show in the run's history.
    tracker.log_metrics({"start_epoch": remaining.start}, step=remaining.start)
    for epoch in remaining:
        record = trainer.run_epoch(epoch)
        try:          # every rank holds the same summed terms, so all ranks stop together
            check_finite(record, cfg.name, None)
        except TrainingDiverged as exc:
            # Not raised: Ray would restart the worker group from the last checkpoint and
            # diverge again. Rank 0 leaves the message for the driver (Result keeps only the
            # metrics of checkpoints), every rank reports once more (the barrier) and stops.
            if rank == 0:
                open_store(trainer.run_dir, trainer.endpoint).write_bytes(
                    DIVERGED_FILE, json.dumps({"message": str(exc).split("; ")[0]}).encode())
            ray.train.report({"epoch": epoch})
            return
        for callback in epoch_callbacks:
            callback(record, rank)
        tracker.log_epoch(record)
        if rank == 0:
            write_progress(trainer)
        stop = trainer.should_stop()
        last = epoch == epochs.stop - 1 or stop
        _report(trainer, record, save=last or trainer.checkpoint_due(epoch))
        if stop:
            break


def train_pack_per_worker(config: dict) -> None:
    """K runs as one pack (tsdsae.packed_train) on one Ray Train worker.

    config: run_configs (K RunConfigs), starts (per member a ray.train.Checkpoint to continue
    from, e.g. its shared stage 1, or None to start at epoch 0; all members start at one
    epoch), until (per member an epoch to stop at, or None), pack_dir (where pack.pt lives: a
    restarted or resumed job continues from it), tracking_uri and mlflow_run_ids (one per
    member, or None), threads, use_gpu. Rank 0 writes each member's best.pt / last.pt and logs
    each member's epochs to its own MLflow run.
    """
    import ray.train

    cfgs: list[RunConfig] = config["run_configs"]
    rank, world_size, device = _worker_setup(config)
    trainer = RankPackedTrainer(cfgs, data=_load_worker_data(cfgs[0], device), device=device,
                                pack_dir=config["pack_dir"], rank=rank, world_size=world_size,
                                until=config.get("until"))
    starts = config.get("starts") or [None] * len(cfgs)
    if not trainer.resume() and any(s is not None for s in starts):
        trainer.start_from([None if s is None else _read_state(s, device) for s in starts])
    trackers = [tracking.attach(config.get("tracking_uri"), run_id, active=rank == 0)
                for run_id in (config.get("mlflow_run_ids") or [None] * len(cfgs))]
    trainer.callbacks.append(lambda k, record: trackers[k].log_epoch(record))

    def report(records) -> None:
        metrics = {"epoch": trainer.epoch - 1, "members_training": trainer.k - sum(trainer.done)}
        for k, record in enumerate(records):
            if record is not None:
                metrics[f"m{k}_val_loss"] = record["val_loss"]
        ray.train.report(metrics)            # every rank: keeps the ranks' epochs in step

    trainer.fit(resume=False, save=rank == 0, after_epoch=report)


def scaling_config(options: RayOptions):
    """ray.train.ScalingConfig of a stage or pack job: the workers and each one's CPUs (and GPU
    share)."""
    import ray.train

    resources = {"CPU": options.cpus_per_worker}
    if options.use_gpu:
        resources["GPU"] = options.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=options.num_workers, use_gpu=options.use_gpu,
                                   resources_per_worker=resources)


def run_pack(cfgs: Sequence[RunConfig], options: RayOptions, pack_dir: str,
             trackers: Sequence[tracking.Tracker], starts: Sequence | None = None,
             until: Sequence[int | None] | None = None):
    """Fit the TorchTrainer of one pack (Ray run `pack` under `pack_dir`): every run in `cfgs`
    as a member (train_pack_per_worker: `starts`, per member a ray.train.Checkpoint to continue
    from or None; `until`, per member an epoch to stop at or None). Returns ray.train.Result;
    raises if training failed."""
    import ray.train
    from ray.train.torch import TorchTrainer

    endpoint = resolve_endpoint(cfgs[0].data.endpoint_url or None)
    storage_path, filesystem = open_store(pack_dir, endpoint).arrow_filesystem()
    trainer = TorchTrainer(
        train_pack_per_worker,
        train_loop_config={
            "run_configs": list(cfgs), "starts": list(starts) if starts else None,
            "until": list(until) if until else None,
            "pack_dir": pack_dir, "tracking_uri": trackers[0].uri,
            "mlflow_run_ids": [t.run_id for t in trackers],
            "threads": options.torch_threads, "use_gpu": options.use_gpu},
        scaling_config=scaling_config(options),
        run_config=ray.train.RunConfig(
            name="pack", storage_path=storage_path, storage_filesystem=filesystem,
            worker_runtime_env=WORKER_ENV,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures)))
    return trainer.fit()


def pack_markers(cfgs: Sequence[RunConfig], stage: int = 2) -> list[dict]:
    """After a pack: each member's stage_<stage>.json marker (what train_driver_fn reads to skip
    the stage), from the member's last.pt."""
    markers = []
    for cfg in cfgs:
        endpoint = cfg.data.endpoint_url or None
        last = f"{run_dir(cfg)}/last.pt"
        state = checkpoint.load(last, "cpu", endpoint)
        record = state["history"][-1]
        early = state["early"]
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float, str, bool))}
        metrics.update(best_val=early["best_val"], best_epoch=early["best_epoch"],
                       stopped_early=early["bad_epochs"] >= cfg.schedule.patience)
        markers.append({"stage": stage, "checkpoint": ray_path(last), "metrics": metrics,
                        "packed": True})
    return markers


# ---------------------------------------------------------------------------------------------
# Driver side


def stage_jobs(cfg: RunConfig) -> list[tuple[int, range]]:
    """The DDP jobs of a run, in order: (stage, its epochs). DSAE has one."""
    s = cfg.schedule
    return [(stage, schedule.stage_epochs(s.variant, stage, s.switch_epoch, s.max_epochs))
            for stage in range(1, schedule.num_stages(s.variant) + 1)]


def _storage(cfg: RunConfig, endpoint: str | None) -> tuple[str, Any]:
    return open_store(run_dir(cfg), endpoint).arrow_filesystem()


def run_stage(cfg: RunConfig, options: RayOptions, stage: int, init_checkpoint=None,
              tracker: tracking.Tracker | None = None, callbacks: list | None = None,
              epoch_callbacks: Sequence[EpochCallback] = ()):
    """Fit the TorchTrainer of one stage (Ray run `stage_<k>` under the run's location).
    Resumes that Ray run if it exists. `callbacks`: ray.train.UserCallback objects (e.g. Tune's
    TuneReportCallback); `epoch_callbacks`: see train_loop_per_worker. `cfg` must hold
    driver-resolved locations (resolve_locations). Returns ray.train.Result; raises if training
    failed."""
    import ray.train
    from ray.train.torch import TorchTrainer

    endpoint = resolve_endpoint(cfg.data.endpoint_url or None)
    storage_path, filesystem = _storage(cfg, endpoint)
    tracker = tracker or tracking.NullTracker()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "run_config": cfg, "stage": stage, "init_checkpoint": init_checkpoint,
            "tracking_uri": tracker.uri, "mlflow_run_id": tracker.run_id,
            "threads": options.torch_threads, "use_gpu": options.use_gpu,
            "epoch_callbacks": list(epoch_callbacks)},
        scaling_config=scaling_config(options),
        run_config=ray.train.RunConfig(
            name=f"stage_{stage}", storage_path=storage_path, storage_filesystem=filesystem,
            callbacks=callbacks, worker_runtime_env=WORKER_ENV,
            # Train's own INFO lines (worker-group starts, reports) stay in Ray's log files.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=options.keep_checkpoints)))
    return trainer.fit()


def resolve_locations(cfg: RunConfig) -> RunConfig:
    """The config as workers need it, resolved on the driver: AWS_ENDPOINT_URL made explicit
    (workers then need no environment for it), and a local dataset path and checkpoint root made
    absolute (Ray workers run in their own working directory, so rank 0 would write best.pt
    relative to that)."""
    updates = {}
    root = absolute_location(cfg.checkpoint.root)
    if root != cfg.checkpoint.root:
        updates["checkpoint.root"] = root
    endpoint = resolve_endpoint(cfg.data.endpoint_url or None)
    if endpoint and endpoint != cfg.data.endpoint_url:
        updates["data.endpoint_url"] = endpoint
    uri = cfg.data.uri if cfg.data.uri == "toy" else absolute_location(cfg.data.uri)
    if uri != cfg.data.uri:
        updates["data.uri"] = uri
    return apply_overrides(cfg, updates) if updates else cfg


DIVERGED_FILE = "diverged.json"    # rank 0 -> driver: a loss term became NaN or inf
PROGRESS_FILE = "progress.json"    # rank 0 -> driver: the latest epochs' records
PROGRESS_KEEP = 32                 # epochs kept in it (the collapse rule needs a few in a row)
PROGRESS_KEYS = ("epoch", "stage", "seconds", "train_loss", "train_recon", "train_kl_z",
                 "train_kl_v", "val_loss")


def write_progress(trainer: Trainer) -> None:
    """Rank 0, after each epoch: the run's last PROGRESS_KEEP epoch records (PROGRESS_KEYS) to
    the run folder's progress.json, which the driver's RunWatcher reads."""
    records = [{k: r[k] for k in PROGRESS_KEYS if k in r}
               for r in trainer.history[-PROGRESS_KEEP:]]
    open_store(trainer.run_dir, trainer.endpoint).write_bytes(
        PROGRESS_FILE, json.dumps({"records": records}).encode())


class RunWatcher:
    """The driver's view of a Ray run while its stage jobs train: a thread that reads the run
    folder's progress.json every `every` seconds and feeds each new epoch record to the progress
    line (tsdsae.trainer.epoch_bar, with tsdsae.monitor.TimeLeft; when `show`) and to
    tsdsae.monitor.CollapseWatch, whose warning is printed and tagged on `tracker`.
    Use as a context manager; the last records are read once more on exit."""

    def __init__(self, cfg: RunConfig, location: str, tracker: tracking.Tracker,
                 show: bool = True, every: float = 2.0):
        import threading

        from tsdsae.monitor import CollapseWatch, TimeLeft

        s = cfg.schedule
        self.cfg, self.tracker, self.show, self.every = cfg, tracker, show, every
        self.store = open_store(location, cfg.data.endpoint_url or None)
        self.left = TimeLeft(s.variant, s.switch_epoch, s.max_epochs)
        self.watch = CollapseWatch(s.variant, s.switch_epoch, name=cfg.name)
        self.seen = -1
        self.bar = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tsdsae-watch")

    def poll(self) -> None:
        """Read progress.json once and take in the epochs not seen yet."""
        from tsdsae.storage import StorageError
        from tsdsae.trainer import epoch_bar, show_epoch

        try:
            records = json.loads(self.store.read_bytes(PROGRESS_FILE))["records"]
        except (OSError, StorageError, ValueError, KeyError, TypeError):
            return     # not written yet, being replaced, or storage briefly unreachable: later
        for record in records if isinstance(records, list) else []:
            try:
                if int(record["epoch"]) <= self.seen:
                    continue
                self.left.update(record)
                warning = self.watch(record)
            except (KeyError, TypeError, ValueError):      # not an epoch record: skipped
                continue
            self.seen = int(record["epoch"])
            if self.show:
                if self.bar is None:
                    self.bar = epoch_bar(self.cfg, self.seen)
                show_epoch(self.bar, record, self.left)
            if warning:
                from tqdm.auto import tqdm

                tqdm.write(warning, file=sys.stderr)
                self.tracker.set_tags(self.watch.tags())

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def __enter__(self) -> "RunWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        if self.bar is not None:
            self.bar.close()


def _check_marker(marker, root: str, where: str) -> None:
    """A stage marker's checkpoint must lie under the run's checkpoint root (its own folder, or
    a sweep's shared stage 1 beside it): what a stored file says is information about these
    runs, never a pointer to somewhere else. Raises CheckpointError naming the marker."""
    path = marker.get("checkpoint") if isinstance(marker, dict) else None
    inside = ray_path(root).rstrip("/") + "/"
    if (not isinstance(path, str) or not ray_path(path).startswith(inside)
            or "/../" in f"/{ray_path(path)}/" or not isinstance(marker.get("metrics"), dict)):
        raise checkpoint.CheckpointError(
            f"{where} does not name a checkpoint under {root} ({path!r}); delete the marker to "
            "train that stage again")


def _stage_checkpoint(marker: dict, filesystem):
    import ray.train
    return ray.train.Checkpoint(marker["checkpoint"], filesystem=filesystem)


def train_driver_fn(config: Mapping[str, Any], callbacks: list | None = None,
                    epoch_callbacks: Sequence[EpochCallback] = ()) -> dict:
    """Train one run on Ray: every stage as its own DDP job, in order, then evaluate.

    `config`: see split_config (dotted config keys over a preset, or a run_config, plus RayOptions
    keys; `parent_run_id` nests the MLflow run under a sweep's run). The run's `name` decides its
    location, so distinct runs (Tune trials) need distinct names. `callbacks` go to every stage's
    TorchTrainer (ray.train.UserCallback, e.g. TuneReportCallback); `epoch_callbacks` run on
    every worker after each epoch as `f(record, rank)` (picklable; monitoring, custom logging;
    an exception there fails the worker like any training error). Starts a local Ray with
    runtime_env() unless Ray is initialised. Returns the summary: run_dir, best_checkpoint, last_checkpoint,
    epochs_run, best_epoch, best_val, stopped_early, eval (LDA F1 scores), mlflow_run_id,
    tracking_uri. A finished run returns its stored summary without training.
    """
    import ray

    cfg, options = split_config(config)
    cfg = resolve_locations(cfg)
    endpoint = cfg.data.endpoint_url or None
    location = run_dir(cfg)
    store = open_store(location, endpoint)
    if store.exists("result.json"):
        return json.loads(store.read_bytes("result.json"))
    if options.evaluate:
        from tsdsae.evaluate import check_eval_split
        check_eval_split(cfg)                  # before any training, not after it
    if not ray.is_initialized():
        ray.init(runtime_env=runtime_env())
    _, filesystem = _storage(cfg, endpoint)
    tracker = tracking.start_run(
        cfg, tracking.run_key(location), parent_run_id=options.parent_run_id or None,
        tags={"tsdsae.run_dir": location, "tsdsae.num_workers": options.num_workers,
              "tsdsae.use_gpu": options.use_gpu})
    try:
        previous, metrics = None, {}
        with RunWatcher(cfg, location, tracker, show=options.progress,
                        every=2.0 if options.progress else 15.0):
            for stage, _ in stage_jobs(cfg):
                name = f"stage_{stage}.json"
                if store.exists(name):
                    marker = json.loads(store.read_bytes(name))
                else:
                    result = run_stage(cfg, options, stage, previous, tracker, callbacks,
                                       epoch_callbacks)
                    if store.exists(DIVERGED_FILE):
                        message = json.loads(store.read_bytes(DIVERGED_FILE))["message"]
                        store.delete(DIVERGED_FILE)
                        kept = result.checkpoint or previous
                        raise TrainingDiverged(
                            f"{message}; "
                            + (f"the last good checkpoint {kept.path} is kept" if kept else
                               "no checkpoint was written before it")
                            + "; lower optim.lr or check the data for extreme values")
                    marker = {"stage": stage, "checkpoint": result.checkpoint.path,
                              "metrics": _jsonable(result.metrics)}
                    store.write_bytes(name, json.dumps(marker, indent=1).encode())
                    logger.info("%s: stage %d finished at epoch %s%s", cfg.name, stage,
                                marker["metrics"].get("epoch"), _best_text(marker["metrics"]))
                _check_marker(marker, cfg.checkpoint.root, f"{location}/{name}")
                previous, metrics = _stage_checkpoint(marker, filesystem), marker["metrics"]
        summary = {
            "run_dir": location, "best_checkpoint": f"{location}/best.pt",
            "last_checkpoint": _checkpoint_uri(previous.path, location),
            "epochs_run": int(metrics["epoch"]) + 1, "best_epoch": int(metrics["best_epoch"]),
            "best_val": metrics["best_val"], "stopped_early": bool(metrics["stopped_early"]),
            "mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri}
        if options.evaluate:
            summary["eval"] = _evaluate_best(cfg, summary, tracker,
                                             location if options.page else None)
        store.write_bytes("result.json", json.dumps(summary, indent=1).encode())
    except BaseException as exc:
        tracker.fail(exc)
        raise
    tracker.finish()
    return summary


def _best_text(metrics: Mapping[str, Any]) -> str:
    """", val loss 27.2092 (best 27.1 at epoch 3)" from a stage's last metrics."""
    text = f", val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
    if int(metrics.get("best_epoch", -1)) >= 0:
        text += f" (best {metrics['best_val']:.4f} at epoch {metrics['best_epoch']})"
    return text


def ray_path(uri: str) -> str:
    """A checkpoint location as Ray names it: S3 as "bucket/key" (the inverse of
    _checkpoint_uri), local paths as they are."""
    return uri[len("s3://"):] if uri.startswith("s3://") else uri


def _checkpoint_uri(path: str, location: str) -> str:
    # Ray gives S3 checkpoint paths as "bucket/key" (the filesystem knows the scheme).
    return f"s3://{path}" if location.startswith("s3://") and "://" not in path else path


def _jsonable(metrics: Mapping[str, Any]) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


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


__all__ = ["RayOptions", "RankTrainer", "RankPackedTrainer", "train_pack_per_worker",
           "run_pack", "pack_markers", "ray_path", "scaling_config", "BatchShare", "ddp_wrap",
           "WORKER_ENV", "split_config", "run_dir", "stage_jobs", "train_loop_per_worker",
           "run_stage", "train_driver_fn", "driver_config", "configure_device", "runtime_env"]
