"""The robustness sweep: a Ray Tune grid over the Ray Train driver, tracked in MLflow, reported
as tables and box plots.

    python tune/robustness_sweep.py --smoke-test                      # minutes on 2 CPUs
    python tune/robustness_sweep.py --grid paper --data s3://bkt/dmelodies --data s3://bkt/urmp \
        --storage s3://bkt/sweeps --gpus-per-trial 0.25               # the paper's 288 runs
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python tune/robustness_sweep.py --smoke-test --storage /abs/sweeps

Three levels, named by the process they run in:
    main / run_sweep     the driver: grid -> trial groups -> Tuner; the MLflow parent run; report
    trial_fn(config)     one Tune trial = one trial group (tune.grid.TrialGroup), or with packs
                         a bundle of them: calls tsdsae.ray_train.train_driver_fn for each of
                         its model variants
    (Ray Train workers)  tsdsae.ray_train.train_loop_per_worker, one DDP job per stage

Stage-1 sharing: dsae_freeze, ts_dsae_wo_reg and ts_dsae share stage 1 for the same seed, z_dim,
optimiser, dataset and every other key, so their group trains stage 1 once (its own run,
`<sweep>-<group>-stage1`) and forks stage 2 per variant from that checkpoint. Stage 1 is a pure
function of the config without the variant, so each variant's result equals an unshared run's.

Packs (`--pack K`, tsdsae.packed_train): runs of one architecture on one dataset (seeds,
optimisers, variants) join one Tune trial, a bundle of trial groups, and train as packed models
of up to K members, one Ray Train job per pack: first every group's stage 1 (shared) or whole
run (DSAE) side by side, then the stage 2 of every two-stage variant side by side, each member
exactly as its run alone, with its own checkpoints and MLflow child run; the trial then only
evaluates each run. 'auto' is 1 (no packing): on this project's CPU packing measured no faster,
and on an H200 packs beat one run after another only from K = 32 (README, "Packed trials").

MLflow: one parent run per sweep (found again by its key on --resume), one child run per grid
point (model variant) tagged with its grid coordinates, plus one child run per shared stage 1.
Children are created with the parent's run id explicitly, so nesting survives Ray's processes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout or a job's working dir
    sys.path.insert(0, str(ROOT))

from tsdsae import tracking  # noqa: E402
from tsdsae.cli import UsageError, cli_main  # noqa: E402
from tsdsae.config import PRESETS, apply_overrides  # noqa: E402
from tsdsae.storage import absolute_location, open_store, redact_url  # noqa: E402
from tune.grid import (SHARED_STAGE_1, VARIANT_KEY, group_key, load_grid,  # noqa: E402
                       narrow, parse_only, trial_groups, validate)

SWEEP_KEY_TAG = "tsdsae.sweep_key"
ROLE_TAG = "tsdsae.role"
BEST_CHECKPOINT_TAG = "tsdsae.best_checkpoint"
EXPERIMENT_NOTE = (
    "Robustness sweeps of the DSAE family (DSAE, DSAE-freeze, TS-DSAE w/o reg, TS-DSAE). Each "
    "sweep is a parent run (role `sweep`) whose description holds the summary table and whose "
    "artifacts hold `report/report.html` (the figure and the swaps to listen to); expand it to see "
    "one child run per grid point (metrics `eval_pre_swap`, `eval_gswap`, `eval_lswap` on the "
    "scored split; figures and swap WAVs under `figures/`).")


# ---------------------------------------------------------------------------------------------
# Trial side (a Ray Tune trial process)


def _run_config(sweep: dict, overrides: dict, variant: str, name: str):
    cfg = PRESETS[sweep["preset"]]()
    cfg = apply_overrides(cfg, {**overrides, VARIANT_KEY: variant, "name": name,
                                "checkpoint.root": sweep["checkpoint_root"],
                                "tracking.uri": sweep["tracking_uri"],
                                "tracking.experiment": sweep["experiment"],
                                "tracking.enabled": True})
    if sweep.get("endpoint_url"):
        cfg = apply_overrides(cfg, {"data.endpoint_url": sweep["endpoint_url"]})
    return cfg


def _coord_tags(coords: dict, variant: str | None) -> dict[str, str]:
    tags = {f"grid.{k}": json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            for k, v in coords.items()}
    if variant:
        tags[f"grid.{VARIANT_KEY}"] = variant
    return tags


def _shared_stage_1(sweep: dict, group: dict, options: dict) -> dict:
    """Train (or find) the group's shared stage 1; returns its stage_1.json marker."""
    from tsdsae.ray_train import resolve_locations, run_dir, run_stage, split_config

    cfg = resolve_locations(_run_config(sweep, group["overrides"], group["variants"][0],
                                        f"{sweep['name']}-{group['key']}-stage1"))
    location = run_dir(cfg)
    store = open_store(location, cfg.data.endpoint_url or None)
    if store.exists("stage_1.json"):
        return json.loads(store.read_bytes("stage_1.json"))
    tracker = tracking.start_run(
        cfg, tracking.run_key(location), parent_run_id=sweep["parent_run_id"],
        tags={ROLE_TAG: "shared_stage_1", "tsdsae.run_dir": location,
              "tsdsae.shared_by": ",".join(group["variants"]),
              **_coord_tags(group["coords"], None)})
    try:
        _, ray_options = split_config({"run_config": cfg, **options})
        result = run_stage(cfg, ray_options, 1, None, tracker)
    except BaseException as exc:
        tracker.fail(exc)
        raise
    marker = {"stage": 1, "checkpoint": result.checkpoint.path,
              "metrics": {k: v for k, v in result.metrics.items()
                          if isinstance(v, (int, float, str, bool))},
              "shared_from": location}
    store.write_bytes("stage_1.json", json.dumps(marker, indent=1).encode())
    tracker.finish()
    return marker


