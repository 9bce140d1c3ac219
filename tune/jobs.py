"""From grid points to training jobs: which runs a Tune trial holds, which stage each job trains,
which runs share a job, and where each run starts from. Pure functions of their arguments (no
Ray, no MLflow, no storage): tune/robustness_sweep.py runs what they plan.

A trial holds one trial group (tune.grid.TrialGroup), or with packs a bundle of them. Its runs:
  - a shared stage 1 (`<sweep>-<group>-stage1`, role "shared_stage_1") when the group's
    variants share stage 1 (dsae_freeze, ts_dsae_wo_reg, ts_dsae for the same seed and keys):
    it trains stage 1 only, and each variant's run (`<sweep>-<group>-<variant>`, role "trial")
    starts its stage 2 from that folder (tsdsae.runs.Job.starts);
  - otherwise one run per variant that trains every stage itself.
Jobs: one per stage of each run (tsdsae.runs.run_jobs), every stage 1 before every stage 2;
with packs of K, the jobs of one stage are merged into jobs of up to K runs
(tsdsae.runs.pack_jobs), each one Ray Train job.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from tsdsae.config import PRESETS, RunConfig, apply_overrides
from tsdsae.runs import Job, RunFolder, pack_jobs, resolve_locations, run_jobs
from tune.grid import SHARED_STAGE_1, VARIANT_KEY, group_key


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """What every run of a sweep shares: its name, preset, checkpoint root (under the sweep's
    storage), MLflow location, S3 endpoint and pack size."""

    name: str
    preset: str
    checkpoint_root: str
    tracking_uri: str
    experiment: str
    endpoint_url: str = ""
    pack: int = 1


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a trial: its config, its MLflow role ("trial" or "shared_stage_1"), its
    group's key and grid coordinates, its variant (None for a shared stage 1: it trains for
    every variant in `shared_by`), and the folder its stage 2 starts from (or None)."""

    cfg: RunConfig
    role: str
    group: str
    coords: dict[str, Any]
    variant: str | None
    shared_by: tuple[str, ...] = ()
    start: str | None = None

    @property
    def jobs(self) -> list[Job]:
        jobs = run_jobs(self.cfg, self.start)
        return jobs[:1] if self.role == "shared_stage_1" else jobs


def run_config(sweep: SweepSettings, overrides: dict, variant: str, name: str) -> RunConfig:
    """The RunConfig of one run of the sweep, with its locations resolved (driver side)."""
    updates = {**overrides, VARIANT_KEY: variant, "name": name,
               "checkpoint.root": sweep.checkpoint_root, "tracking.uri": sweep.tracking_uri,
               "tracking.experiment": sweep.experiment, "tracking.enabled": True}
    if sweep.endpoint_url:
        updates["data.endpoint_url"] = sweep.endpoint_url
    return resolve_locations(apply_overrides(PRESETS[sweep.preset](), updates))


def shares_stage_1(group: dict) -> bool:
    """Whether the group's variants share one stage 1 (tune.grid.trial_groups)."""
    return len(group["variants"]) > 1 and all(v in SHARED_STAGE_1 for v in group["variants"])


def plan_runs(sweep: SweepSettings, bundle: dict) -> list[PlannedRun]:
    """The runs of one trial (a bundle of trial groups, as dicts: key, overrides, variants,
    coords), shared stages 1 first."""
    runs: list[PlannedRun] = []
    for group in bundle["groups"]:
        prefix = f"{sweep.name}-{group['key']}"
        start = None
        if shares_stage_1(group):
            shared = run_config(sweep, group["overrides"], group["variants"][0],
                                f"{prefix}-stage1")
            runs.append(PlannedRun(shared, "shared_stage_1", group["key"], group["coords"], None,
                                   tuple(group["variants"])))
            start = RunFolder.of(shared).uri
        for variant in group["variants"]:
            cfg = run_config(sweep, group["overrides"], variant, f"{prefix}-{variant}")
            runs.append(PlannedRun(cfg, "trial", group["key"], group["coords"], variant,
                                   start=start))
    return runs


def plan_jobs(runs: list[PlannedRun], pack: int = 1) -> list[Job]:
    """Every job of `runs`: all stage-1 jobs, then all stage-2 jobs, merged into packs of up to
    `pack` runs that read one dataset on one device."""
    jobs = sorted((job for run in runs for job in run.jobs), key=lambda job: job.stage)
    return pack_jobs(jobs, pack, signature=lambda cfg: (cfg.data, cfg.device))


def bundles(groups: list, size: int) -> list[dict]:
    """Trial groups as Tune trials: one group per trial unpacked (size 1); packed, groups on one
    dataset go into one trial, as many as keep each stage's jobs within `size` runs (a group
    adds one run to stage 1, and its variants to stage 2 when they share stage 1). Returns
    [{"key", "groups": [group dicts]}]."""
    def as_dict(g) -> dict:
        return {"key": g.key, "overrides": g.overrides, "variants": list(g.variants),
                "coords": g.coords}

    if size <= 1:
        return [{"key": g.key, "groups": [as_dict(g)]} for g in groups]
    by_data: dict[Any, list] = {}
    for g in groups:
        key = (g.overrides.get("data.uri"), g.overrides.get("device"))
        by_data.setdefault(key, []).append(as_dict(g))
    out = []
    for members in by_data.values():
        bundle: list[dict] = []
        for g in members:
            stage_2 = len(g["variants"]) if shares_stage_1(g) else 0
            if bundle and (len(bundle) + 1 > size or sum(
                    len(b["variants"]) for b in bundle if shares_stage_1(b)) + stage_2 > size):
                out.append(bundle)
                bundle = []
            bundle.append(g)
        out.append(bundle)
    return [{"key": group_key({"groups": [g["key"] for g in b]}), "groups": b} for b in out]


def concurrent_trials(options: dict, resources: dict) -> int:
    """How many trials run at once: as many training runs as the cluster's `resources` (CPUs
    and GPUs) hold (each trial process itself holds 0.01 CPU). Trials beyond that would start,
    hold their 0.01 CPU and wait, which can leave too little for the next run's workers."""
    workers = options["num_workers"]
    per_trial = workers * options["cpus_per_worker"] + 0.01
    n = int(resources.get("CPU", 1) // per_trial)
    if options.get("use_gpu"):
        n = min(n, int(resources.get("GPU", 0) // (workers * options["gpus_per_worker"])))
    return max(1, n)


__all__ = ["SweepSettings", "PlannedRun", "run_config", "shares_stage_1", "plan_runs",
           "plan_jobs", "bundles", "concurrent_trials"]
