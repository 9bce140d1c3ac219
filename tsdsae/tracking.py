"""What is logged, where: MLflow behind one small tracker object (the only module importing mlflow).

    tracker = start_run(cfg, run_key)            # create, or resume, the run tagged with run_key
    trainer = Trainer(cfg, callbacks=[tracker])  # per-epoch metrics (a tracker is a callback)
    log_final(tracker, model, data, scores, best_uri)
    tracker.finish()

`Tracker` is the interface and does nothing: it is what a loop gets when tracking is off and on
every Ray rank but 0, so loops never ask "which rank am I" or "is tracking on". `MlflowTracker`
logs through `mlflow.MlflowClient` only (no fluent global run): several runs may be open in one
process, and a run survives its processes.

One run per training, across restarts: the run carries the tag `tsdsae.run_key` (the run's
checkpoint location), and `start_run` resumes the run with that tag instead of making a second
one. Per-epoch metrics are logged at step = epoch, and an epoch already in the run's history is
not logged again (a worker restarted from an older checkpoint repeats some epochs).

Nesting (a Ray Tune sweep): the sweep opens its own run with `open_run(...)` and passes that run's
id as `parent_run_id` to `start_run` (or to `tsdsae.ray_train.train_driver_fn` as the
`parent_run_id` key); each trial's run is then an MLflow child of the sweep's run.

Tracking URI: `tracking.uri`, else MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the working
directory (no server needed; MLflow 3 no longer accepts a plain file store). Relative sqlite
paths are made absolute so that Ray workers, whatever their working directory, share the file.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from tsdsae.config import RunConfig, to_flat

RUN_KEY_TAG = "tsdsae.run_key"
PARENT_TAG = "mlflow.parentRunId"          # MLflow's own nesting tag
DEFAULT_URI = "sqlite:///mlflow.db"
# Logged with every epoch: its metric history tells which epochs a resumed run already has.
EPOCH_SENTINEL = "stage"
EVAL_SPLIT_TAG = "tsdsae.eval_split"       # the split the eval_* metrics score


def resolve_tracking_uri(uri: str = "") -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; relative sqlite paths made
    absolute (from the working directory of the process that resolves it). A user:password@ in
    an http(s) URI moves to MLflow's basic-auth environment variables (see _move_credentials);
    the URI returned has none."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    uri = _move_credentials(uri)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = uri[len(prefix):]
        if path and path != ":memory:":
            uri = prefix + str(Path(path).absolute())
    return uri


def _move_credentials(uri: str) -> str:
    """A tracking URI with user:password@ -> the URI without them; the credentials go to
    MLflow's own basic-auth variables (MLFLOW_TRACKING_USERNAME / _PASSWORD) of this process,
    so they reach the server but never a log line, a param or a printed link."""
    from urllib.parse import unquote, urlsplit

    from tsdsae.storage import redact_url

    if "://" not in uri or "@" not in urlsplit(uri).netloc:
        return uri
    user, _, password = urlsplit(uri).netloc.rpartition("@")[0].partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return redact_url(uri)


def run_key(location: str) -> str:
    """The identity of a training run: its absolute checkpoint location (a path or s3:// URI)."""
    from tsdsae.storage import open_store
    return open_store(location).uri


class Tracker:
    """The tracking interface; this base logs nothing (tracking off, or a Ray rank other than 0)."""

    run_id: str | None = None
    uri: str | None = None
    active = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Run parameters (the dotted config keys)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Numeric metrics at one step."""

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """One epoch's record (tsdsae.trainer's dict) at step = record["epoch"], once per epoch."""

    def latest_metrics(self) -> dict[str, float]:
        """The run's latest value of every metric logged so far."""
        return {}

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a local file into the run's artifacts (under `artifact_path`)."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """String tags on the run."""

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED (or FAILED / KILLED)."""

    def fail(self, exc: BaseException) -> None:
        """Mark the run ended by `exc`: KILLED for an interrupt (Ctrl-C), else FAILED."""
        self.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")

    def __call__(self, record: Mapping[str, Any]) -> None:
        """A tsdsae.trainer.Trainer callback: log the epoch's record."""
        self.log_epoch(record)


class NullTracker(Tracker):
    """Explicitly nothing: the tracker of a run without tracking."""