def _child_run(sweep: dict, group: dict, cfg, variant: str, shared: bool, **tags):
    """Create (or find) a grid point's MLflow child run, with its grid coordinates as tags."""
    from tsdsae.ray_train import run_dir

    return tracking.open_run(cfg.tracking.uri, cfg.tracking.experiment,
                             tracking.run_key(run_dir(cfg)), run_name=cfg.name,
                             parent_run_id=sweep["parent_run_id"],
                             tags={ROLE_TAG: "trial", "tsdsae.group": group["key"],
                                   "tsdsae.shared_stage_1": str(shared),
                                   **_coord_tags(group["coords"], variant), **tags})


def _is_shared(group: dict) -> bool:
    """Whether the group's variants share one stage 1 (tune.grid.trial_groups)."""
    return len(group["variants"]) > 1 and all(v in SHARED_STAGE_1 for v in group["variants"])


def _pack_job(options: dict, cfgs: list, trackers: list, pack_dir: str, starts=None,
              until=None) -> None:
    """One pack as one Ray Train job (tsdsae.ray_train.run_pack); a failure marks every
    member's MLflow run failed."""
    from tsdsae.ray_train import run_pack, split_config

    _, ray_options = split_config({"run_config": cfgs[0], **options})
    try:
        run_pack(cfgs, ray_options, pack_dir, trackers, starts, until)
    except BaseException as exc:
        for t in trackers:
            t.fail(exc)
        raise


