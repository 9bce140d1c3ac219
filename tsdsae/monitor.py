"""Watching a run while it trains: the time left, and a global latent that collapses.

Both read the epoch records the trainer hands its callbacks ({"epoch", "stage", "seconds",
"train_kl_v", "train_recon", ...}), in the single process and, through the run folder's
progress file, on the driver of a Ray run (tsdsae.ray_train). Pure Python: no torch, no I/O.

- `TimeLeft`: seconds left from the epoch times of each stage. Stage-2 epochs of the two-stage
  models cost more than stage-1 epochs (the local modules train, TS-DSAE re-encodes two swaps);
  until a stage-2 epoch has run, its cost is the stage-1 epoch time times STAGE2_COST.
- `CollapseWatch`: the paper's failure mode (Luo et al. 2022, s1 and s5: DSAE's v carries
  nothing and the instrument moves into z). While p(v) = N(0, I) (DSAE, and stage 1 of the
  two-stage models; METHOD s4), KL_v per v dimension (METHOD s3: mean over batch and dims) near
  zero means q(v | x) has become the prior: v carries no information. The watch fires once when
  KL_v has stayed below `threshold` for `patience` epochs in a row while the reconstruction still
  improved over those epochs (the decoder learns without v). Stage 2 of TS-DSAE (w/o reg) is not
  watched: there KL_v is measured against the snapshot q_snapshot(v | x), and near zero only
  means v stays where stage 1 put it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Stage-2 epoch time / stage-1 epoch time per variant, before a stage-2 epoch was measured.
# benchmarks/step_rate.py on an H200 (README): TS-DSAE stage 1 4.8 ms a step at z_dim 32, stage 2
# DSAE-freeze 8.1, w/o reg 9.2, TS-DSAE 14.6; on this project's 2-core CPU TS-DSAE's stage 2 is
# likewise about 3x its stage 1.
STAGE2_COST = {"dsae_freeze": 1.7, "ts_dsae_wo_reg": 1.9, "ts_dsae": 3.0}

# Collapse rule, decided on measured runs (README, "A warning when v collapses"): DSAE's KL_v
# falls below 1e-3 per dimension within a few epochs on dMelodies and stays there; stage 1 of
# the two-stage models keeps it orders of magnitude above.
COLLAPSE_KL_V = 1e-2      # nats per v dimension
COLLAPSE_EPOCHS = 5       # consecutive epochs below it


def format_seconds(seconds: float) -> str:
    """'1:02:03' / '4:05' for a duration in seconds."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TimeLeft:
    """Seconds left of a run from its epochs' times, stage by stage.

    `variant`, `switch_epoch` and `max_epochs` are the run's schedule (tsdsae.config
    ScheduleConfig); `update(record)` takes each finished epoch's record ("epoch", "stage",
    "seconds"). The estimate uses the mean of the last `window` epochs of each stage; a stage
    not yet seen costs STAGE2_COST x stage 1 (or the stage-2 time / that factor for stage 1,
    after a resume straight into stage 2). Early stopping may end the run sooner.
    """

    def __init__(self, variant: str, switch_epoch: int, max_epochs: int, window: int = 5):
        self.variant, self.switch, self.max_epochs = variant, switch_epoch, max_epochs
        self.window = window
        self.times: dict[int, list[float]] = {1: [], 2: []}
        self.next_epoch = 0

    def update(self, record: Mapping[str, Any]) -> None:
        stage = int(record.get("stage", 1))
        self.times.setdefault(stage, []).append(float(record["seconds"]))
        del self.times[stage][:-self.window]
        self.next_epoch = int(record["epoch"]) + 1

    def epoch_seconds(self, stage: int) -> float | None:
        """The expected seconds of one epoch of `stage` (None before any epoch was timed)."""
        seen = self.times.get(stage) or []
        if seen:
            return sum(seen) / len(seen)
        cost = STAGE2_COST.get(self.variant, 1.0)
        other = self.times.get(3 - stage) or []
        if not other:
            return None
        mean = sum(other) / len(other)
        return mean * cost if stage == 2 else mean / cost

    def seconds_left(self) -> float | None:
        """Seconds until max_epochs at the expected epoch times (None before the first)."""
        if self.variant == "dsae":
            stage1, stage2 = self.max_epochs - self.next_epoch, 0
        else:
            stage1 = max(0, min(self.switch, self.max_epochs) - self.next_epoch)
            stage2 = self.max_epochs - max(self.next_epoch, self.switch)
        total = 0.0
        for stage, epochs in ((1, stage1), (2, stage2)):
            if epochs > 0:
                per = self.epoch_seconds(stage)
                if per is None:
                    return None
                total += epochs * per
        return total

    def text(self) -> str:
        """'12:34 left' (or '' before the first epoch)."""
        left = self.seconds_left()
        return "" if left is None else f"{format_seconds(left)} left"


class CollapseWatch:
    """Fires once when the global latent collapses (see the module docstring for the rule).

    Call it with each epoch's record; it returns the warning line the first time the rule holds
    (None otherwise) and keeps it in `.warning`, the epoch in `.epoch`. `threshold` is KL_v per
    v dimension in nats, `patience` the epochs in a row. `variant` and `switch_epoch` say which
    epochs have p(v) = N(0, I).
    """

    TAG = "tsdsae.v_collapse"

    def __init__(self, variant: str, switch_epoch: int, threshold: float = COLLAPSE_KL_V,
                 patience: int = COLLAPSE_EPOCHS, name: str = "run"):
        self.variant, self.switch, self.name = variant, switch_epoch, name
        self.threshold, self.patience = threshold, patience
        self.low: list[tuple[int, float, float]] = []      # (epoch, kl_v, recon) in a row
        self.warning: str | None = None
        self.epoch: int | None = None

    def standard_prior(self, epoch: int) -> bool:
        """Whether p(v) = N(0, I) and v trains in `epoch` (DSAE; stage 1 of the others)."""
        return self.variant == "dsae" or epoch < self.switch

    def __call__(self, record: Mapping[str, Any]) -> str | None:
        if self.warning is not None:
            return None
        epoch = int(record["epoch"])
        kl_v, recon = record.get("train_kl_v"), record.get("train_recon")
        if not self.standard_prior(epoch) or kl_v is None or recon is None:
            self.low.clear()
            return None
        if float(kl_v) >= self.threshold:
            self.low.clear()
            return None
        keep = self.low[max(0, len(self.low) - self.patience + 1):]      # the last patience
        self.low = [*keep, (epoch, float(kl_v), float(recon))]
        if len(self.low) < self.patience:
            return None
        first, last = self.low[0], self.low[-1]
        if not last[2] < first[2]:                 # the reconstruction stopped improving too
            return None
        self.epoch = epoch
        self.warning = (
            f"warning: {self.name}: the global latent v looks collapsed: KL_v has been below "
            f"{self.threshold:g} nats per dimension for {self.patience} epochs (now {kl_v:.2g}, "
            f"epoch {epoch}) while the reconstruction still improves, so the decoder works "
            "without v and the instrument is likely moving into z (the paper's DSAE failure); "
            "TS-DSAE (schedule.variant=ts_dsae) is the remedy, stopping now saves the rest")
        return self.warning

    def tags(self) -> dict[str, str]:
        """The MLflow tag of a fired warning ({} before)."""
        return {} if self.epoch is None else {self.TAG: f"epoch {self.epoch}"}
