"""tsdsae.monitor: the time left of a run and the warning when the global latent collapses."""
from __future__ import annotations

import pytest

from tsdsae.monitor import COLLAPSE_EPOCHS, COLLAPSE_KL_V, CollapseWatch, TimeLeft

# Per-epoch train KL_v and recon of the main job's runs on dMelodies (make run, z_dim 32, seed
# 831, logged to MLflow): DSAE, and the shared stage 1 of the two-stage models.
DSAE_KL_V = [0.021, 0.033, 0.033, 0.019, 0.0051, 0.0013, 0.00033, 0.00016, 0.00011, 9.2e-05,
             8e-05, 7.5e-05, 6.9e-05, 6.3e-05]
STAGE1_KL_V = [0.025, 0.23, 0.28, 0.31, 0.32, 0.33, 0.35, 0.36, 0.39, 0.39, 0.4, 0.4, 0.4, 0.41,
               0.4, 0.4, 0.4, 0.4, 0.41, 0.4, 0.42, 0.4]


def _records(kl_v, recon_start=30.0, stage=1, first=0):
    return [{"epoch": first + e, "stage": stage, "seconds": 10.0, "train_kl_v": k,
             "train_recon": recon_start - 0.5 * e} for e, k in enumerate(kl_v)]


def test_collapse_fires_once_on_the_measured_dsae_run_and_never_on_stage_1():
    watch = CollapseWatch("dsae", 0, name="dm-dsae")
    fired = [r["epoch"] for r in _records(DSAE_KL_V) if watch(r)]
    # KL_v is below 1e-2 from epoch 4 on: five epochs in a row end at epoch 8.
    assert fired == [4 + COLLAPSE_EPOCHS - 1] and watch.tags() == {CollapseWatch.TAG: "epoch 8"}
    assert "dm-dsae" in watch.warning and "collapsed" in watch.warning
    quiet = CollapseWatch("ts_dsae", 25)
    assert not any(quiet(r) for r in _records(STAGE1_KL_V)) and quiet.tags() == {}


def test_collapse_needs_low_kl_v_in_a_row_while_the_reconstruction_improves():
    low = COLLAPSE_KL_V / 10
    # Interrupted runs of low KL_v do not add up.
    watch = CollapseWatch("dsae", 0)
    broken = [low] * (COLLAPSE_EPOCHS - 1) + [1.0] + [low] * (COLLAPSE_EPOCHS - 1)
    assert not any(watch(r) for r in _records(broken))
    # A reconstruction that stopped improving is a converged model, not a collapsing one.
    flat = [{"epoch": e, "stage": 1, "seconds": 1.0, "train_kl_v": low, "train_recon": 5.0}
            for e in range(2 * COLLAPSE_EPOCHS)]
    assert not any(CollapseWatch("dsae", 0)(r) for r in flat)
    # Stage 2 of TS-DSAE measures KL_v against the snapshot: near zero there is no collapse.
    ts = CollapseWatch("ts_dsae", 3)
    stage2 = _records([low] * (2 * COLLAPSE_EPOCHS), stage=2, first=3)
    assert not any(ts(r) for r in stage2)
    # DSAE-freeze's stage 1 has p(v) = N(0, I): watched.
    freeze = CollapseWatch("dsae_freeze", 100)
    assert sum(1 for r in _records([low] * (2 * COLLAPSE_EPOCHS)) if freeze(r)) == 1


def test_time_left_counts_stage_2_epochs_at_their_own_cost():
    left = TimeLeft("ts_dsae", switch_epoch=10, max_epochs=20)
    assert left.seconds_left() is None and left.text() == ""
    for e in range(4):                                   # stage 1: 2 s an epoch
        left.update({"epoch": e, "stage": 1, "seconds": 2.0})
    # 6 stage-1 epochs at 2 s, 10 stage-2 epochs estimated at 3x stage 1 (STAGE2_COST).
    assert left.seconds_left() == pytest.approx(6 * 2.0 + 10 * 6.0)
    for e in range(4, 11):
        left.update({"epoch": e, "stage": 1 if e < 10 else 2, "seconds": 2.0 if e < 10 else 9.0})
    # Once a stage-2 epoch is timed its own time counts: 9 epochs left at 9 s.
    assert left.seconds_left() == pytest.approx(9 * 9.0) and left.text() == "1:21 left"
    dsae = TimeLeft("dsae", switch_epoch=0, max_epochs=5)
    dsae.update({"epoch": 1, "stage": 1, "seconds": 4.0})
    assert dsae.seconds_left() == pytest.approx(3 * 4.0)


class TagRecorder:
    """A tracker that keeps the tags it is given (the MLflow tracker's set_tags, in memory)."""

    def __init__(self):
        self.tags = {}

    def set_tags(self, tags):
        self.tags.update(tags)


def test_collapse_warning_on_a_real_dsae_run_and_not_on_ts_dsae(small_dmelodies, tmp_path,
                                                                capsys):
    """The paper's model on the small rendered dMelodies (16 training clips, one step an epoch).
    Measured: DSAE's KL_v falls below 1e-2 near epoch 85 and to 1e-4 by epoch 200 while its
    reconstruction keeps improving; TS-DSAE's stage 1 keeps KL_v at 0.2 and more from epoch 30."""
    from tsdsae.config import apply_overrides, paper
    from tsdsae.train import collapse_callback
    from tsdsae.trainer import Trainer

    tags = {}
    for variant, epochs in (("dsae", 150), ("ts_dsae", 65)):
        cfg = apply_overrides(paper(), [
            f"data.uri={small_dmelodies}", f"schedule.variant={variant}", f"name=c-{variant}",
            "schedule.switch_epoch=60", f"schedule.max_epochs={epochs}", "schedule.patience=1000",
            f"checkpoint.root={tmp_path}", "checkpoint.every=1000", "tracking.enabled=false"])
        tracker = TagRecorder()
        trainer = Trainer(cfg, progress=False)
        trainer.run.callbacks.append(collapse_callback(cfg, tracker))
        trainer.fit()
        tags[variant] = tracker.tags
        err = capsys.readouterr().err
        assert (f"c-{variant}: the global latent v looks collapsed" in err) == (variant == "dsae")
        if variant == "dsae":
            epoch = int(tracker.tags[CollapseWatch.TAG].split()[-1])
            # The warning comes well before the end of the run, after KL_v is near zero.
            assert epoch < 140 and trainer.run.history[epoch]["train_kl_v"] < COLLAPSE_KL_V
    assert CollapseWatch.TAG in tags["dsae"] and tags["ts_dsae"] == {}