def _train_bundle(sweep: dict, bundle: dict, options: dict) -> None:
    """Packed training (sweep["pack"] > 1) of every run of a bundle (runs of one architecture:
    seeds, optimisers, variants; see _bundles), as two packs, each one Ray Train job:

    1. from epoch 0: the shared stage 1 of each two-stage group (a member that stops at its
       switch epoch; its own run `<sweep>-<group>-stage1`, as unpacked) and every other run
       whole (DSAE; a two-stage variant that shares no stage 1);
    2. the stage 2 of every variant of the shared groups, each from its group's stage 1.

    Each phase is cut into packs of up to sweep["pack"] members (_bundles keeps it to one).

    Each member trains exactly as its run alone (tsdsae.packed_train) and logs to its own MLflow
    run. Afterwards each run has the stage markers (stage_<k>.json) that train_driver_fn reads,
    so trial_fn only evaluates. A pack whose members all have their markers is skipped; an
    interrupted one resumes from its pack.pt."""
    from tsdsae import checkpoint
    from tsdsae.ray_train import (STATE_FILE, _stage_checkpoint, pack_markers, ray_path,
                                  resolve_locations, run_dir, stage_jobs)

    root, prefix = sweep["checkpoint_root"], f"{sweep['name']}-{bundle['key']}"

    def cfg_of(group: dict, variant: str, suffix: str):
        return resolve_locations(_run_config(sweep, group["overrides"], variant,
                                             f"{sweep['name']}-{group['key']}-{suffix}"))

    def store_of(cfg):
        return open_store(run_dir(cfg), cfg.data.endpoint_url or None)

    # 1. first stages and whole runs
    first = []                                     # (group, cfg, store, shared)
    for group in bundle["groups"]:
        shared, variant = _is_shared(group), group["variants"][0]
        cfg = cfg_of(group, variant, "stage1" if shared else variant)
        first.append((group, cfg, store_of(cfg), shared))

    def has_markers(cfg, store, shared: bool) -> bool:
        names = (["stage_1.json"] if shared else
                 [f"stage_{stage}.json" for stage, _ in stage_jobs(cfg)])
        return store.exists("result.json") or all(store.exists(n) for n in names)

    size = max(1, int(sweep["pack"]))
    for c in range(0, len(first), size):
        chunk = first[c:c + size]
        pack_dir = f"{root}/{prefix}-pack-1.{c // size}"
        if all(has_markers(cfg, store, shared) for _, cfg, store, shared in chunk):
            continue
        tag = {"tsdsae.pack": pack_dir.rsplit("/", 1)[-1], "tsdsae.pack_size": str(len(chunk))}
        trackers = []
        for group, cfg, store, shared in chunk:
            key = tracking.run_key(run_dir(cfg))
            if shared:
                trackers.append(tracking.start_run(
                    cfg, key, parent_run_id=sweep["parent_run_id"],
                    tags={ROLE_TAG: "shared_stage_1", "tsdsae.run_dir": run_dir(cfg),
                          "tsdsae.shared_by": ",".join(group["variants"]),
                          **_coord_tags(group["coords"], None), **tag}))
            else:
                _child_run(sweep, group, cfg, group["variants"][0], False, **tag)
                trackers.append(tracking.start_run(cfg, key,
                                                   parent_run_id=sweep["parent_run_id"]))
        cfgs = [cfg for _, cfg, _, _ in chunk]
        _pack_job(options, cfgs, trackers, pack_dir,
                  until=[cfg.schedule.switch_epoch if shared else None
                         for _, cfg, _, shared in chunk])
        for (group, cfg, store, shared), marker, tracker in zip(chunk, pack_markers(cfgs, 1),
                                                                trackers):
            if shared:
                # the stage-1 state as a checkpoint folder (what stage 2 starts from)
                endpoint = cfg.data.endpoint_url or None
                state = checkpoint.load(f"{run_dir(cfg)}/last.pt", "cpu", endpoint)
                folder = f"{run_dir(cfg)}/stage_1_state"
                checkpoint.save(state, f"{folder}/{STATE_FILE}", endpoint)
                marker.update(checkpoint=ray_path(folder), shared_from=run_dir(cfg))
                store.write_bytes("stage_1.json", json.dumps(marker, indent=1).encode())
                tracker.finish()
            else:
                for stage, _ in stage_jobs(cfg):
                    store.write_bytes(f"stage_{stage}.json",
                                      json.dumps({**marker, "stage": stage}, indent=1).encode())

    # 2. stage 2 of the shared groups' variants
    second = []                                    # (group, variant, cfg, store, marker)
    for group, cfg1, store1, shared in first:
        if not shared:
            continue
        marker = json.loads(store1.read_bytes("stage_1.json"))
        for variant in group["variants"]:
            cfg = cfg_of(group, variant, variant)
            store = store_of(cfg)
            if not store.exists("stage_1.json"):
                store.write_bytes("stage_1.json", json.dumps(marker, indent=1).encode())
            second.append((group, variant, cfg, store, marker))
    for c in range(0, len(second), size):
        chunk = second[c:c + size]
        if all(store.exists("stage_2.json") or store.exists("result.json")
               for *_, store, _ in chunk):
            continue
        pack_dir = f"{root}/{prefix}-pack-2.{c // size}"
        tag = {"tsdsae.pack": pack_dir.rsplit("/", 1)[-1], "tsdsae.pack_size": str(len(chunk))}
        trackers = []
        for group, variant, cfg, _, _ in chunk:
            _child_run(sweep, group, cfg, variant, True, **tag)
            trackers.append(tracking.start_run(cfg, tracking.run_key(run_dir(cfg)),
                                               parent_run_id=sweep["parent_run_id"]))
        cfgs = [cfg for _, _, cfg, _, _ in chunk]
        _, filesystem = store_of(cfgs[0]).arrow_filesystem()
        _pack_job(options, cfgs, trackers, pack_dir,
                  starts=[_stage_checkpoint(m, filesystem) for *_, m in chunk])
        for (*_, store, _), marker in zip(chunk, pack_markers(cfgs, 2)):
            store.write_bytes("stage_2.json", json.dumps(marker, indent=1).encode())


