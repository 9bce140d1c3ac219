"""The sweep's progress line: while Tune runs, one line every minute about the sweep's runs,
read from what they log to MLflow (worker output stays in Ray's log files)."""
from __future__ import annotations

import threading
import time

from tsdsae.tracking import ROLE_TAG
from tune.grid import VARIANT_KEY


class ProgressPrinter:
    """Prints one line about the sweep's runs every `every` seconds while Tune runs: each child
    run's epochs so far out of its stage's budget (read from the per-epoch metrics the runs log
    to MLflow), so the console shows training progress while worker output stays in Ray's logs.
    """

    def __init__(self, tracking_uri: str, parent_run_id: str, every: float = 60.0):
        self.uri, self.parent, self.every = tracking_uri, parent_run_id, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="sweep-progress", daemon=True)
        self.t0 = time.time()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            try:
                line = self.line()
            except Exception:   # noqa: BLE001 - progress is a courtesy; never fail the sweep
                continue
            if line:
                print(line, flush=True)

    def line(self) -> str:
        """'[12.5 min] stage 1 (shared) z32 s831 40/50 epochs | dsae z32 s831 done | 2 starting
        or waiting for CPUs', or '' before any run has started."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        exp = client.get_run(self.parent).info.experiment_id
        runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{self.parent}'")
        parts, waiting = [], 0
        for run in sorted(runs, key=lambda r: r.info.run_name or ""):
            p, tags = run.data.params, run.data.tags
            shared = tags.get(ROLE_TAG) == "shared_stage_1"
            name = "stage 1 (shared)" if shared else tags.get(f"grid.{VARIANT_KEY}", "?")
            z = tags.get("grid.model.z_dim")
            seed = tags.get("grid.seed")
            label = name + (f" z{z}" if z else "") + (f" s{seed}" if seed else "")
            if run.info.status == "FINISHED":
                parts.append(f"{label} done")
                continue
            if run.info.status != "RUNNING" or "schedule.max_epochs" not in p:
                continue
            total, switch = int(p["schedule.max_epochs"]), int(p.get("schedule.switch_epoch", 0))
            if shared:
                total = switch
            elif tags.get("tsdsae.shared_stage_1") == "True":
                total -= switch                  # a forked stage 2 logs its own epochs only
            epochs = len(client.get_metric_history(run.info.run_id, "stage"))
            if epochs:
                parts.append(f"{label} {epochs}/{total} epochs")
            else:
                waiting += 1                    # started, waiting for CPUs (or loading data)
        if waiting:
            parts.append(f"{waiting} starting or waiting for CPUs")
        if not parts:
            return ""
        return f"[{(time.time() - self.t0) / 60:.1f} min] " + " | ".join(parts)


__all__ = ["ProgressPrinter"]
