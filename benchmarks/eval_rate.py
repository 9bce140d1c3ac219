"""The end-of-run evaluation's cost, part by part, as JSON lines on stdout.

    python benchmarks/eval_rate.py --checkpoint runs/NAME/best.pt --data data/dmelodies
    python benchmarks/eval_rate.py                       # a freshly trained toy run (seconds)

What the end of a run does (`tsdsae.tracking.evaluate_and_log` with figures, as in a sweep),
timed in its parts with the run's own evaluation settings (`eval.*` of the checkpoint, or the
flags): the LDA scores of the evaluation split and of val, the pitch metric (Griffin-Lim + CREPE),
the reconstruction PNG and the trial's figures and WAVs. One line per part, then a total line:
{"bench": "eval", "part": ..., "seconds": ...}. Torch threads: --threads (default 2, the
machine's two cores).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def _toy_checkpoint(root: Path) -> str:
    from tsdsae.config import from_flat, toy
    from tsdsae.trainer import Trainer

    cfg = from_flat({"schedule.switch_epoch": 2, "schedule.max_epochs": 3,
                     "checkpoint.root": str(root), "name": "eval-rate", "eval.pitch": True,
                     "eval.crepe_model": "tiny", "eval.pitch_clips": 16}, toy())
    Trainer(cfg, progress=False).fit()
    return str(root / "eval-rate" / "best.pt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="best.pt of a run (default: train a toy run)")
    p.add_argument("--data", default=None, help="dataset URI (default: the checkpoint's)")
    p.add_argument("--crepe-model", choices=("full", "tiny"), default=None)
    p.add_argument("--pitch-clips", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from tsdsae import checkpoint
    from tsdsae.config import from_flat
    from tsdsae.evaluate import LDA_SCORES, evaluate, pitch_metrics, pair_other_instrument
    from tsdsae.figures import trial_artifacts
    from tsdsae.model.dsae import DSAE
    from tsdsae.tracking import reconstruction_png
    from tsdsae.trainer import load_data

    with tempfile.TemporaryDirectory(prefix="eval-rate-") as tmp:
        ckpt = args.checkpoint or _toy_checkpoint(Path(tmp))
        state = checkpoint.load(ckpt)
        cfg = from_flat(state["config"])
        over = {}
        if args.data:
            over["data.uri"] = args.data
        if args.crepe_model:
            over["eval.crepe_model"] = args.crepe_model
        if args.pitch_clips is not None:
            over["eval.pitch_clips"] = args.pitch_clips
        cfg = from_flat(over, cfg) if over else cfg
        model = DSAE(cfg.model)
        checkpoint.restore_model(model, state, ckpt)
        model.eval()
        data = load_data(cfg.data)
        split = cfg.eval.split
        parts: dict[str, float] = {}

        def timed(name, fn):
            start = time.perf_counter()
            out = fn()
            parts[name] = time.perf_counter() - start
            emit(bench="eval", part=name, seconds=round(parts[name], 2))
            return out

        scores = timed(f"lda_{split}", lambda: evaluate(model, data, split))
        if split != "val":
            timed("lda_val", lambda: evaluate(model, data, "val"))
        ev = data[split]
        partner = pair_other_instrument(ev.instrument.numpy(), 0)
        if cfg.eval.pitch:
            rpa = timed(f"pitch_{cfg.eval.crepe_model}", lambda: pitch_metrics(
                model, ev, partner, "cpu", cfg.eval.crepe_model, cfg.eval.pitch_clips or None))
        else:
            rpa = {}
        out = Path(tmp) / "out"
        timed("reconstruction_png", lambda: reconstruction_png(model, ev, out / "recon.png"))
        timed("trial_artifacts", lambda: trial_artifacts(model, data, out / "trial", split=split))
        emit(bench="eval", part="total", seconds=round(sum(parts.values()), 2),
             threads=args.threads, split=split, n_eval=len(ev), crepe=cfg.eval.crepe_model,
             pitch_clips=cfg.eval.pitch_clips, checkpoint=Path(ckpt).name if args.checkpoint
             else "toy", **{k: round(scores[k], 3) for k in LDA_SCORES},
             **{k: round(v, 3) for k, v in rpa.items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