def _finish_run(sweep: dict, group: dict, variant: str, marker: dict | None,
                options: dict) -> dict:
    """One grid point through tsdsae.ray_train.train_driver_fn: trains the stages that have no
    marker yet (none after packs) and evaluates the run; returns its summary."""
    from tsdsae.ray_train import driver_config, run_dir, train_driver_fn

    cfg = _run_config(sweep, group["overrides"], variant,
                      f"{sweep['name']}-{group['key']}-{variant}")
    store = open_store(run_dir(cfg), cfg.data.endpoint_url or None)
    if marker is not None and not store.exists("stage_1.json"):
        store.write_bytes("stage_1.json", json.dumps(marker, indent=1).encode())
    # Create (or find) the child run first so its grid tags are there from the start; the driver
    # resumes the same run by its key. A finished run is left as it is: the driver returns its
    # stored summary.
    if not store.exists("result.json"):
        _child_run(sweep, group, cfg, variant, marker is not None)
    summary = train_driver_fn(driver_config(cfg, parent_run_id=sweep["parent_run_id"], **options))
    if summary.get("mlflow_run_id"):            # where the report page finds the model to hear
        tracking.MlflowTracker(cfg.tracking.uri, summary["mlflow_run_id"]).set_tags(
            {BEST_CHECKPOINT_TAG: summary["best_checkpoint"]})
    return summary


def trial_fn(config: dict) -> None:
    """One Tune trial: every model variant of the trial groups of one bundle (one group unless
    runs are packed), each trained and evaluated as a full Ray Train run (_finish_run), the
    runs side by side as Ray tasks (their Train jobs take CPUs as they become free). With
    sweep["pack"] > 1 the bundle's runs first train in packs (_train_bundle), then are evaluated
    side by side as Ray tasks (a CPU share of a worker each), since a bundle holds many runs."""
    import ray
    from ray import tune

    sweep, bundle = config["sweep"], config["bundle"]
    options = dict(sweep["ray_options"])
    packed = int(sweep.get("pack", 1)) > 1
    if packed:
        _train_bundle(sweep, bundle, options)
    points = []                                      # (label, group, variant, stage-1 marker)
    for group in bundle["groups"]:
        label = f"{group['key']}/" if len(bundle["groups"]) > 1 else ""
        marker = _shared_stage_1(sweep, group, options) if _is_shared(group) else None
        points += [(label, group, variant, marker) for variant in group["variants"]]
    if len(points) > 1:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # Side by side, outside the trial's placement group (its 0.01 CPU), like the trial's Ray
        # Train jobs. After packs a task only evaluates (a worker's CPU share); otherwise each
        # task drives its run's Train jobs (which hold the workers' CPUs, queued by Ray until
        # CPUs are free) and then evaluates: every stage 2 of a shared stage 1 starts as soon
        # as CPUs allow instead of after the previous run's evaluation.
        task = ray.remote(_finish_run).options(
            num_cpus=options["cpus_per_worker"] if packed else 0.01,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
        summaries = ray.get([task.remote(sweep, group, variant, marker, options)
                             for _, group, variant, marker in points])
    else:
        summaries = [_finish_run(sweep, group, variant, marker, options)
                     for _, group, variant, marker in points]
    metrics: dict[str, Any] = {"bundle": bundle["key"]}
    for (label, _, variant, _), summary in zip(points, summaries):
        for k, v in (summary.get("eval") or {}).items():
            metrics[f"{label}{variant}/{k}"] = v
        metrics[f"{label}{variant}/best_val"] = summary["best_val"]
    tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})