def epoch_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of an epoch record, without the step itself ("epoch") and flags."""
    return {k: float(v) for k, v in record.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MlflowTracker(Tracker):
    """Logs to one existing MLflow run (`run_id`) in the store at `uri`."""

    active = True

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(uri)
        self._last_epoch: int | None = None      # read from the run on the first log_epoch

    def __repr__(self) -> str:
        from tsdsae.storage import redact_url
        return f"MlflowTracker(run_id={self.run_id!r}, uri={redact_url(self.uri)!r})"

    # -- logging ----------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = {k: _param_value(v) for k, v in params.items()}
        changed = sorted(k for k, v in new.items() if k in existing and existing[k] != v)
        if changed:
            detail = ", ".join(f"{k}: {existing[k]!r} -> {new[k]!r}" for k in changed[:5])
            raise ValueError(
                f"MLflow run {self.run_id} was started with other values of {detail}; a resumed "
                "run must keep its configuration (use another run name for a new run)")
        todo = [Param(k, v) for k, v in new.items() if k not in existing]
        for start in range(0, len(todo), 100):             # MLflow's per-request limit
            self.client.log_batch(self.run_id, params=todo[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def latest_metrics(self) -> dict[str, float]:
        return dict(self.client.get_run(self.run_id).data.metrics)

    def last_logged_epoch(self) -> int:
        """The highest epoch already in the run's history (-1 if none)."""
        if self._last_epoch is None:
            history = self.client.get_metric_history(self.run_id, EPOCH_SENTINEL)
            self._last_epoch = max((m.step for m in history), default=-1)
        return self._last_epoch

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        epoch = int(record["epoch"])
        if epoch <= self.last_logged_epoch():
            return                # a repeated epoch after a restart: its metrics are there
        metrics = epoch_metrics(record)
        metrics.setdefault(EPOCH_SENTINEL, 0.0)
        self.log_metrics(metrics, step=epoch)
        self._last_epoch = epoch

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _param_value(value: Any) -> str:
    # What MLflow stores for a param; comparing in this form detects a changed configuration.
    return str(value)


# -- opening runs --------------------------------------------------------------------------------


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created if missing (safe when several processes race)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException:
            exp = client.get_experiment_by_name(name)   # another process created it first
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise ValueError(f"MLflow experiment {name!r} is deleted; restore it or set "
                         "tracking.experiment to another name")
    return exp.experiment_id


# MLflow 3's UI opens an experiment in its GenAI view (traces) unless the experiment says it holds
# model-training runs; its description and a run's description are these note tags.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"


def describe_experiment(uri: str, experiment: str, description: str) -> str:
    """Find or create `experiment`, mark it as a model-training experiment (so the UI shows its
    runs table) with `description` (Markdown); returns its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_tracking_uri(uri))
    exp_id = experiment_id(client, experiment)
    client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    client.set_experiment_tag(exp_id, NOTE_TAG, description)
    return exp_id


def describe_run(uri: str, run_id: str, markdown: str) -> None:
    """Set a run's description (shown on its overview page) to `markdown`."""
    from mlflow.tracking import MlflowClient

    MlflowClient(resolve_tracking_uri(uri)).set_tag(run_id, NOTE_TAG, markdown)


