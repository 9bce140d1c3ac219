"""CLI: train one run, then evaluate its best checkpoint.

    python -m tsdsae.train --preset debug
    python -m tsdsae.train --data data/dmelodies --model ts_dsae schedule.max_epochs=500
Trailing arguments are dotted config overrides (optim.lr=3e-4 model.z_dim=16 ...).
"""
from __future__ import annotations

import argparse
import json
import sys

from tsdsae.config import PRESETS, VARIANTS, apply_overrides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tsdsae.train",
        description="Train a DSAE-family model (two-stage schedule) and evaluate it.",
        epilog="Overrides: any dotted config key, e.g. optim.lr=3e-4 model.z_dim=16 "
               "schedule.max_epochs=100 checkpoint.root=s3://bucket/runs")
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
    cfg = apply_overrides(cfg, flat)
    return apply_overrides(cfg, args.overrides)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tsdsae.evaluate import evaluate
    from tsdsae.trainer import Trainer

    trainer = Trainer(cfg, progress=not args.quiet)
    result = trainer.fit(resume=not args.no_resume)
    summary = {k: result[k] for k in ("epochs_run", "stopped_early", "best_epoch", "best_val",
                                      "best_checkpoint")}
    if not args.no_eval:
        summary["eval"] = evaluate(trainer.best_model(), trainer.data, cfg.data.eval_split,
                                   device=trainer.device)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