# ---------------------------------------------------------------------------------------------
# Driver side


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tune/robustness_sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="paper",
                   help="shipped grid (paper, architecture, capacity, smoke) or a YAML file")
    p.add_argument("--data", action="append", default=[],
                   help="dataset URI (folder or s3://bucket/prefix; 'toy' for the built-in toy "
                        "data); repeat for several datasets")
    p.add_argument("--smoke-test", action="store_true",
                   help="the smoke grid (every model once, a few epochs) on --data or the toy data")
    p.add_argument("--only", action="append", default=[], metavar="KEY=V1,V2",
                   help="narrow an axis (or pin a key), e.g. --only model.z_dim=8,32")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a dotted override for every trial, e.g. --set schedule.max_epochs=500")
    p.add_argument("--name", help="sweep name (default: the grid's name); rerun the same name "
                                  "with --resume to continue it")
    p.add_argument("--storage", default="runs/sweeps",
                   help="results and checkpoints: a folder or s3://bucket/prefix")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--tracking-uri", default="",
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="tsdsae-sweeps", help="MLflow experiment")
    p.add_argument("--out", default="results", help="report folder (a subfolder per sweep)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="DDP workers per run")
    p.add_argument("--cpus-per-worker", type=float, default=0.95,
                   help="Ray CPUs per worker (default 0.95: each trial process holds 0.01 CPU, "
                        "so two 1-CPU workers would not fit on 2 CPUs beside them)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs per run, split across its workers; fractions pack several trials "
                        "on one GPU (e.g. 0.25)")
    p.add_argument("--max-concurrent-trials", type=int, default=0,
                   help="0 = as many runs as the cluster's CPUs (and GPUs) hold at once")
    p.add_argument("--max-failures", type=int, default=3, help="worker restarts per stage job")
    p.add_argument("--no-share-stage-1", action="store_true",
                   help="train stage 1 separately for every variant")
    p.add_argument("--pack", default="auto",
                   help="train up to K runs of one architecture (seeds, optimisers, variants) "
                        "as one packed model per trial (tsdsae.packed_train); 'auto' = 1 (one "
                        "run after another): packing measured no faster on CPU and only from "
                        "K = 32 on an H200 (README); try 64 where a trial has a GPU of 40 GB")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep of the same --name (Tuner.restore)")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--progress-every", type=float, default=60.0, metavar="SECONDS",
                   help="print the runs' epochs so far this often (default 60)")
    p.add_argument("--ray-logs", action="store_true",
                   help="also show the output of Ray's workers here (default: it stays in Ray's "
                        "log files, /tmp/ray/session_latest/logs)")
    return p


class ProgressPrinter:
    """Prints one line about the sweep's runs every `every` seconds while Tune runs: each child
    run's epochs so far out of its stage's budget (read from the per-epoch metrics the runs log
    to MLflow), so the console shows training progress while worker output stays in Ray's logs.
    """

    def __init__(self, tracking_uri: str, parent_run_id: str, every: float = 60.0):
        import threading

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


