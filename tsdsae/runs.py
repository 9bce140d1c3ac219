"""One owner of a run's folder and of training jobs: where a run lives, what its files are
called, its typed stage markers and result, and the jobs (stage, members, starting points) that
train it.

A run folder, `checkpoint.root/name` (a local folder or an s3:// URI), holds:

    last.pt          the run's latest state (tsdsae.trainer.Run.state_dict): THE resume point,
                     whichever path trains it (one process, N Ray workers, a pack of runs)
    best.pt          the best-validation state of the last stage (what gets evaluated)
    stage_<k>.json   a StageMarker, written when the run finished stage k
    result.json      the summary of a finished, evaluated run
    progress.json    the latest epochs (written by rank 0 for the driver's progress line)
    diverged.json    a loss term became NaN or inf (rank 0 -> the driver)
    report/          the run's page

One resume rule: a run continues from its own last.pt, however it was started; without one, from
its job's starting point (a shared stage 1's folder, named by the job, never by a stored file),
else from its initialisation. Locations are resolved once, on the driver (`resolve_locations`):
Ray workers run in other working directories and need absolute paths and an explicit endpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Sequence

from tsdsae import schedule
from tsdsae.config import RunConfig, apply_overrides
from tsdsae.storage import Store, absolute_location, open_store, resolve_endpoint

LAST, BEST, RESULT = "last.pt", "best.pt", "result.json"
PROGRESS, DIVERGED, PAGE = "progress.json", "diverged.json", "report"


class MarkerError(ValueError):
    """A stage marker or result file that is not what this project writes (names the file)."""


@dataclasses.dataclass(frozen=True)
class StageMarker:
    """Stage `stage` of a run has finished: its last epoch, that epoch's val loss, the best
    val loss of the last stage so far and its epoch (-1: none), and whether early stopping
    ended it."""

    stage: int
    epoch: int
    val_loss: float
    best_val: float
    best_epoch: int
    stopped_early: bool

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["best_val"] = None if math.isinf(self.best_val) else self.best_val
        return json.dumps(d, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "StageMarker":
        """Raises MarkerError naming `where` when `data` is not a marker of this project."""
        try:
            d = json.loads(data)
            best = d["best_val"]
            return cls(stage=int(d["stage"]), epoch=int(d["epoch"]),
                       val_loss=float(d["val_loss"]),
                       best_val=math.inf if best is None else float(best),
                       best_epoch=int(d["best_epoch"]), stopped_early=bool(d["stopped_early"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise MarkerError(f"{where} is not a stage marker of tsdsae ({exc!r}); delete it to "
                              "train that stage again") from None


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """A run's folder: `uri` (an absolute local path or s3:// URI) and its S3 `endpoint`."""

    uri: str
    endpoint: str | None = None

    @classmethod
    def of(cls, cfg: RunConfig) -> "RunFolder":
        """The folder of `cfg`: checkpoint.root/name, absolute, with the resolved endpoint."""
        endpoint = resolve_endpoint(cfg.data.endpoint_url or None)
        return cls(open_store(f"{absolute_location(cfg.checkpoint.root).rstrip('/')}/{cfg.name}",
                              endpoint).uri, endpoint)

    @property
    def store(self) -> Store:
        return open_store(self.uri, self.endpoint)

    def file(self, name: str) -> str:
        """The URI of file `name` in the folder."""
        return f"{self.uri}/{name}"

    @property
    def last(self) -> str:
        return self.file(LAST)

    @property
    def best(self) -> str:
        return self.file(BEST)

    def marker(self, stage: int) -> StageMarker | None:
        """Stage `stage`'s marker, None when the stage has not finished. Raises MarkerError."""
        name = f"stage_{stage}.json"
        store = self.store
        if not store.exists(name):
            return None
        return StageMarker.from_json(store.read_bytes(name), self.file(name))

    def write_marker(self, marker: StageMarker) -> None:
        self.store.write_bytes(f"stage_{marker.stage}.json", marker.to_json())

    def read_json(self, name: str) -> dict | None:
        """A JSON object file of the folder (result.json, diverged.json, ...); None when absent.
        Raises MarkerError when it is not a JSON object."""
        store = self.store
        if not store.exists(name):
            return None
        try:
            value = json.loads(store.read_bytes(name))
        except ValueError as exc:
            raise MarkerError(f"{self.file(name)} is not JSON ({exc}); delete it") from None
        if not isinstance(value, dict):
            raise MarkerError(f"{self.file(name)} is not a JSON object; delete it")
        return value

    def write_json(self, name: str, value: dict) -> None:
        self.store.write_bytes(name, json.dumps(value, indent=1).encode())


