"""Single-process training: epochs, the stage switch, early stopping, checkpoints, resume.

Read top to bottom:
  1. data: the whole split lives in device memory as tensors (tsdsae.dataset.Split);
  2. each epoch: its stage plan (tsdsae.schedule.plan, a pure function of the epoch), at the
     switch the informed-prior snapshot, then reshuffled batches and tsdsae.train_step.train_step;
  3. validation loss (same objective, sampled) -> early stopping (in the last stage) and the
     best-validation checkpoint;
  4. checkpoints every `checkpoint.every` epochs, at each stage end and at the end. A rerun with
     the same run name resumes from the last one and ends exactly where an uninterrupted run ends.

Choices where METHOD is silent: early stopping and the best checkpoint are tracked within the last
stage only (a two-stage model's stage-2 loss has extra terms, so a stage-1 loss is not comparable
and a stage-1 model is not the model being trained); each epoch's batch order and sampling noise
are derived from (seed, epoch, rank), so resuming at an epoch boundary reproduces the run bitwise.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch.distributions import Normal
from tqdm.auto import tqdm

from tsdsae import checkpoint, schedule
from tsdsae.config import DataConfig, RunConfig, to_flat
from tsdsae.dataset import Dataset, Split
from tsdsae.model import fast_cpu
from tsdsae.model.dsae import DSAE
from tsdsae.model.layers import normal
from tsdsae.monitor import TimeLeft
from tsdsae.train_step import build_optimizer, eval_step, train_step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; use device=cpu")
    return torch.device(name)


def load_data(cfg: DataConfig) -> Dataset:
    """'toy' -> the synthetic dataset; anything else -> shards + manifest at that URI."""
    if cfg.uri == "toy":
        from tsdsae.toy import make_toy_dataset
        return make_toy_dataset(cfg.toy_clips, cfg.toy_seconds, cfg.toy_instruments,
                                seed=cfg.toy_seed)
    from tsdsae.data import load_dataset
    return load_dataset(cfg.uri, endpoint_url=cfg.endpoint_url or None)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63 - 1)


def batch_parts(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1) -> list[tuple[torch.Tensor, int]]:
    """This rank's part of every global batch of one epoch, with the global batch's size.

    The epoch's order is a permutation drawn from (seed, epoch): reshuffled every epoch, the same
    for every rank. Each global batch of `batch_size` (the last one may be short) is cut into
    `world_size` contiguous parts, so results do not depend on the number of workers. A part may
    be empty (a last batch shorter than world_size); every rank still gets one entry per batch,
    which keeps the ranks' collective calls in step.
    """
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=g)
    return [(batch.tensor_split(world_size)[rank], len(batch))
            for batch in order.split(batch_size)]


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


def epoch_bar(cfg: RunConfig, initial: int, disable: bool = False) -> tqdm:
    """The one updating progress line of a run (epochs done of schedule.max_epochs); the time
    left is tsdsae.monitor.TimeLeft's (stage-aware), not tqdm's average rate."""
    return tqdm(total=cfg.schedule.max_epochs, initial=initial, disable=disable,
                desc=f"{cfg.name} [{cfg.schedule.variant}]", unit="epoch", dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} epochs "
                           "[{elapsed}{postfix}]")


def show_epoch(bar: tqdm, record: dict, left: TimeLeft) -> None:
    """Move `bar` to the end of `record`'s epoch and show its losses and the time left."""
    bar.n = int(record["epoch"]) + 1
    terms = [f"stage {record.get('stage', '?')}"] + [
        f"{name} {record[key]:.4f}" for name, key in (
            ("loss", "train_loss"), ("recon", "train_recon"), ("kl_z", "train_kl_z"),
            ("kl_v", "train_kl_v"), ("val", "val_loss")) if key in record]
    eta = left.text()
    bar.set_postfix_str(", ".join(([eta] if eta else []) + terms))