def _sweep_settings(args) -> tuple[Any, list[str]]:
    grid_name = "smoke" if args.smoke_test and args.grid == "paper" else args.grid
    grid = load_grid(grid_name)
    if args.only:
        grid = narrow(grid, parse_only(args.only))
    if args.set:
        sets = {k: v[0] for k, v in parse_only(args.set).items()}
        grid = dataclasses.replace(grid, fixed={**grid.fixed, **sets},
                                   axes={k: v for k, v in grid.axes.items() if k not in sets})
        validate(grid)
    # Local dataset folders as absolute paths: trials and workers run in other directories.
    datasets = ([d if d == "toy" else absolute_location(d) for d in args.data]
                or (["toy"] if args.smoke_test else []))
    if not datasets:
        raise UsageError("give at least one --data URI (or --smoke-test for the toy data)")
    return grid, datasets


def _ray_options(args) -> dict:
    cpus = args.cpus_per_worker
    options = {"num_workers": args.workers_per_trial, "cpus_per_worker": cpus,
               "max_failures": args.max_failures}
    if args.gpus_per_trial > 0:
        options["use_gpu"] = True
        options["gpus_per_worker"] = args.gpus_per_trial / args.workers_per_trial
    return options


def pack_size(args) -> int:
    """--pack as a number: 'auto' is 1, one run after another, on CPU and on GPUs alike. Measured
    with benchmarks/packed_rate.py (README "Packed trials"): on CPU packing is no faster; on an
    H200 the fused pass takes about 300 ms a step whatever K (launch-bound), so packs beat one run
    after another only from K = 32 (x1.3 TS-DSAE stage 2) and K = 64 (x1.7 DSAE, x2.1 TS-DSAE
    stage 2, 35 GB), too much memory for a default. Raises UsageError for anything but 'auto' or
    a positive integer."""
    if args.pack == "auto":
        return 1
    try:
        size = int(args.pack)
    except ValueError:
        size = 0
    if size < 1:
        raise UsageError(f"--pack {args.pack!r}: give a positive number of members or 'auto'")
    return size


def _bundles(groups: list, preset: str, size: int) -> list[dict]:
    """Trial groups (tune.grid.TrialGroup) as Tune trials: one group per trial unpacked
    (size 1); packed, the groups whose runs can share a pack (tsdsae.packed_train.pack_signature
    and the same switch epoch: seeds, optimisers, variants of one architecture on one dataset)
    go into one trial, as many as keep each of its two packs (see _train_bundle: one member per
    group for the first stages, one per shared variant for stage 2) within `size` members.
    Returns [{"key", "groups": [group dicts]}]."""
    from tsdsae.packed_train import pack_signature

    def as_dict(g) -> dict:
        return {"key": g.key, "overrides": g.overrides, "variants": list(g.variants),
                "coords": g.coords}

    if size <= 1:
        return [{"key": g.key, "groups": [as_dict(g)]} for g in groups]
    by_signature: dict[Any, list] = {}
    for g in groups:
        cfg = apply_overrides(PRESETS[preset](), {**g.overrides, VARIANT_KEY: g.variants[0]})
        signature = (pack_signature(cfg), cfg.schedule.switch_epoch)
        by_signature.setdefault(signature, []).append(as_dict(g))
    out = []
    for members in by_signature.values():
        bundle: list[dict] = []
        for g in members:
            stage_2 = len(g["variants"]) if _is_shared(g) else 0
            if bundle and (len(bundle) + 1 > size or sum(
                    len(b["variants"]) for b in bundle if _is_shared(b)) + stage_2 > size):
                out.append(bundle)
                bundle = []
            bundle.append(g)
        out.append(bundle)
    return [{"key": group_key({"groups": [g["key"] for g in b]}), "groups": b} for b in out]


