"""The robustness sweep: a Ray Tune grid over the one trainer's Ray jobs, tracked in MLflow,
reported as tables and box plots.

    python tune/robustness_sweep.py --smoke-test                      # minutes on 2 CPUs
    python tune/robustness_sweep.py --grid paper --data s3://bkt/dmelodies --data s3://bkt/urmp \
        --storage s3://bkt/sweeps --gpus-per-trial 0.25               # the paper's 288 runs
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python tune/robustness_sweep.py --smoke-test --storage /abs/sweeps

grid -> jobs -> Tune:
    main / run_sweep     the driver: grid (tune.grid) -> trials (tune.jobs.bundles) -> Tuner;
                         the MLflow parent run; the report
    trial_fn(config)     one Tune trial: its runs and jobs (tune.jobs.plan_runs / plan_jobs);
                         the jobs no single run owns (a shared stage 1, a pack of runs) train
                         first, then every grid point's run goes through
                         tsdsae.ray_train.train_driver_fn (its remaining stages, then its
                         evaluation), side by side as Ray tasks
    (Ray Train workers)  tsdsae.ray_train.train_loop_per_worker, one DDP job per stage

Stage-1 sharing: dsae_freeze, ts_dsae_wo_reg and ts_dsae share stage 1 for the same seed and
every other key, so their group trains stage 1 once (its own run `<sweep>-<group>-stage1`) and
each variant's stage 2 starts from that run's folder. Stage 1 is a pure function of the config
without the variant, so each variant's result equals an unshared run's.

Packs (`--pack K`): a trial's jobs of one stage train as one trainer of up to K runs, one Ray
Train job each (tsdsae.trainer.Trainer: each run exactly as alone, with its own checkpoints and
MLflow run). 'auto' is 1: a pack saves Ray job start-ups and data loading, not compute.

MLflow: one parent run per sweep (found again by its key on --resume), one child run per grid
point (role "trial") tagged with its grid coordinates, plus one child run per shared stage 1
(tsdsae.tracking.start_sweep_run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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
from tsdsae.storage import absolute_location, open_store, redact_url  # noqa: E402
from tsdsae.tracking import BEST_CHECKPOINT_TAG, ROLE_TAG  # noqa: E402
from tune.grid import load_grid, narrow, parse_only, trial_groups, validate  # noqa: E402
from tune.jobs import (PlannedRun, SweepSettings, bundles, concurrent_trials,  # noqa: E402
                       plan_jobs, plan_runs)
from tune.progress import ProgressPrinter  # noqa: E402

EXPERIMENT_NOTE = (
    "Robustness sweeps of the DSAE family (DSAE, DSAE-freeze, TS-DSAE w/o reg, TS-DSAE). Each "
    "sweep is a parent run (role `sweep`) whose description holds the summary table and whose "
    "artifacts hold `report/report.html` (the figure and the swaps to listen to); expand it to see "
    "one child run per grid point (metrics `eval_pre_swap`, `eval_gswap`, `eval_lswap` on the "
    "scored split; figures and swap WAVs under `figures/`).")


# ---------------------------------------------------------------------------------------------
# Trial side (a Ray Tune trial process)


def _tracker(sweep: SweepSettings, parent: str, run: PlannedRun, **extra: str):
    return tracking.start_sweep_run(run.cfg, parent, run.role, run.group, run.coords,
                                    run.variant, run.shared_by, run.start is not None, **extra)


def _train_jobs(sweep: SweepSettings, parent: str, runs: list[PlannedRun], options: dict,
                trial: str) -> None:
    """The trial's jobs that no single grid point owns (a shared stage 1; with packs, every
    job), one Ray Train job each, in order; a job whose runs have all finished its stage is
    skipped. Each run logs to its own MLflow run; a shared stage 1's is finished here."""
    from tsdsae.ray_train import check_job, run_job, split_config
    from tsdsae.runs import pending

    by_name = {run.cfg.name: run for run in runs}
    _, ray_options = split_config({"run_config": runs[0].cfg, **options})
    for i, job in enumerate(plan_jobs(runs, sweep.pack)):
        members = [by_name[cfg.name] for cfg in job.members]
        if (len(members) == 1 and members[0].role == "trial") or not any(pending(job)):
            continue                        # a grid point's own job: train_driver_fn runs it
        tag = {"tsdsae.pack": f"{sweep.name}-{trial}-stage{job.stage}.{i}",
               "tsdsae.pack_size": str(len(members))} if sweep.pack > 1 else {}
        trackers = [_tracker(sweep, parent, run, **tag) for run in members]
        try:
            run_job(job, ray_options, trackers)
            check_job(job)
        except BaseException as exc:
            for t in trackers:
                t.fail(exc)
            raise
        for run, t in zip(members, trackers):
            if run.role == "shared_stage_1":
                t.finish()


