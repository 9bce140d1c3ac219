"""The one trainer: K >= 1 runs (a single run is a pack of one), on one process or as one of N
data-parallel ranks (tsdsae.ray_train builds it inside each Ray Train worker).

Read top to bottom:
  1. data: the whole split lives in device memory as tensors (tsdsae.dataset.Split), once for
     every run of the trainer;
  2. `Run`, the state of one run: its model and Adam, its stage plan (tsdsae.schedule.plan, a
     pure function of the epoch), at the switch the informed-prior snapshot, early stopping,
     history and its folder (tsdsae.runs.RunFolder). Its epoch: reshuffled batches (its own
     order, from its seed) through tsdsae.train_step, then the validation loss;
  3. `Trainer.fit`: epoch by epoch, each run that is still training runs its epoch in turn, then
     writes best.pt (on improvement), last.pt (every `checkpoint.every` epochs, at each stage end
     and at its end) and a stage marker when a stage ends. A rerun resumes every run from its own
     last.pt and ends exactly where an uninterrupted run ends.

A run of a pack trains exactly as it would alone, bit for bit: it is the same object with the
same seeds (its epoch's random draws come from the global generator, reseeded from (seed, epoch,
rank) before its epoch, and no other run draws in between). How its passes run is chosen when
its model is built (tsdsae.model.fast_cpu.training_pass: the CPU blocks, or the plain ones).

Choices where METHOD is silent: early stopping and the best checkpoint are tracked within the last
stage only (a two-stage model's stage-2 loss has extra terms, so a stage-1 loss is not comparable
and a stage-1 model is not the model being trained); each epoch's batch order and sampling noise
are derived from (seed, epoch, rank), so resuming at an epoch boundary reproduces the run bitwise.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
from torch.distributions import Normal
from tqdm.auto import tqdm

from tsdsae import checkpoint, schedule
from tsdsae.config import DataConfig, RunConfig, to_flat
from tsdsae.dataset import Dataset, Split, batch_parts, epoch_seed
from tsdsae.model import fast_cpu
from tsdsae.model.dsae import DSAE
from tsdsae.model.layers import normal
from tsdsae.monitor import TimeLeft
from tsdsae.progress import epoch_bar, show_epoch
from tsdsae.runs import RunFolder, StageMarker
from tsdsae.train_step import build_optimizer, eval_step, train_step
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; use device=cpu")
    return torch.device(name)


def load_data(cfg: DataConfig) -> Dataset:
    """'toy' -> the synthetic dataset; anything else -> shards + manifest at that URI: every
    split in memory, or the train split streamed (tsdsae.data.open_dataset: data.stream "on",
    or "auto" with its features above data.memory_budget_mb)."""
    if cfg.uri == "toy":
        from tsdsae.toy import make_toy_dataset
        return make_toy_dataset(cfg.toy_clips, cfg.toy_seconds, cfg.toy_instruments,
                                seed=cfg.toy_seed)
    from tsdsae.data import open_dataset
    return open_dataset(cfg.uri, cfg.endpoint_url or None, cfg.stream, cfg.memory_budget_mb,
                        cfg.shuffle_buffer)


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> list[torch.Tensor]:
    """The non-empty parts of `batch_parts`: this rank's share of every global batch."""
    return [part for part, _ in batch_parts(n, batch_size, seed, epoch, rank, world_size)
            if len(part)]


RESUME_FIX = ("this run's name holds a checkpoint of another configuration: start fresh with "
              "--no-resume, or choose another --name")