def concurrent_trials(options: dict, resources: dict | None = None) -> int:
    """How many trials run at once: as many training runs as the cluster's CPUs and GPUs hold
    (each trial process itself holds 0.01 CPU). Trials beyond that would start, hold their
    0.01 CPU and wait, which can leave too little for the next run's workers."""
    import ray

    resources = resources if resources is not None else ray.cluster_resources()
    workers = options["num_workers"]
    per_trial = workers * options["cpus_per_worker"] + 0.01
    n = int(resources.get("CPU", 1) // per_trial)
    if options.get("use_gpu"):
        n = min(n, int(resources.get("GPU", 0) // (workers * options["gpus_per_worker"])))
    return max(1, n)


def run_sweep(args) -> dict:
    """Run (or resume) a sweep; returns {"parent_run_id", "report": paths, "results": dir}."""
    import ray
    from ray import tune

    from tsdsae.ray_train import runtime_env
    from tsdsae.train import ray_log_dir
    from tune.report import (log_report, rows_from_mlflow, scored_split, summarise, verdict,
                             write_report)
    from tune.report_page import write_report_page

    grid, datasets = _sweep_settings(args)
    groups = trial_groups(grid, datasets, share_stage_1=not args.no_share_stage_1)
    name = args.name or grid.name
    storage = open_store(f"{args.storage.rstrip('/')}/{name}", args.endpoint_url)
    storage.check(create=True)
    tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri)
    n_points = sum(len(g.variants) for g in groups)
    pack = pack_size(args)
    bundles = _bundles(groups, grid.preset, pack)
    packing = f", packs of up to {pack} runs" if pack > 1 else ""
    print(f"sweep {name}: grid {grid.name} ({n_points} runs in {len(bundles)} trial{'s' * (len(bundles) != 1)}{packing}), "
          f"datasets {datasets}, storage {storage.uri}, MLflow {redact_url(tracking_uri)}",
          flush=True)

    experiment_id = tracking.describe_experiment(tracking_uri, args.experiment, EXPERIMENT_NOTE)
    parent = tracking.open_run(tracking_uri, args.experiment, f"sweep:{storage.uri}",
                               run_name=name, tags={ROLE_TAG: "sweep", "tsdsae.grid": grid.name})
    parent.log_params({"grid": grid.name, "grid_file": grid.source, "runs": n_points,
                       "trials": len(bundles), "datasets": json.dumps(datasets),
                       "axes": json.dumps(grid.axes), "fixed": json.dumps(grid.fixed),
                       "share_stage_1": not args.no_share_stage_1, "pack": pack})
    sweep = {"name": name, "preset": grid.preset, "checkpoint_root": f"{storage.uri}/runs",
             "tracking_uri": tracking_uri, "experiment": args.experiment,
             "parent_run_id": parent.run_id, "endpoint_url": args.endpoint_url or "",
             "ray_options": _ray_options(args), "pack": pack}
    param_space = {"sweep": sweep, "bundle": tune.grid_search(bundles)}

    if not ray.is_initialized():
        # The console shows the sweep's own lines and Tune's status table; what Ray's worker
        # processes print (trial and worker logs, Ray's own warnings) stays in Ray's log files
        # unless --ray-logs.
        ray.init(address=args.address, runtime_env=runtime_env(), log_to_driver=args.ray_logs,
                 logging_level=logging.WARNING)
    print(f"Ray's logs (workers, trials, Train controller): {ray_log_dir()}", flush=True)
    tune_path, filesystem = open_store(f"{storage.uri}/tune", args.endpoint_url).arrow_filesystem()
    trainable = tune.with_resources(trial_fn, {"cpu": 0.01})
    experiment_path = f"{tune_path.rstrip('/')}/{name}"
    try:
        if args.resume and tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
            print(f"resuming sweep {name} from {experiment_path}", flush=True)
            tuner = tune.Tuner.restore(experiment_path, trainable=trainable,
                                       resume_unfinished=True, restart_errored=True,
                                       storage_filesystem=filesystem)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=(args.max_concurrent_trials
                                           or concurrent_trials(sweep["ray_options"])),
                    trial_dirname_creator=lambda t: f"trial_{t.config['bundle']['key']}",
                    trial_name_creator=lambda t: f"{name}-{t.config['bundle']['key']}"),
                run_config=tune.RunConfig(name=name, storage_path=tune_path,
                                          storage_filesystem=filesystem,
                                          verbose=0,   # progress: ProgressPrinter lines
                                          failure_config=tune.FailureConfig(max_failures=1)))
        # Tune's new output engine prints an experiment box and a TensorBoard hint even at
        # verbose=0; the legacy engine at verbose 0 prints nothing (progress: ProgressPrinter).
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        with ProgressPrinter(tracking_uri, parent.run_id, every=args.progress_every):
            results = tuner.fit()
    except BaseException as exc:
        parent.fail(exc)
        raise
    errors = [r.error for r in results if r.error]

    rows = rows_from_mlflow(parent.run_id, tracking_uri)
    if rows.empty:          # e.g. Ctrl-C before any run finished: Tune returns what it has
        parent.finish("KILLED" if not errors else "FAILED")
        raise UsageError(f"no run of sweep {name} has finished (interrupted, or every trial "
                         f"failed: see Ray's logs); rerun the same command with --resume to "
                         "continue it")
    out_dir = Path(args.out) / name
    paths = write_report(rows, out_dir)
    split = scored_split(rows) or "test"
    summary = summarise(rows)
    lines = verdict(summary)
    if grid.name == "smoke":
        lines.insert(0, "the smoke grid is a plumbing check (every model for a few epochs on "
                        "tiny data): its scores say nothing about the models; --grid quick or "
                        "paper measures them")
    print("writing the report page (the example swaps of every model) ...", flush=True)
    paths["report_html"] = write_report_page(
        rows, summary, [p for k, p in paths.items() if k.startswith("figure:")], out_dir,
        split, f"tsdsae sweep {name}", lines, endpoint_url=args.endpoint_url)
    log_report(paths, parent.run_id, tracking_uri)
    tracking.describe_run(tracking_uri, parent.run_id,
                          "\n".join(f"- {line}" for line in lines) + "\n\n"
                          + paths["summary_md"].read_text()
                          + "\nOpen `report/report.html` (artifacts) to see the figure and hear "
                            "the swaps.\n")
    parent.log_metrics({"finished_runs": float(len(rows)), "failed_trials": float(len(errors))})
    parent.finish("FAILED" if errors else "FINISHED")
    if errors:
        print(f"{len(errors)} trial(s) failed: {errors[0]!r}", file=sys.stderr)
    return {"parent_run_id": parent.run_id, "report": paths, "results": str(out_dir),
            "tracking_uri": tracking_uri, "errors": len(errors), "runs": len(rows),
            "verdict": lines, "split": split,
            "experiment_id": experiment_id}