def _finish_run(sweep: SweepSettings, parent: str, run: PlannedRun, options: dict) -> dict:
    """One grid point through tsdsae.ray_train.train_driver_fn: trains the stages that have no
    marker yet and evaluates the run; returns its summary."""
    from tsdsae.ray_train import driver_config, train_driver_fn
    from tsdsae.runs import RESULT, RunFolder

    if RunFolder.of(run.cfg).read_json(RESULT) is None:
        _tracker(sweep, parent, run)      # its grid tags from the start; the driver resumes it
    summary = train_driver_fn(driver_config(run.cfg, parent_run_id=parent, start=run.start or "",
                                            **options))
    if summary.get("mlflow_run_id"):      # where the report page finds the model to hear
        tracking.MlflowTracker(run.cfg.tracking.uri, summary["mlflow_run_id"]).set_tags(
            {BEST_CHECKPOINT_TAG: summary["best_checkpoint"]})
    return summary


def trial_fn(config: dict) -> None:
    """One Tune trial: the jobs of its runs (_train_jobs), then every grid point's run through
    _finish_run, side by side as Ray tasks (their Train jobs take CPUs as they become free)."""
    import ray
    from ray import tune

    sweep = SweepSettings(**config["sweep"])
    parent, bundle = config["parent_run_id"], config["bundle"]
    options = dict(config["ray_options"])
    runs = plan_runs(sweep, bundle)
    _train_jobs(sweep, parent, runs, options, bundle["key"])
    points = [run for run in runs if run.role == "trial"]
    if len(points) > 1:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # Side by side, outside the trial's placement group (its 0.01 CPU). After packs a task
        # only evaluates (a worker's CPU share); otherwise each task drives its run's Train jobs
        # (which hold the workers' CPUs, queued by Ray until CPUs are free) and then evaluates.
        task = ray.remote(_finish_run).options(
            num_cpus=options["cpus_per_worker"] if sweep.pack > 1 else 0.01,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
        summaries = ray.get([task.remote(sweep, parent, run, options) for run in points])
    else:
        summaries = [_finish_run(sweep, parent, run, options) for run in points]
    metrics: dict[str, Any] = {"bundle": bundle["key"]}
    for run, summary in zip(points, summaries):
        label = f"{run.group}/" if len(bundle["groups"]) > 1 else ""
        for k, v in (summary.get("eval") or {}).items():
            metrics[f"{label}{run.variant}/{k}"] = v
        metrics[f"{label}{run.variant}/best_val"] = summary["best_val"]
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
                        "in one trainer per stage (one Ray Train job); 'auto' = 1 (a job per "
                        "run and stage): a pack saves job start-ups and data loading, not "
                        "compute")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep of the same --name (Tuner.restore)")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--progress-every", type=float, default=60.0, metavar="SECONDS",
                   help="print the runs' epochs so far this often (default 60)")
    p.add_argument("--ray-logs", action="store_true",
                   help="also show the output of Ray's workers here (default: it stays in Ray's "
                        "log files, /tmp/ray/session_latest/logs)")
    return p


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
    """--pack as a number: 'auto' is 1 (a job per run and stage). Raises UsageError for anything
    but 'auto' or a positive integer."""
    if args.pack == "auto":
        return 1
    try:
        size = int(args.pack)
    except ValueError:
        size = 0
    if size < 1:
        raise UsageError(f"--pack {args.pack!r}: give a positive number of runs or 'auto'")
    return size


def run_sweep(args) -> dict:
    """Run (or resume) a sweep; returns {"parent_run_id", "report": paths, "results": dir}."""
    import ray
    from ray import tune

    from tsdsae.ray_train import init_ray
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
    trials = bundles(groups, pack)
    packing = f", packs of up to {pack} runs" if pack > 1 else ""
    print(f"sweep {name}: grid {grid.name} ({n_points} runs in {len(trials)} trial{'s' * (len(trials) != 1)}{packing}), "
          f"datasets {datasets}, storage {storage.uri}, MLflow {redact_url(tracking_uri)}",
          flush=True)

    experiment_id = tracking.describe_experiment(tracking_uri, args.experiment, EXPERIMENT_NOTE)
    parent = tracking.open_run(tracking_uri, args.experiment, f"sweep:{storage.uri}",
                               run_name=name, tags={ROLE_TAG: "sweep", "tsdsae.grid": grid.name})
    parent.log_params({"grid": grid.name, "grid_file": grid.source, "runs": n_points,
                       "trials": len(trials), "datasets": json.dumps(datasets),
                       "axes": json.dumps(grid.axes), "fixed": json.dumps(grid.fixed),
                       "share_stage_1": not args.no_share_stage_1, "pack": pack})
    sweep = SweepSettings(name=name, preset=grid.preset, checkpoint_root=f"{storage.uri}/runs",
                          tracking_uri=tracking_uri, experiment=args.experiment,
                          endpoint_url=args.endpoint_url or "", pack=pack)
    options = _ray_options(args)
    param_space = {"sweep": dataclasses.asdict(sweep), "parent_run_id": parent.run_id,
                   "ray_options": options, "bundle": tune.grid_search(trials)}

    if not ray.is_initialized():
        # The console shows the sweep's own lines and Tune's status table; what Ray's worker
        # processes print (trial and worker logs, Ray's own warnings) stays in Ray's log files
        # unless --ray-logs.
        init_ray(args.address, worker_logs=args.ray_logs)
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
                    max_concurrent_trials=(args.max_concurrent_trials or concurrent_trials(
                        options, ray.cluster_resources())),
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
