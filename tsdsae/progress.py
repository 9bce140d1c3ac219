"""The progress line of a run and what feeds it: one updating line with a stage-aware time left
(tsdsae.monitor.TimeLeft), the v-collapse warning (tsdsae.monitor.CollapseWatch), and on Ray the
progress.json that rank 0 writes and the driver's RunWatcher reads."""
from __future__ import annotations

import json
import sys

from tqdm.auto import tqdm

from tsdsae import tracking
from tsdsae.config import RunConfig
from tsdsae.monitor import CollapseWatch, TimeLeft
from tsdsae.runs import PROGRESS
from tsdsae.storage import StorageError, open_store


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


PROGRESS_KEEP = 32                 # epochs kept in progress.json (the collapse rule needs a few)
PROGRESS_KEYS = ("epoch", "stage", "seconds", "train_loss", "train_recon", "train_kl_z",
                 "train_kl_v", "val_loss")


def write_progress(run) -> None:
    """Rank 0, after each epoch: the run's last PROGRESS_KEEP epoch records (PROGRESS_KEYS) to
    its folder's progress.json, which the driver's RunWatcher reads."""
    records = [{k: r[k] for k in PROGRESS_KEYS if k in r} for r in run.history[-PROGRESS_KEEP:]]
    run.folder.write_json(PROGRESS, {"records": records})


class RunWatcher:
    """The driver's view of a Ray run while its stage jobs train: a thread that reads the run
    folder's progress.json every `every` seconds and feeds each new epoch record to the progress
    line (tsdsae.trainer.epoch_bar, with tsdsae.monitor.TimeLeft; when `show`) and to
    tsdsae.monitor.CollapseWatch, whose warning is printed and tagged on `tracker`.
    Use as a context manager; the last records are read once more on exit."""

    def __init__(self, cfg: RunConfig, location: str, tracker: tracking.Tracker,
                 show: bool = True, every: float = 2.0):
        import threading

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
        try:
            records = json.loads(self.store.read_bytes(PROGRESS))["records"]
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


__all__ = ["epoch_bar", "show_epoch", "write_progress", "RunWatcher", "PROGRESS_KEEP",
           "PROGRESS_KEYS"]