class Trainer:
    """Trains one run. `callbacks` get each epoch's record dict (tracking plugs in here).

    `rank` / `world_size` make it one data-parallel rank (tsdsae.ray_train): each rank trains on
    its part of every global batch through `step_model` (there, the DDP wrapper of `model`), and
    `_sum_across_ranks` / `_before_train_step` are the seams a distributed subclass fills in.
    """

    def __init__(self, cfg: RunConfig, data: Dataset | None = None,
                 device: torch.device | str | None = None,
                 callbacks: list[Callable[[dict], None]] | None = None, progress: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.device = resolve_device(cfg.device) if device is None else torch.device(device)
        self.data = data if data is not None else load_data(cfg.data)
        self.train_split = self.data["train"].to(self.device)
        self.val_split = self.data["val"].to(self.device)
        torch.manual_seed(cfg.seed)                        # deterministic initialisation
        self.model = DSAE(cfg.model).to(self.device)
        # the training pass: tsdsae.model.fast_cpu's equal, faster pass on CPU, else the model
        self.pass_model = fast_cpu.for_device(self.model, self.device)
        self.step_model: torch.nn.Module = self.pass_model  # what train_step runs
        self.stage: int | None = None                      # the stage whose trainable set is on
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.lr, (o.beta1, o.beta2), o.eps,
                                         o.weight_decay, o.amsgrad)
        self.epoch = 0                                     # the next epoch to run
        self.early = {"best_val": math.inf, "best_epoch": -1, "bad_epochs": 0}
        self.history: list[dict] = []
        self.callbacks = callbacks or []
        self.progress = progress
        self.prior_cache: dict[str, PriorCache] = {}
        self.run_dir = f"{cfg.checkpoint.root.rstrip('/')}/{cfg.name}"
        self.last_written: str | None = None               # last.pt once this run wrote one
        self.endpoint = cfg.data.endpoint_url or None

    # -- state ----------------------------------------------------------------------------------

    @property
    def last_uri(self) -> str:
        return f"{self.run_dir}/last.pt"

    @property
    def best_uri(self) -> str:
        return f"{self.run_dir}/best.pt"

    def state_dict(self) -> dict:
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
        checkpoint.set_rng_state(state["rng"])
        self.early = dict(state["early"])
        self.history = list(state["history"])
        self.epoch = int(state["epoch"]) + 1
        self.stage = None              # requires_grad is not in the state: set on the next epoch
        self._build_prior_cache()

    def resume(self) -> bool:
        """Load the run's last checkpoint if there is one. True when resumed. Raises
        checkpoint.CheckpointError when it does not fit this run's configuration."""
        if not checkpoint.exists(self.last_uri, self.endpoint):
            return False
        self.last_written = self.last_uri
        self.load_state_dict(checkpoint.load(self.last_uri, self.device, self.endpoint),
                             self.last_uri, RESUME_FIX)
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
            self.prior_cache = {"train": PriorCache(self.model, self.train_split),
                                "val": PriorCache(self.model, self.val_split)}

    def switch_stage(self) -> None:
        """Epoch C: snapshot the global encoder (informed prior) and restart early stopping."""
        if schedule.takes_snapshot(self.cfg.schedule.variant):
            self.model.take_snapshot()
        self._build_prior_cache()
        self.early = {"best_val": math.inf, "best_epoch": -1, "bad_epochs": 0}

    def prepare_epoch(self, epoch: int) -> schedule.StagePlan:
        """The plan of `epoch`; on entering a stage, the switch (at epoch C) and the stage's
        trainable set. Within a stage nothing changes, so a DDP wrapper built after the first
        call of a stage never sees requires_grad flip."""
        s = self.cfg.schedule
        plan = schedule.plan(s.variant, epoch, s.switch_epoch)
        if plan.stage != self.stage:
            if plan.stage == 2 and epoch == s.switch_epoch:
                self.switch_stage()
            self.model.set_trainable(set(plan.trainable))
            self.stage = plan.stage
        return plan

    # -- epochs ---------------------------------------------------------------------------------

    def _run_split(self, split: Split, name: str, plan: schedule.StagePlan, epoch: int,
                   train: bool) -> dict[str, float]:
        cache = self.prior_cache.get(name) if plan.informed_prior else None
        sums: dict[str, torch.Tensor] = {}
        weights = self.cfg.schedule.swap_weights
        seed = self.cfg.seed + (0 if train else 7)
        parts = batch_parts(len(split), self.cfg.optim.batch_size, seed, epoch, self.rank,
                            self.world_size)
        for idx, batch_size in parts:
            count = len(idx)
            if count == 0:
                # An empty part (a last batch shorter than world_size) still joins the gradient
                # all-reduce and yields every term: one stand-in clip, weighted by 0.
                idx = torch.zeros(1, dtype=torch.long)
            idx = idx.to(self.device)
            x, mask = split.features[idx], split.mask[idx]
            prior = cache(idx) if cache is not None else None
            if train:
                self._before_train_step(count / batch_size)
                terms = train_step(self.step_model, self.optimizer, x, mask, plan, weights, prior,
                                   core=self.model)
            else:
                terms = eval_step(self.pass_model, x, mask, plan, weights, prior, core=self.model)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * count
        names = sorted(sums)
        totals = self._sum_across_ranks(torch.stack([torch.as_tensor(sums[k]) for k in names]))
        return {k: float(v) / len(split) for k, v in zip(names, totals)}   # one sync per epoch

    def _before_train_step(self, share: float) -> None:
        """Called before each training step with this rank's share of the global batch."""

    def _sum_across_ranks(self, totals: torch.Tensor) -> torch.Tensor:
        """Per-rank sums (K,) -> sums over all ranks; one process holds them all already."""
        return totals

    def run_epoch(self, epoch: int) -> dict:
        plan = self.prepare_epoch(epoch)
        # Sampling noise per (seed, epoch, rank): a resumed epoch repeats bitwise.
        torch.manual_seed(epoch_seed(self.cfg.seed, epoch, self.rank))
        t0 = time.perf_counter()
        self.model.train()
        train = self._run_split(self.train_split, "train", plan, epoch, train=True)
        val = self._run_split(self.val_split, "val", plan, epoch, train=False)
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

    def should_stop(self) -> bool:
        return self.early["bad_epochs"] >= self.cfg.schedule.patience

    def checkpoint_due(self, epoch: int) -> bool:
        s = self.cfg.schedule
        stage_end = s.variant != "dsae" and epoch == s.switch_epoch - 1
        return (epoch + 1) % self.cfg.checkpoint.every == 0 or stage_end

    def fit(self, resume: bool = True) -> dict:
        """Train until max_epochs or early stopping. Each epoch's record goes to `callbacks`
        after the epoch's checkpoints are written; an exception raised by a callback ends the
        fit there (as an interruption would) and a later fit resumes from the last checkpoint."""
        s = self.cfg.schedule
        if resume:
            self.resume()
        bar = epoch_bar(self.cfg, self.epoch, disable=not self.progress)
        left = TimeLeft(s.variant, s.switch_epoch, s.max_epochs)
        stopped_early = self.should_stop()
        try:
            while self.epoch < s.max_epochs and not stopped_early:
                record = self.run_epoch(self.epoch)
                check_finite(record, self.cfg.name, self.last_written)
                if record["improved"]:
                    self.save(self.best_uri)
                stopped_early = self.should_stop()
                last = stopped_early or self.epoch == s.max_epochs
                if self.checkpoint_due(record["epoch"]) or last:
                    self.save(self.last_uri)
                for cb in self.callbacks:
                    cb(record)
                left.update(record)
                show_epoch(bar, record, left)
        finally:
            bar.close()
        return {"epochs_run": self.epoch, "stopped_early": stopped_early,
                "best_val": self.early["best_val"], "best_epoch": self.early["best_epoch"],
                "best_checkpoint": self.best_uri, "last_checkpoint": self.last_uri,
                "finished": stopped_early or self.epoch >= s.max_epochs}

    def best_model(self) -> DSAE:
        """A fresh model holding the best-validation weights (what gets evaluated)."""
        state = checkpoint.load(self.best_uri, self.device, self.endpoint)
        model = DSAE(self.cfg.model)
        checkpoint.restore_model(model, state, self.best_uri)
        return model.to(self.device)
