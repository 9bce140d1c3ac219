import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tsdsae import checkpoint
from tsdsae.config import apply_overrides, debug, toy
from tsdsae.evaluate import evaluate, pair_other_instrument
from tsdsae.toy import make_toy_dataset
from tsdsae.trainer import Trainer, batch_indices

GOLDEN = Path(__file__).parent / "golden" / "debug_loss_curve.json"


@pytest.fixture(scope="module")
def debug_data():
    c = debug().data
    return make_toy_dataset(c.toy_clips, c.toy_seconds, c.toy_instruments, seed=c.toy_seed)


def _cfg(tmp_path, *overrides):
    return apply_overrides(debug(), [f"checkpoint.root={tmp_path}", *overrides])


def _snap(params):
    return [p.detach().clone() for p in params]


def test_batches_reshuffle_every_epoch_and_split_across_ranks():
    e0, e1 = batch_indices(10, 4, 1, 0), batch_indices(10, 4, 1, 1)
    assert [len(b) for b in e0] == [4, 4, 2]
    assert not all(torch.equal(a, b) for a, b in zip(e0, e1))
    assert all(torch.equal(a, b) for a, b in zip(batch_indices(10, 4, 1, 0), e0))
    r0, r1 = batch_indices(10, 4, 1, 0, 0, 2), batch_indices(10, 4, 1, 0, 1, 2)
    for whole, a, b in zip(e0, r0, r1):
        assert torch.equal(torch.cat([a, b]), whole)


def test_stage_one_freezes_local_modules_and_stage_two_keeps_the_snapshot(tmp_path, debug_data):
    cfg = _cfg(tmp_path, "schedule.switch_epoch=3", "schedule.max_epochs=5")
    tr = Trainer(cfg, data=debug_data, progress=False)
    m = tr.run.model
    local0, global0 = _snap(m.group_parameters("local")), _snap(m.group_parameters("global"))
    for epoch in range(3):
        tr.run.run_epoch(epoch)
    assert all(torch.equal(a, b) for a, b in zip(local0, m.group_parameters("local")))
    assert not all(torch.equal(a, b) for a, b in zip(global0, m.group_parameters("global")))
    tr.run.run_epoch(3)                      # the switch: snapshot taken, local modules train
    assert m.has_snapshot
    snap = m.snapshot_state_dict()
    assert not all(torch.equal(a, b) for a, b in zip(local0, m.group_parameters("local")))
    tr.run.run_epoch(4)
    assert all(torch.equal(snap[k], v) for k, v in m.snapshot_state_dict().items())
    # the snapshot is the global encoder as it was at the end of stage 1
    assert not all(torch.equal(snap[k], v) for k, v in m.v_posterior.state_dict().items())


def test_dsae_freeze_keeps_the_global_encoder_in_stage_two(tmp_path, debug_data):
    cfg = _cfg(tmp_path, "schedule.variant=dsae_freeze", "schedule.switch_epoch=2",
               "schedule.max_epochs=4")
    tr = Trainer(cfg, data=debug_data, progress=False)
    tr.run.run_epoch(0), tr.run.run_epoch(1)
    global1 = _snap(tr.run.model.group_parameters("global"))
    tr.run.run_epoch(2), tr.run.run_epoch(3)
    assert not tr.run.model.has_snapshot
    assert all(torch.equal(a, b) for a, b in zip(global1, tr.run.model.group_parameters("global")))


