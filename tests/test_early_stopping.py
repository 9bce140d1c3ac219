"""Early stopping with patience and best-epoch selection (tsdsae.trainer), on real toy runs.

Rules checked (trainer module docstring): only epochs of the last stage count; an epoch
improves when its validation loss is below every earlier one of that stage; training stops
after `patience` epochs in a row without improvement; best.pt holds the weights of the best
epoch, which is what gets evaluated.
"""
import math

import pytest
import torch

from tsdsae import checkpoint
from tsdsae.config import apply_overrides, debug
from tsdsae.trainer import Trainer

PATIENCE = 2


def _cfg(root, variant: str, switch: int, max_epochs: int, patience: int = PATIENCE):
    # A high learning rate on 48 toy clips: the validation loss stops improving within a few
    # epochs (about 10 here), so early stopping triggers well before max_epochs.
    return apply_overrides(debug(), [
        f"checkpoint.root={root}", "data.toy_clips=48", f"schedule.variant={variant}",
        f"schedule.switch_epoch={switch}", f"schedule.max_epochs={max_epochs}",
        f"schedule.patience={patience}", "optim.lr=0.01"])


@pytest.mark.parametrize("variant, switch", [("dsae", 0), ("ts_dsae", 3)])
def test_stops_after_patience_and_keeps_the_best_epoch(tmp_path, variant, switch):
    trainer = Trainer(_cfg(tmp_path / "a", variant, switch, max_epochs=40), progress=False)
    (result,) = trainer.fit()
    history = trainer.run.history
    losses_all = [h["val_loss"] for h in history]
    first_last_stage = 0 if variant == "dsae" else switch
    last_stage = [h for h in history if h["epoch"] >= first_last_stage]
    assert result["stopped_early"] and result["epochs_run"] < 40

    # Improvements: strictly below every earlier epoch of the last stage; stage 1 never counts.
    best_so_far = math.inf
    for h in last_stage:
        assert h["improved"] == (h["val_loss"] < best_so_far), h
        best_so_far = min(best_so_far, h["val_loss"])
    assert not any(h["improved"] for h in history if h["epoch"] < first_last_stage)
    # The best epoch is the first one with the lowest validation loss of the last stage.
    losses = [h["val_loss"] for h in last_stage]
    best = last_stage[losses.index(min(losses))]
    assert (result["best_epoch"], result["best_val"]) == (best["epoch"], best["val_loss"])
    # Stopped exactly `patience` epochs after it, and no earlier run of `patience` bad epochs.
    assert history[-1]["epoch"] - result["best_epoch"] == PATIENCE
    bad = 0
    for h in last_stage[:-1]:
        bad = 0 if h["improved"] else bad + 1
        assert bad < PATIENCE

    # best.pt holds the best epoch's weights: a run of the same seed cut at that epoch ends
    # with the same weights, bit for bit; the last epoch's differ.
    best_state = checkpoint.load(result["best_checkpoint"])
    assert best_state["epoch"] == result["best_epoch"]
    cut = Trainer(_cfg(tmp_path / "b", variant, switch, max_epochs=result["best_epoch"] + 1,
                       patience=40), progress=False)
    cut.fit()
    assert [h["val_loss"] for h in cut.run.history] == losses_all[:len(cut.run.history)]
    for name, value in cut.run.model.state_dict().items():
        assert torch.equal(best_state["model"][name], value), name
    last_state = checkpoint.load(result["last_checkpoint"])
    assert any(not torch.equal(last_state["model"][k], v) for k, v in best_state["model"].items())
    best_model = trainer.run.best_model()
    for name, value in best_model.state_dict().items():
        assert torch.equal(best_state["model"][name], value), name


def test_without_a_plateau_it_runs_to_max_epochs_and_keeps_the_lowest(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "dsae", 0, max_epochs=6, patience=50), progress=False)
    (result,) = trainer.fit()
    assert not result["stopped_early"] and result["epochs_run"] == 6
    losses = [h["val_loss"] for h in trainer.run.history]
    assert result["best_epoch"] == losses.index(min(losses)) and result["best_val"] == min(losses)
