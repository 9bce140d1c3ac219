"""CLI: train one run, then evaluate its best checkpoint.

    python -m tsdsae.train --preset debug
    python -m tsdsae.train --data data/dmelodies --model ts_dsae schedule.max_epochs=500
    python -m tsdsae.train --data s3://bucket/dmelodies --model ts_dsae --num-workers 2 [--use-gpu]
Trailing arguments are dotted config overrides (optim.lr=3e-4 model.z_dim=16 ...).
With --num-workers the run trains on Ray (tsdsae.ray_train: one DDP job per stage), on the
cluster at --address / RAY_ADDRESS or on a local Ray started here. Either way the run is tracked
in MLflow when tracking.enabled (tsdsae.tracking), and rerunning with the same name resumes it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys

from tsdsae.cli import UsageError, cli_main
from tsdsae.storage import redact_text
from tsdsae.config import PRESETS, VARIANTS, apply_overrides


def _config_keys_help() -> str:
    """The epilog of --help: every dotted config key with the paper preset's value."""
    from tsdsae.config import paper, to_flat

    lines = ["Overrides KEY=VALUE, anywhere on the line (e.g. optim.lr=3e-4 model.z_dim=16",
             "schedule.switch_epoch=25 checkpoint.root=s3://bucket/runs). Keys, with the paper",
             "preset's values:"]
    flat = to_flat(paper())
    width = max(len(k) for k in flat)
    lines += [f"  {k:<{width}}  {v!r}" for k, v in flat.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tsdsae.train",
        description="Train a DSAE-family model (two-stage schedule) and evaluate it.",
        epilog=_config_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="base configuration (default: paper)")
    p.add_argument("--data", help="dataset URI: 'toy', a folder or s3://bucket/prefix")
    p.add_argument("--model", choices=VARIANTS, help="model variant (schedule.variant)")
    p.add_argument("--name", help="run name; rerunning with the same name resumes")
    p.add_argument("--seed", type=int)
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if a checkpoint exists")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    ray = p.add_argument_group("Ray Train (data-parallel workers; one DDP job per stage)")
    ray.add_argument("--num-workers", type=int, metavar="N",
                     help="train on Ray with N workers (default: single process, no Ray)")
    ray.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0,
                     help="Ray CPUs reserved per worker (default 1; torch threads follow it)")
    ray.add_argument("--max-failures", type=int, default=3,
                     help="worker-group restarts per stage before the run fails (default 3)")
    ray.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a "
                     "local Ray started here)")
    ray.add_argument("--ray-logs", action="store_true",
                     help="also show the output of Ray's workers here (default: it stays in "
                          "Ray's log files, /tmp/ray/session_latest/logs)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return p


def config_from_args(args):
    cfg = PRESETS[args.preset]()
    flat = {}
    if args.data:
        flat["data.uri"] = args.data
    if args.model:
        flat["schedule.variant"] = args.model
    if args.name:
        flat["name"] = args.name
    if args.seed is not None:
        flat["seed"] = args.seed
    if args.endpoint_url:
        flat["data.endpoint_url"] = args.endpoint_url
    cfg = apply_overrides(apply_overrides(cfg, flat), args.overrides)
    if cfg.data.uri != "toy":
        # The checkpoint stores where the data is, not where it was relative to the shell.
        from tsdsae.storage import absolute_location
        cfg = apply_overrides(cfg, {"data.uri": absolute_location(cfg.data.uri)})
        cfg = own_data_budget(cfg, args)
    return cfg


BUDGET_KEYS = ("schedule.switch_epoch", "schedule.max_epochs", "schedule.patience")


def own_data_budget(cfg, args):
    """The paper preset on a dataset that is not dMelodies (a folder of recordings, varied
    renders) with no budget key overridden: the measured budget in steps
    (tsdsae.config.step_budget, OWN_STAGE1_STEPS + OWN_STAGE2_STEPS) instead of the paper's
    4,000 epochs, said in one line. Anything else: `cfg` unchanged."""
    from tsdsae.config import OWN_STAGE1_STEPS, OWN_STAGE2_STEPS, step_budget
    from tsdsae.data import load_manifest

    if args.preset != "paper" or any(o.split("=", 1)[0].strip() in BUDGET_KEYS
                                     for o in args.overrides):
        return cfg
    manifest = load_manifest(cfg.data.uri, cfg.data.endpoint_url or None)
    if manifest.get("made_by", {}).get("tool") == "data_prep.dmelodies":
        return cfg
    n_train = int(manifest.get("splits", {}).get("train", {}).get("num_samples", 0))
    if n_train < 1:
        return cfg                        # require_splits says what is missing
    cfg = step_budget(cfg, n_train)
    s = cfg.schedule
    stages = (f"{s.max_epochs} epochs" if s.variant == "dsae" else
              f"stage 1 {s.switch_epoch} epochs + stage 2 {s.max_epochs - s.switch_epoch} epochs")
    print(f"budget for your own data: {OWN_STAGE1_STEPS} + {OWN_STAGE2_STEPS} steps = {stages} "
          f"of {math.ceil(n_train / cfg.optim.batch_size)} steps ({n_train} training clips, "
          f"batch {cfg.optim.batch_size}); set schedule.switch_epoch / schedule.max_epochs / "
          "schedule.patience to choose another", file=sys.stderr, flush=True)
    return cfg


@cli_main
def main(argv=None) -> int:
    # Overrides may stand anywhere on the line (before, between or after the options).
    args = build_parser().parse_intermixed_args(argv)
    cfg = config_from_args(args)
    options = None
    if args.num_workers is not None:
        from tsdsae.ray_train import driver_config, split_config
        options = driver_config(cfg, num_workers=args.num_workers, use_gpu=args.use_gpu,
                                cpus_per_worker=args.cpus_per_worker,
                                max_failures=args.max_failures, evaluate=not args.no_eval,
                                progress=not args.quiet, page=True)
        split_config(options)                            # bad values: exit 2 before Ray starts
    require_splits(cfg)
    if not args.no_eval:
        from tsdsae.evaluate import check_eval_split
        check_eval_split(cfg)                           # no eval.split in the dataset: exit 2 now
    check_run_folder(cfg, resume=not args.no_resume)
    try:
        if options is not None:
            summary = _train_on_ray(cfg, options, args)
        else:
            summary = _train_here(cfg, args)
    except TrainingFailed as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 1
    print(redact_text(json.dumps(summary)))
    return 0


# Keys a rerun may change without becoming another run: where and what it logs, what the end
# evaluation scores, the device, where and how often it checkpoints (a moved run folder).
RERUN_MAY_CHANGE = ("tracking.", "eval.", "device", "checkpoint.", "data.endpoint_url",
                    "data.stream", "data.memory_budget_mb", "data.shuffle_buffer")


def check_run_folder(cfg, resume: bool = True) -> None:
    """Before anything trains or is logged: the run's folder (checkpoint.root/NAME) must be
    writable (a probe file is written and deleted), and a run already stored there under this
    name must have this configuration (unless `resume` is off: then it is replaced). Raises
    StorageError or UsageError naming the folder and, for another configuration, the keys that
    differ (RERUN_MAY_CHANGE excepted)."""
    from tsdsae import checkpoint
    from tsdsae.config import from_flat, to_flat
    from tsdsae.runs import RunFolder

    folder = RunFolder.of(cfg)
    store = folder.store.check(create=True)
    try:
        store.write_bytes(".write-check", b"")
        store.delete(".write-check")
    except OSError as exc:
        raise UsageError(f"cannot write the run folder {store.uri} ({exc.strerror or exc}); "
                         "choose another checkpoint.root") from None
    if not resume:
        return
    stored = next((name for name in ("last.pt", "best.pt") if store.exists(name)), None)
    if stored is None:
        return
    previous = checkpoint.load(folder.file(stored), "cpu", folder.endpoint)
    try:        # through from_flat: earlier key names and keys added since read as today's
        before = to_flat(from_flat(previous.get("config") or {}))
    except (ValueError, TypeError, AttributeError):
        before = {}
    now = to_flat(cfg)
    differ = sorted(k for k in set(before) | set(now)
                    if before.get(k) != now.get(k) and not k.startswith(RERUN_MAY_CHANGE))
    if differ:
        shown = "; ".join(f"{k}: {before.get(k, 'absent')!r} there, {now.get(k, 'absent')!r} "
                          "here" for k in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise UsageError(f"run {cfg.name!r} in {store.uri} was trained with another "
                         f"configuration ({shown}{more}); use another --name for a new run, "
                         "or --no-resume to replace it")


class TrainingFailed(Exception):
    """Training stopped after its retries; its checkpoints are kept (exit status 1)."""


TRAINING_SPLITS = ("train", "val")


def require_splits(cfg) -> None:
    """Refuse, in one line, a dataset without a non-empty train or val split (before anything
    starts). Raises UsageError naming the dataset, the split and how to make it."""
    if cfg.data.uri == "toy":
        return
    from tsdsae.data import load_manifest

    splits = load_manifest(cfg.data.uri, cfg.data.endpoint_url or None).get("splits", {})
    for split in TRAINING_SPLITS:
        if int(splits.get(split, {}).get("num_samples", 0)) == 0:
            have = {k: int(v.get("num_samples", 0)) for k, v in splits.items()}
            raise UsageError(
                f"dataset {cfg.data.uri} has no clips in its {split!r} split (it has {have}); "
                "training needs 'train' and 'val': prepare it again with a larger "
                f"{split} fraction (e.g. --fractions 0.8,0.2,0.0) or more audio per label")


class TqdmHandler(logging.Handler):
    """Log lines above the progress line (tqdm.write on stderr), not glued to its end."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def collapse_callback(cfg, tracker):
    """An epoch callback: tsdsae.monitor.CollapseWatch's warning printed once (above the
    progress line) and its MLflow tag set on `tracker`."""
    from tqdm.auto import tqdm

    from tsdsae.monitor import CollapseWatch

    watch = CollapseWatch(cfg.schedule.variant, cfg.schedule.switch_epoch, name=cfg.name)

    def check(record) -> None:
        warning = watch(record)
        if warning:
            tqdm.write(warning, file=sys.stderr)
            tracker.set_tags(watch.tags())
    return check


def _train_here(cfg, args) -> dict:
    """Single process: tsdsae.trainer.Trainer, with the tracker as its epoch callback."""
    from tsdsae import tracking
    from tsdsae.evaluate import evaluation_plan, evaluation_words
    from tsdsae.ray_train import configure_device
    from tsdsae.train_step import keep_freed_memory
    from tsdsae.trainer import Trainer

    trainer = Trainer(cfg, progress=not args.quiet)
    run = trainer.run
    configure_device(trainer.device)
    if trainer.device.type == "cpu":
        keep_freed_memory()   # process-wide allocator setting for CPU steps (see its docstring)
    if not args.no_resume:
        # A last.pt that does not fit is refused before the MLflow run is touched.
        trainer.resume()
    tracker = tracking.start_run(cfg, tracking.run_key(run.run_dir), resume=not args.no_resume,
                                 tags={"tsdsae.run_dir": run.run_dir})
    run.callbacks += [tracker, collapse_callback(cfg, tracker)]
    try:
        (result,) = trainer.fit(resume=False)       # resumed above
        summary = {k: result[k] for k in ("epochs_run", "stopped_early", "best_epoch", "best_val",
                                          "best_checkpoint")}
        if not args.no_eval:
            if not args.quiet:
                print(evaluation_plan(cfg), file=sys.stderr, flush=True)
            summary["eval"] = tracking.evaluate_and_log(
                tracker, cfg, run.best_model(), trainer.data, result, run.best_uri,
                run.endpoint, device=trainer.device, page_in=run.run_dir)
            if not args.quiet:
                print(evaluation_words(summary["eval"], len(trainer.data["train"].instruments)),
                      file=sys.stderr, flush=True)
                print(f"the run's page (scores, swaps to listen to, losses): "
                      f"{summary['eval']['page']}", file=sys.stderr, flush=True)
    except BaseException as exc:
        tracker.fail(exc)
        raise
    tracker.finish()
    if tracker.run_id:
        summary.update(mlflow_run_id=tracker.run_id, tracking_uri=tracker.uri)
    return summary


def ray_log_dir() -> str:
    """The log folder of the Ray session this process is connected to (on the head node)."""
    try:
        import ray._private.worker as ray_worker
        return ray_worker._global_node.get_logs_dir_path()
    except Exception:   # noqa: BLE001 - only a hint for the reader; Ray's default otherwise
        return "/tmp/ray/session_latest/logs"


def _train_on_ray(cfg, options: dict, args) -> dict:
    """Every stage as a Ray Train DDP job (tsdsae.ray_train.train_driver_fn)."""
    import ray
    import ray.train

    from tsdsae.ray_train import init_ray, train_driver_fn
    from tsdsae.runs import RunFolder

    folder = RunFolder.of(cfg)
    location, store = folder.uri, folder.store
    if args.no_resume and store.list():
        raise UsageError(f"{location} already holds a run; --no-resume with Ray needs a new "
                         "--name (or delete that run)")
    started_ray = not ray.is_initialized() and not store.exists("result.json")
    if started_ray:                                            # finished: no Ray needed
        # The console shows this run's lines; what Ray's processes print stays in Ray's log
        # files unless --ray-logs.
        init_ray(args.address, worker_logs=args.ray_logs)
        print(f"Ray's logs (workers, Train controller): {ray_log_dir()}", file=sys.stderr,
              flush=True)
    if not args.quiet:    # one line per finished stage (tsdsae.ray_train's driver)
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("tsdsae").addHandler(handler)
        logging.getLogger("tsdsae").setLevel(logging.INFO)
    try:
        summary = train_driver_fn(options)
    except ray.train.TrainingFailedError as exc:
        raise TrainingFailed(f"training failed after its retries ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[-1]}); checkpoints are in "
                             f"{location}: rerun the same command to resume") from None
    finally:
        if started_ray:          # the local Ray this command started ends with it (no orphans)
            ray.shutdown()
    if summary.get("eval") and not args.quiet:
        from tsdsae.evaluate import evaluation_words

        n = len(summary["eval"].get("instruments") or ()) or 2
        print(evaluation_words(summary["eval"], n), file=sys.stderr, flush=True)
        if summary["eval"].get("page"):
            print(f"the run's page (scores, swaps to listen to, losses): "
                  f"{summary['eval']['page']}", file=sys.stderr, flush=True)
    print(f"results: checkpoints in {summary['run_dir']} (best: {summary['best_checkpoint']})"
          + (f"; MLflow run {summary['mlflow_run_id']} at "
             f"{redact_text(summary['tracking_uri'])}"
             if summary.get("mlflow_run_id") else ""))
    return summary


if __name__ == "__main__":
    sys.exit(main())