def final_screen(out: dict, seconds: float) -> str:
    """The last screen of a sweep: what it shows in words, the files to open, the MLflow UI."""
    paths, results = out["report"], Path(out["results"])
    ui = redact_url(out["tracking_uri"])
    lines = ["", Path(paths["summary_md"]).read_text(), "",
             f"== sweep finished in {seconds / 60:.1f} min: {out['runs']} runs, "
             f"{out['errors']} failed trials ==",
             f"What it shows ({out['split']} split, checkpoints chosen on val):"]
    lines += [f"  {line}" for line in out["verdict"]]
    lines += ["",
              f"Open first:  {paths['report_html']}   (figure, table, and every model's swaps "
              "to listen to)",
              f"Swap audio:  {results / 'report_files'}/*.wav",
              f"Tables:      {paths['summary_md']}, {paths['summary_csv']}, {paths['trials_csv']}",
              "Figures:     " + ", ".join(str(p) for k, p in paths.items()
                                          if k.startswith("figure:"))]
    if ui.startswith("sqlite:") or ui.startswith("/"):
        lines += [f"MLflow UI:   mlflow ui --backend-store-uri {ui} --host 127.0.0.1 --port 5000",
                  f"             then open http://127.0.0.1:5000/#/experiments/"
                  f"{out['experiment_id']}/runs (choose \"Model training\" if it opens in the "
                  "GenAI view); the sweep's parent run holds report/report.html"]
    else:
        lines += [f"MLflow UI:   {ui.rstrip('/')}/#/experiments/{out['experiment_id']}/runs "
                  "(choose \"Model training\" if it opens in the GenAI view)"]
    return "\n".join(lines)


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    out = run_sweep(args)
    print(final_screen(out, time.time() - t0), flush=True)
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