class PriorCache:
    """q_snapshot(v | x) for every clip of a split, computed once at the switch: the snapshot is
    frozen and the inputs are fixed, so its posterior per clip never changes. loc/logvar (N, V)."""

    def __init__(self, model: DSAE, split: Split, batch: int = 512):
        parts = [model.informed_prior(split.features[s:s + batch], split.mask[s:s + batch])
                 for s in range(0, len(split), batch)]
        self.prior = normal(torch.cat([q.loc for q in parts]), torch.cat([q.logvar for q in parts]))

    def __call__(self, index: torch.Tensor) -> Normal:
        return self.prior.rows(index)


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or inf: the message names the run, the epoch, the term and the
    last checkpoint that was written before it (which is kept)."""


def check_finite(record: dict, run: str, last_good: str | None) -> None:
    """Raise TrainingDiverged when any train_*/val_* loss term of an epoch's `record` is not
    finite; `last_good` is the newest checkpoint written before that epoch (None: none)."""
    bad = sorted(k for k, v in record.items() if k.startswith(("train_", "val_"))
                 and isinstance(v, float) and not math.isfinite(v))
    if bad:
        kept = (f"the last good checkpoint {last_good} is kept" if last_good
                else "no checkpoint was written before it")
        raise TrainingDiverged(
            f"{run}: training diverged at epoch {record['epoch']} ({bad[0]} = "
            f"{record[bad[0]]}{', and ' + ', '.join(bad[1:3]) if len(bad) > 1 else ''}); "
            f"{kept}; lower optim.lr or check the data for extreme values")


# -- data-parallel ranks --------------------------------------------------------------------------


class Ranks:
    """This process's place among `world_size` data-parallel ranks (one process: rank 0 of 1).

    Each rank trains on its part of every global batch (batch_parts); `share` is this rank's
    part of the current global batch (clips here / clips in the batch), set before each step,
    and the gradient all-reduce weights each rank's gradient by it, so the update is the
    gradient of the global batch's mean loss whatever the number of ranks. The process group
    must exist when world_size > 1 (Ray Train sets it up)."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.share = 1.0 / world_size

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """`module` as it trains here: DistributedDataParallel over the parameters that require
        grad now (call after the stage's trainable set is on), with the share-weighted gradient
        sum; the module itself in a world of one."""
        if self.world_size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda"
                                      else None)
        ddp.register_comm_hook(self, _weighted_sum_hook)
        return ddp

    def sum(self, totals: torch.Tensor) -> torch.Tensor:
        """Per-rank sums -> sums over all ranks (one all-reduce)."""
        if self.world_size == 1:
            return totals
        import torch.distributed as dist

        totals = totals.detach().clone()
        dist.all_reduce(totals)
        return totals


def _weighted_sum_hook(ranks: Ranks, bucket):
    """DDP comm hook: sum over ranks of share_r * grad_r (DDP's default is the plain mean, wrong
    when the parts of a batch differ in size)."""
    import torch.distributed as dist

    buffer = bucket.buffer()
    buffer.mul_(ranks.share)
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])


# -- one run --------------------------------------------------------------------------------------


def _fresh_early() -> dict:
    return {"best_val": math.inf, "best_epoch": -1, "bad_epochs": 0}