def resolve_locations(cfg: RunConfig) -> RunConfig:
    """The config as workers need it, resolved on the driver: AWS_ENDPOINT_URL made explicit,
    and a local dataset path and checkpoint root made absolute."""
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


# -- jobs -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One training job: stage `stage` of every member run, side by side in one trainer (one
    Ray Train job on Ray). `starts[k]`: the run folder member k starts from when it has no
    last.pt of its own (a shared stage 1), or None. Each member trains the epochs of its stage
    (tsdsae.schedule.stage_epochs) and stops there."""

    stage: int
    members: tuple[RunConfig, ...]
    starts: tuple[str | None, ...]

    def __post_init__(self) -> None:
        if not self.members or len(self.starts) != len(self.members):
            raise ValueError("a job needs members and one start (or None) per member")

    @property
    def until(self) -> list[int]:
        """Per member, the epoch its stage ends before."""
        return [stage_end(cfg, self.stage) for cfg in self.members]

    @property
    def name(self) -> str:
        return f"stage_{self.stage}"


def stage_end(cfg: RunConfig, stage: int) -> int:
    s = cfg.schedule
    return schedule.stage_epochs(s.variant, stage, s.switch_epoch, s.max_epochs).stop


def run_jobs(cfg: RunConfig, start: str | None = None) -> list[Job]:
    """The jobs of one run, one per stage (DSAE has one). With `start` (the folder of a shared
    stage 1), stage 1 is that run's and only stage 2 is this run's."""
    stages = range(1, schedule.num_stages(cfg.schedule.variant) + 1)
    return [Job(k, (cfg,), (start if k == 2 else None,)) for k in stages
            if not (start and k == 1)]


def pack_jobs(jobs: Sequence[Job], size: int, signature=lambda cfg: None) -> list[Job]:
    """Jobs of one stage whose members share `signature(cfg)` merged into jobs of up to `size`
    members (the order of first appearance kept); size 1 returns `jobs` as they are."""
    if size <= 1:
        return list(jobs)
    out: list[Job] = []
    open_jobs: dict[tuple, Job] = {}
    for job in jobs:
        for cfg, start in zip(job.members, job.starts):
            key = (job.stage, signature(cfg))
            current = open_jobs.get(key)
            if current is not None and len(current.members) < size:
                merged = Job(job.stage, current.members + (cfg,), current.starts + (start,))
                out[out.index(current)] = merged
                open_jobs[key] = merged
            else:
                open_jobs[key] = Job(job.stage, (cfg,), (start,))
                out.append(open_jobs[key])
    return out


def pending(job: Job) -> list[bool]:
    """Per member, whether its stage still has to be trained (no marker for it, no result)."""
    out = []
    for cfg in job.members:
        folder = RunFolder.of(cfg)
        out.append(folder.read_json(RESULT) is None and folder.marker(job.stage) is None)
    return out


__all__ = ["RunFolder", "StageMarker", "MarkerError", "Job", "run_jobs", "pack_jobs", "pending",
           "resolve_locations", "stage_end", "LAST", "BEST", "RESULT", "PROGRESS", "DIVERGED",
           "PAGE"]