def find_runs(uri: str, experiment: str, key: str) -> list:
    """Runs (mlflow.entities.Run) of `experiment` tagged with run key `key`, newest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    quoted = key.replace("\\", "\\\\").replace("'", "\\'")
    return list(client.search_runs([exp.experiment_id],
                                   filter_string=f"tags.`{RUN_KEY_TAG}` = '{quoted}'",
                                   order_by=["attributes.start_time DESC"]))


def open_run(uri: str, experiment: str, key: str, run_name: str | None = None,
             parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None,
             resume: bool = True) -> MlflowTracker:
    """The run tagged `key` in `experiment`: resumed (status RUNNING again) if it exists and
    `resume`, else created. `parent_run_id` makes a new run a child of that run (a sweep's run).
    With `resume=False` an older run with this key loses the key (it stays, untouched)."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(uri)
    client = MlflowClient(uri)
    exp_id = experiment_id(client, experiment)
    runs = find_runs(uri, experiment, key)
    if runs and resume:
        run = runs[0]
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        tracker = MlflowTracker(uri, run.info.run_id)
        if tags:
            tracker.set_tags(tags)
        return tracker
    all_tags = {RUN_KEY_TAG: key, **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        client.get_run(parent_run_id)          # fail now, with MLflow's message, if it is wrong
        all_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    for old in runs:
        client.set_tag(old.info.run_id, RUN_KEY_TAG, f"{key}#replaced-by-{run.info.run_id}")
    return MlflowTracker(uri, run.info.run_id)


def start_run(cfg: RunConfig, key: str, parent_run_id: str | None = None,
              tags: Mapping[str, Any] | None = None, resume: bool = True) -> Tracker:
    """The tracker of one training run: NullTracker when `cfg.tracking.enabled` is off, else the
    (created or resumed) MLflow run `key` named cfg.name, with the dotted config keys as params.
    `parent_run_id` nests the run under a parent run (e.g. a Tune sweep's)."""
    if not cfg.tracking.enabled:
        return NullTracker()
    tracker = open_run(cfg.tracking.uri, cfg.tracking.experiment, key, run_name=cfg.name,
                       parent_run_id=parent_run_id, tags=tags, resume=resume)
    tracker.log_params(to_flat(cfg))
    return tracker


# -- a sweep's runs: roles and tags --------------------------------------------------------------

ROLE_TAG = "tsdsae.role"                   # sweep (the parent), trial, shared_stage_1
BEST_CHECKPOINT_TAG = "tsdsae.best_checkpoint"
GRID_VARIANT = "schedule.variant"


def grid_tags(coords: Mapping[str, Any], variant: str | None) -> dict[str, str]:
    """A run's grid coordinates as `grid.<key>` tags (lists and dicts as JSON)."""
    tags = {f"grid.{k}": json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            for k, v in coords.items()}
    if variant:
        tags[f"grid.{GRID_VARIANT}"] = variant
    return tags


def start_sweep_run(cfg: RunConfig, parent_run_id: str, role: str, group: str,
                    coords: Mapping[str, Any], variant: str | None = None,
                    shared_by: tuple[str, ...] = (), forked: bool = False,
                    **extra: str) -> Tracker:
    """The MLflow run of one run of a sweep (created, or found again by its folder's key),
    a child of the sweep's run, with its role, group, grid coordinates and `extra` tags:
    a "trial" (one grid point; `forked` when its stage 1 is a shared one) or a
    "shared_stage_1" (trained once for the variants in `shared_by`)."""
    from tsdsae.runs import RunFolder

    location = RunFolder.of(cfg).uri
    tags = {ROLE_TAG: role, "tsdsae.run_dir": location, "tsdsae.group": group,
            **grid_tags(coords, variant), **extra}
    if role == "shared_stage_1":
        tags["tsdsae.shared_by"] = ",".join(shared_by)
    else:
        tags["tsdsae.shared_stage_1"] = str(forked)
    return start_run(cfg, run_key(location), parent_run_id=parent_run_id, tags=tags)


def attach(uri: str | None, run_id: str | None, active: bool = True) -> Tracker:
    """A tracker on an existing run (e.g. inside a Ray worker): MlflowTracker when `active` and
    there is a run, else NullTracker. Ray workers pass active = (rank == 0)."""
    if not (active and run_id and uri):
        return NullTracker()
    return MlflowTracker(uri, run_id)


# -- the end of a run ----------------------------------------------------------------------------


def reconstruction_png(model, split, path: str | os.PathLike, n: int = 4, seed: int = 0) -> Path:
    """A PNG of log-mel spectrograms (tsdsae.figures.spectrogram_grid) for the first n clips of
    `split`: input, reconstruction, and global swap decode(z_i, v_j) with j of another
    instrument. Returns its path."""
    import numpy as np
    import torch

    from tsdsae import features
    from tsdsae.evaluate import pair_other_instrument
    from tsdsae.figures import spectrogram_grid

    device = next(model.parameters()).device
    labels = split.instrument.cpu().numpy()
    n = min(n, len(split))
    idx = torch.arange(n)
    try:
        partner = torch.from_numpy(pair_other_instrument(labels, seed)[:n])
    except ValueError:                        # one instrument only: swap with the next clip
        partner = (idx + 1) % len(split)
    x, m = split.features[idx].to(device), split.mask[idx].to(device)
    xj, mj = split.features[partner].to(device), split.mask[partner].to(device)
    model.eval()
    with torch.no_grad():
        recon, gswap = model.reconstruct(x, m), model.swap_global(x, m, xj, mj)
    silence = float(np.log(features.LOG_EPS))           # padding shown as silence
    names = split.instruments
    rows = []
    for k in range(n):
        a, b = names[labels[k]], names[labels[int(partner[k])]]
        shown = [t[k].masked_fill(~m[k][:, None], silence) for t in (x, recon, gswap)]
        rows.append([(f"input: {a}", shown[0]), ("reconstruction", shown[1]),
                     (f"global swap: v of {b}", shown[2])])
    return spectrogram_grid(rows, path, title="input, reconstruction, global swap")


def evaluate_and_log(tracker: Tracker, cfg: RunConfig, model, data, result: Mapping[str, Any],
                     checkpoint_uri: str | None = None, endpoint_url: str | None = None,
                     device="cpu", page_in: str | None = None) -> dict[str, Any]:
    """The end of a run: tsdsae.evaluate.evaluate_run with `cfg.eval` (the same scores with
    tracking on or off), then `log_final` at the best epoch with the best_val / best_epoch /
    epochs_run of `result`; with `page_in` (the run's folder), also the run's page
    (`write_page`), whose location the scores give as "page". Returns the scores (with "split",
    the split they score)."""
    from tsdsae.evaluate import evaluate_run

    scores = evaluate_run(model, data, cfg.eval, device=device)
    log_final(tracker, model, data, scores, checkpoint_uri, endpoint_url, cfg.eval.split,
              step=max(result["best_epoch"], 0),
              summary={k: result[k] for k in ("best_val", "best_epoch", "epochs_run")},
              figures=cfg.tracking.figures)
    if page_in and checkpoint_uri:
        scores["page"] = write_page(tracker, page_in, checkpoint_uri, data[cfg.eval.split],
                                    cfg.eval.split, scores, endpoint_url)
    return scores


def write_page(tracker: Tracker, run_dir: str, checkpoint_uri: str, split, split_name: str,
               scores: Mapping[str, Any], endpoint_url: str | None = None) -> str:
    """The run's page (tsdsae.run_report.write_run_page) with its scores.json and WAVs, written
    to `run_dir`/report/ through tsdsae.storage (a local folder or s3://) and logged to the
    run's MLflow run under report/. Returns the page's location."""
    from tsdsae.run_report import write_run_page
    from tsdsae.storage import open_store

    store = open_store(f"{run_dir.rstrip('/')}/report", endpoint_url)
    with tempfile.TemporaryDirectory() as tmp:
        page = write_run_page(checkpoint_uri, split, split_name, scores, tmp, endpoint_url)
        for name in ("report.html", "scores.json"):
            tracker.log_artifact(Path(tmp) / name, "report")
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                store.upload_file(path, path.relative_to(tmp).as_posix())
    return store.url(page.name)


def log_final(tracker: Tracker, model, data, scores: Mapping[str, Any],
              checkpoint_uri: str | None = None, endpoint_url: str | None = None,
              split: str = "test", step: int = 0, summary: Mapping[str, Any] | None = None,
              figures: bool = False) -> None:
    """The end of a run: the scores of the evaluation split `split` as eval_* and the tag
    tsdsae.eval_split, the validation split's scores beside them as they are named (val_*);
    NaN ones (e.g. a pitch metric with no voiced clip) are left out. Also `summary` numbers
    (best_val, ...), a reconstruction-spectrogram PNG of `split`, the checkpoint file (local or
    s3://) and, with `figures`, the pictures and sounds of tsdsae.figures.trial_artifacts
    (swap grid, swap WAVs, v projection, z paths)."""
    if not tracker.active:
        return
    metrics = {k if k.startswith("val_") else f"eval_{k}": v for k, v in scores.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(float(v))}
    metrics.update({k: v for k, v in (summary or {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(float(v))})
    # A rerun of a finished run evaluates the same checkpoint again: log only what is new.
    logged = tracker.latest_metrics()
    tracker.log_metrics({k: v for k, v in metrics.items() if logged.get(k) != float(v)}, step=step)
    tracker.set_tags({EVAL_SPLIT_TAG: split})
    with tempfile.TemporaryDirectory() as tmp:
        png = reconstruction_png(model, data[split], Path(tmp) / "reconstructions.png")
        tracker.log_artifact(png, "figures")
        if figures:
            from tsdsae.figures import trial_artifacts

            out = Path(tmp) / "trial"
            for path in trial_artifacts(model, data, out, split=split):
                rel = path.relative_to(out).parent
                tracker.log_artifact(path, "figures" if str(rel) == "." else f"figures/{rel}")
        if checkpoint_uri:
            from tsdsae.storage import open_store

            parent, _, name = checkpoint_uri.rstrip("/").rpartition("/")
            local = Path(tmp) / name
            open_store(parent or ".", endpoint_url).download_file(name, local)
            tracker.log_artifact(local, "checkpoint")