class Run:
    """The state of one run: model, optimiser, stage, early stopping, history, folder.

    splits: {"train", "val"}, tsdsae.dataset.Split on `device` or a streamed split
    (tsdsae.data.stream.StreamSplit), shared with the other runs of a trainer; `until`: the epoch
    this trainer stops the run before (default: its max_epochs; a stage job's end on Ray);
    `dtype`: of the model and the batches (float64 for equivalence checks).
    """

    def __init__(self, cfg: RunConfig, splits: dict, device: torch.device,
                 ranks: Ranks | None = None, until: int | None = None,
                 dtype: torch.dtype = torch.float32):
        self.cfg, self.splits, self.device = cfg, splits, device
        self.ranks = ranks or Ranks()
        # the blocks the model is built from: tsdsae.model.fast_cpu's equal, faster ones on CPU
        self.passes = fast_cpu.training_pass(device)
        torch.manual_seed(cfg.seed)                        # deterministic initialisation
        self.model = DSAE(cfg.model, self.passes.blocks).to(device)
        fast_cpu.report_plain_blocks(self.model)
        self.dtype = dtype
        if dtype == torch.float64:
            self.model.double()                            # equivalence checks
        self.step_model: torch.nn.Module = self.model      # under DDP: its wrapper
        self.stage: int | None = None                      # the stage whose trainable set is on
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.lr, (o.beta1, o.beta2), o.eps,
                                         o.weight_decay, o.amsgrad)
        self.epoch = 0                                     # the next epoch to run
        self.end = cfg.schedule.max_epochs if until is None else min(int(until),
                                                                     cfg.schedule.max_epochs)
        self.early = _fresh_early()
        self.history: list[dict] = []
        self.prior_cache: dict[str, PriorCache] = {}
        self.folder = RunFolder.of(cfg)
        self.last_written: str | None = None               # last.pt once this run wrote one
        self.diverged: str | None = None                   # the message, once it diverged
        self.callbacks: list[Callable[[dict], None]] = []

    # -- locations ------------------------------------------------------------------------------

    @property
    def run_dir(self) -> str:
        return self.folder.uri

    @property
    def endpoint(self) -> str | None:
        return self.folder.endpoint

    @property
    def last_uri(self) -> str:
        return self.folder.last

    @property
    def best_uri(self) -> str:
        return self.folder.best

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The run's checkpoint (tsdsae.checkpoint's contents)."""
        return {
            "config": to_flat(self.cfg),
            "epoch": self.epoch - 1,
            "stage": schedule.stage_of(self.cfg.schedule.variant, max(self.epoch - 1, 0),
                                       self.cfg.schedule.switch_epoch),
            "model": self.model.state_dict(),
            "snapshot": self.model.snapshot_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": checkpoint.rng_state(),
            "early": dict(self.early),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict, source: str = "the checkpoint",
                        fix: str = "") -> None:
        """Continue from a checkpoint dict. Raises checkpoint.CheckpointError naming `source`,
        the mismatching weights and `fix` when it does not fit this run's configuration."""
        checkpoint.restore_model(self.model, state, source, fix)
        self.model.to(self.device)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise checkpoint.mismatch_error(source, [f"optimiser state: {exc}"], fix) from None
        self.early = dict(state["early"])
        self.history = list(state["history"])
        self.epoch = int(state["epoch"]) + 1
        self.stage = None              # requires_grad is not in the state: set on the next epoch
        self._build_prior_cache()

    def resume(self, start: str | None = None) -> bool:
        """The one resume rule: continue from the run's own last.pt if there is one, else from
        `start` (a run folder whose last.pt this run continues, e.g. a shared stage 1), else
        stay at the initialisation. True when a state was loaded. Raises
        checkpoint.CheckpointError when the state does not fit this run's configuration."""
        if checkpoint.exists(self.last_uri, self.endpoint):
            self.last_written = self.last_uri
            source, fix = self.last_uri, RESUME_FIX
        elif start is not None:
            source = f"{start.rstrip('/')}/last.pt"
            fix = "the run to start from has another model configuration"
        else:
            return False
        self.load_state_dict(checkpoint.load(source, self.device, self.endpoint), source, fix)
        return True

    def save(self, uri: str) -> str:
        out = checkpoint.save(self.state_dict(), uri, self.endpoint)
        if uri == self.last_uri:
            self.last_written = uri
        return out

    # -- the stage switch -----------------------------------------------------------------------

    def _build_prior_cache(self) -> None:
        self.prior_cache = {}
        if self.model.has_snapshot:
            self.prior_cache = {name: PriorCache(self.model, split)
                                for name, split in self.splits.items() if split.in_memory}

    def switch_stage(self) -> None:
        """Epoch C: snapshot the global encoder (informed prior) and restart early stopping."""
        if schedule.takes_snapshot(self.cfg.schedule.variant):
            self.model.take_snapshot()
        self._build_prior_cache()
        self.early = _fresh_early()

    def prepare_epoch(self, epoch: int) -> schedule.StagePlan:
        """The plan of `epoch`; on entering a stage, the switch (at epoch C), the stage's
        trainable set and, on N ranks, a fresh DDP wrapper over exactly that set (requires_grad
        never changes under a wrapper)."""
        s = self.cfg.schedule
        plan = schedule.plan(s.variant, epoch, s.switch_epoch)
        if plan.stage != self.stage:
            if plan.stage == 2 and epoch == s.switch_epoch:
                self.switch_stage()
            self.model.set_trainable(set(plan.trainable))
            self.step_model = self.ranks.wrap(self.model, self.device)
            self.stage = plan.stage
        return plan

    # -- an epoch -------------------------------------------------------------------------------

    def _run_split(self, name: str, plan: schedule.StagePlan, epoch: int,
                   train: bool) -> dict[str, float]:
        split = self.splits[name]
        cache = self.prior_cache.get(name) if plan.informed_prior else None
        sums: dict[str, torch.Tensor] = {}
        weights = self.cfg.schedule.swap_weights
        seed = self.cfg.seed + (0 if train else 7)
        # In memory: this rank's part of each global batch; streamed: the same parts from its
        # share of the shards (tsdsae.data.stream). Streamed clips have no cached informed
        # prior: the step evaluates the frozen snapshot on them (the same values).
        for x, mask, count, batch_size, idx in split.batches(
                self.cfg.optim.batch_size, seed, epoch, self.ranks.rank, self.ranks.world_size):
            x, mask = x.to(self.device, self.dtype), mask.to(self.device)
            prior = cache(idx) if cache is not None and idx is not None else None
            if train:
                self.ranks.share = count / batch_size
                terms = train_step(self.step_model, self.optimizer, x, mask, plan, weights, prior,
                                   core=self.model, masked_kl=self.passes.masked_kl)
            else:
                terms = eval_step(self.model, x, mask, plan, weights, prior,
                                  core=self.model, masked_kl=self.passes.masked_kl)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * count
        names = sorted(sums)
        totals = self.ranks.sum(torch.stack([torch.as_tensor(sums[k]) for k in names]))
        return {k: float(v) / len(split) for k, v in zip(names, totals)}   # one sync per epoch

    def run_epoch(self, epoch: int) -> dict:
        """Train and validate `epoch`; returns its record (losses, stage, improved)."""
        plan = self.prepare_epoch(epoch)
        # Sampling noise per (seed, epoch, rank): a resumed epoch repeats bitwise, and a run of
        # a pack draws what it draws alone.
        torch.manual_seed(epoch_seed(self.cfg.seed, epoch, self.ranks.rank))
        t0 = time.perf_counter()
        self.model.train()
        train = self._run_split("train", plan, epoch, train=True)
        val = self._run_split("val", plan, epoch, train=False)
        record = {"epoch": epoch, "stage": plan.stage, "seconds": time.perf_counter() - t0,
                  **{f"train_{k}": v for k, v in train.items()},
                  **{f"val_{k}": v for k, v in val.items()}}
        improved = False
        if plan.last_stage:
            if val["loss"] < self.early["best_val"]:
                self.early.update(best_val=val["loss"], best_epoch=epoch, bad_epochs=0)
                improved = True
            else:
                self.early["bad_epochs"] += 1
        record["improved"] = improved
        self.history.append(record)
        self.epoch = epoch + 1
        return record

    # -- where it stands ------------------------------------------------------------------------

    def should_stop(self) -> bool:
        return self.early["bad_epochs"] >= self.cfg.schedule.patience

    @property
    def done(self) -> bool:
        """Nothing left for this trainer: stopped early, diverged, or at its `until` epoch."""
        return self.should_stop() or self.diverged is not None or self.epoch >= self.end

    @property
    def finished(self) -> bool:
        """The whole run is over (stopped early or at max_epochs), not just this trainer's
        part of it."""
        return self.should_stop() or self.epoch >= self.cfg.schedule.max_epochs

    def stage_ends(self, epoch: int) -> bool:
        """Whether `epoch` is the last of its stage."""
        s = self.cfg.schedule
        return (s.variant != "dsae" and epoch == s.switch_epoch - 1) or self.finished

    def checkpoint_due(self, epoch: int) -> bool:
        return (epoch + 1) % self.cfg.checkpoint.every == 0 or self.stage_ends(epoch)

    def marker(self, record: dict) -> StageMarker:
        """The stage marker after `record`'s epoch."""
        return StageMarker(stage=int(record["stage"]), epoch=int(record["epoch"]),
                           val_loss=float(record["val_loss"]),
                           best_val=float(self.early["best_val"]),
                           best_epoch=int(self.early["best_epoch"]),
                           stopped_early=self.should_stop())

    def summary(self) -> dict:
        return {"epochs_run": self.epoch, "stopped_early": self.should_stop(),
                "best_val": self.early["best_val"], "best_epoch": self.early["best_epoch"],
                "best_checkpoint": self.best_uri, "last_checkpoint": self.last_uri,
                "finished": self.finished}

    def best_model(self) -> DSAE:
        """A fresh model holding the best-validation weights (what gets evaluated)."""
        state = checkpoint.load(self.best_uri, self.device, self.endpoint)
        model = DSAE(self.cfg.model)
        checkpoint.restore_model(model, state, self.best_uri)
        return model.to(self.device)