def test_resume_equals_uninterrupted(tmp_path, debug_data):
    straight = Trainer(_cfg(tmp_path / "a", "checkpoint.every=1"), data=debug_data, progress=False)
    straight.fit()
    # interrupted after 7 epochs (stage 2 has begun) by an epoch callback, as Ctrl-C would;
    # then a fresh process-equivalent resumes
    class Interrupt(Exception):
        pass

    def interrupt_after_7(record):
        if record["epoch"] == 6:
            raise Interrupt

    first = Trainer(_cfg(tmp_path / "b", "checkpoint.every=1"), data=debug_data, progress=False,
                    callbacks=[interrupt_after_7])
    with pytest.raises(Interrupt):
        first.fit()
    assert first.run.epoch == 7 and checkpoint.load(first.run.last_uri)["epoch"] == 6
    resumed = Trainer(_cfg(tmp_path / "b", "checkpoint.every=1"), data=debug_data, progress=False)
    (result,) = resumed.fit()
    assert result["epochs_run"] == 12 and resumed.run.model.has_snapshot
    for (k, a), b in zip(straight.run.model.state_dict().items(), resumed.run.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["val_loss"] for h in straight.run.history] == [h["val_loss"] for h in resumed.run.history]
    a, b = straight.run.model.snapshot_state_dict(), resumed.run.model.snapshot_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_loads_weights_only(tmp_path, debug_data):
    tr = Trainer(_cfg(tmp_path), data=debug_data, progress=False)
    tr.fit()
    state = torch.load(tr.run.last_uri, weights_only=True)
    assert state["epoch"] == 11 and state["stage"] == 2 and state["snapshot"] is not None
    assert checkpoint.load(tr.run.best_uri)["config"]["schedule.variant"] == "ts_dsae"
    Path(tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        checkpoint.load(str(tmp_path / "junk.pt"))


def test_debug_loss_falls_and_matches_the_golden_curve(tmp_path, debug_data):
    tr = Trainer(_cfg(tmp_path), data=debug_data, progress=False)
    tr.fit()
    curve = [round(h["train_loss"], 5) for h in tr.run.history]
    assert curve[-1] < curve[0] * 0.95
    if os.environ.get("TSDSAE_WRITE_GOLDEN") == "1":     # deliberate regeneration only
        GOLDEN.write_text(json.dumps({"train_loss": curve}, indent=1))
    golden = json.loads(GOLDEN.read_text())["train_loss"]
    assert curve == pytest.approx(golden, rel=2e-3)


def test_ts_dsae_disentangles_the_toy_dataset_and_dsae_collapses(tmp_path):
    """METHOD s6 on the toy data: TS-DSAE keeps the instrument in v through both swaps."""
    cfg = toy()
    data = make_toy_dataset(cfg.data.toy_clips, cfg.data.toy_seconds, cfg.data.toy_instruments,
                            seed=cfg.data.toy_seed)
    scores = {}
    for variant in ("ts_dsae", "dsae"):
        c = apply_overrides(cfg, [f"checkpoint.root={tmp_path}", f"schedule.variant={variant}",
                                  f"name=toy-{variant}"])
        tr = Trainer(c, data=data, progress=False)
        tr.fit()
        scores[variant] = evaluate(tr.run.best_model(), data, "val")
    print(json.dumps(scores))
    ts = scores["ts_dsae"]
    assert ts["pre_swap"] >= 0.9 and ts["gswap"] >= 0.9 and ts["lswap"] >= 0.9, scores
    # reported beside it: plain DSAE lets the instrument follow z
    assert scores["dsae"]["gswap"] < ts["gswap"], scores


def test_cli_help_and_debug_run(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tsdsae.train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--model" in out and "overrides" in out.lower()
    bad = subprocess.run([sys.executable, "-m", "tsdsae.train", "--preset", "debug",
                          "model.z_dim=0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "model.z_dim" in bad.stderr
    # Four instruments: macro-F1 over K = 4, the K x K table of the global swap, the run's page.
    run = subprocess.run([sys.executable, "-m", "tsdsae.train", "--preset", "debug", "--quiet",
                          f"checkpoint.root={tmp_path}", "data.toy_instruments=4"],
                         capture_output=True, text=True, check=True)
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    scores = summary["eval"]
    assert summary["epochs_run"] == 12 and set(scores) >= {"pre_swap", "gswap", "lswap"}
    assert scores["instruments"] == ["saw", "clarinet", "flute", "brass"]
    confusion = np.array(scores["gswap_confusion"])
    assert confusion.shape == (4, 4) and confusion.sum() == scores["n_eval"]
    # Rows count the instrument of each clip's partner j (whose v was decoded): the pairing alone
    # decides them, whatever the model hears.
    test = make_toy_dataset(256, 1.0, 4, seed=0)["test"]
    partners = test.instrument.numpy()[pair_other_instrument(test.instrument.numpy(), 0)]
    assert confusion.sum(axis=1).tolist() == np.bincount(partners, minlength=4).tolist()
    page = Path(scores["page"])
    assert page == tmp_path / "debug" / "report" / "report.html"
    text = page.read_text()
    assert text.count("<audio") == 2 + 3 + 16          # inputs A/B, one pair, 4 x 4 swap matrix
    assert all(f"<th>{n}</th>" in text for n in scores["instruments"])
    assert "losses per epoch" in text and "chance 0.25 for 4 instruments" in text
    # The page is rebuilt from the checkpoint alone, with the same scores.
    again = tmp_path / "again"
    ev = subprocess.run([sys.executable, "-m", "tsdsae.evaluate", summary["best_checkpoint"],
                         "--page", str(again)], capture_output=True, text=True, check=True)
    rebuilt = json.loads(ev.stdout)
    assert rebuilt["n_eval"] > 0 and (again / "report.html").is_file()
    for key in ("pre_swap", "gswap", "lswap", "gswap_confusion"):
        assert rebuilt[key] == scores[key], key
    assert json.loads((again / "scores.json").read_text())["gswap"] == scores["gswap"]