# -- the trainer ----------------------------------------------------------------------------------


def check_packable(cfgs: Sequence[RunConfig]) -> None:
    """Runs share one trainer when they read one dataset on one device (each keeps its own
    model, so architectures and optimisers may differ). Raises ValueError naming what differs."""
    if not cfgs:
        raise ValueError("a trainer needs at least one run")
    for cfg in cfgs[1:]:
        for key in ("data", "device"):
            a, b = getattr(cfgs[0], key), getattr(cfg, key)
            if a != b:
                raise ValueError(f"runs {cfgs[0].name!r} and {cfg.name!r} cannot share a "
                                 f"trainer: {key} differs ({a} vs {b})")
    names = [c.name for c in cfgs]
    if len(set(names)) != len(names):
        raise ValueError(f"runs of one trainer need distinct names; got {names}")


class Trainer:
    """Trains K >= 1 runs side by side (see the module docstring).

    cfgs: one RunConfig or several (check_packable); data: the dataset (default: load the
    first config's); `callbacks` get each epoch's record of every run (trackers plug in here;
    per-run callbacks go on `runs[k].callbacks`); rank / world_size: one data-parallel rank
    (tsdsae.ray_train); `until`: per run, an epoch to stop before (a stage job's end); `starts`:
    per run, a run folder to start from when it has no last.pt (Run.resume); `save`: whether
    this process writes checkpoints and markers (rank 0 of N).
    Raises ValueError when the runs cannot share a trainer.
    """

    def __init__(self, cfgs: RunConfig | Sequence[RunConfig], data: Dataset | None = None,
                 device: torch.device | str | None = None,
                 callbacks: list[Callable[[dict], None]] | None = None, progress: bool = True,
                 rank: int = 0, world_size: int = 1,
                 until: Sequence[int | None] | None = None,
                 starts: Sequence[str | None] | None = None, save: bool | None = None,
                 dtype: torch.dtype = torch.float32):
        cfgs = [cfgs] if isinstance(cfgs, RunConfig) else list(cfgs)
        check_packable(cfgs)
        first = cfgs[0]
        self.device = resolve_device(first.device) if device is None else torch.device(device)
        self.data = data if data is not None else load_data(first.data)
        self.splits = {name: _as(self.data[name], self.device, dtype) for name in ("train", "val")}
        self.ranks = Ranks(rank, world_size)
        until = list(until) if until is not None else [None] * len(cfgs)
        self.starts = list(starts) if starts is not None else [None] * len(cfgs)
        if len(until) != len(cfgs) or len(self.starts) != len(cfgs):
            raise ValueError(f"one `until` and one `start` per run ({len(cfgs)})")
        self.runs = [Run(cfg, self.splits, self.device, self.ranks, u, dtype)
                     for cfg, u in zip(cfgs, until)]
        for run in self.runs:
            run.callbacks.extend(callbacks or [])
        self.progress = progress
        self.save = rank == 0 if save is None else save

    @property
    def run(self) -> Run:
        """The run of a trainer of one run."""
        if len(self.runs) != 1:
            raise AttributeError(f"this trainer holds {len(self.runs)} runs: use .runs")
        return self.runs[0]

    def resume(self) -> list[bool]:
        """Every run by the one resume rule (Run.resume). A run whose state is already at or past
        this trainer's `until` has nothing to do here; its stage marker is written if it is
        missing (a state written before markers existed). Raises checkpoint.CheckpointError
        when a state does not fit."""
        out = [run.resume(start) for run, start in zip(self.runs, self.starts)]
        for run in self.runs:
            ended = [r for r in run.history if r["epoch"] == min(run.epoch, run.end) - 1]
            if self.save and run.done and ended and run.folder.marker(ended[0]["stage"]) is None:
                run.folder.write_marker(run.marker(ended[0]))
        return out

    def _after_epoch(self, run: Run, record: dict) -> None:
        """Checkpoints and markers after one run's epoch (rank 0), then its callbacks."""
        try:
            check_finite(record, run.cfg.name, run.last_written)
        except TrainingDiverged as exc:
            run.diverged = str(exc)
            return
        if self.save:
            if record["improved"]:
                run.save(run.best_uri)
            epoch = record["epoch"]
            if run.checkpoint_due(epoch) or run.done:
                run.save(run.last_uri)
            if run.stage_ends(epoch):
                run.folder.write_marker(run.marker(record))
        for cb in run.callbacks:
            cb(record)

    def fit(self, resume: bool = True,
            after_epoch: Callable[[list[dict]], None] | None = None) -> list[dict]:
        """Train every run to its end (`until`, max_epochs or early stopping). Each epoch's
        record goes to the run's callbacks after its checkpoints are written; an exception
        raised by a callback ends the fit there (as an interruption would), and a later fit
        resumes from the last checkpoints. `after_epoch` gets the records of each epoch (every
        rank; Ray's report). Returns one summary per run. Raises TrainingDiverged (after the
        other runs have finished) when a run's loss became NaN or inf."""
        if resume:
            self.resume()
        lone = len(self.runs) == 1
        first = self.runs[0]
        bar = (epoch_bar(first.cfg, first.epoch, disable=not self.progress) if lone else
               tqdm(total=max(r.end for r in self.runs), disable=not self.progress,
                    desc=f"{len(self.runs)} runs", unit="epoch", dynamic_ncols=True))
        s = first.cfg.schedule
        left = TimeLeft(s.variant, s.switch_epoch, s.max_epochs)
        try:
            while not all(run.done for run in self.runs):
                epoch = min(run.epoch for run in self.runs if not run.done)
                records = []
                for run in self.runs:
                    if run.done or run.epoch != epoch:
                        continue
                    record = run.run_epoch(epoch)
                    self._after_epoch(run, record)
                    records.append(record)
                if after_epoch is not None:
                    after_epoch(records)
                if lone and records:
                    left.update(records[0])
                    show_epoch(bar, records[0], left)
                else:
                    bar.n = epoch + 1
                    bar.refresh()
        finally:
            bar.close()
        diverged = [run.diverged for run in self.runs if run.diverged]
        if diverged:
            raise TrainingDiverged(diverged[0])
        return [run.summary() for run in self.runs]


def _as(split, device: torch.device, dtype: torch.dtype):
    split = split.to(device)
    if split.in_memory and split.features.dtype != dtype:
        split = Split(**{**split.__dict__, "features": split.features.to(dtype)})
    return split


__all__ = ["Trainer", "Run", "Ranks", "TrainingDiverged", "check_packable", "batch_parts",
           "batch_indices", "epoch_seed", "load_data", "resolve_device", "PriorCache",
           "check_finite"]
