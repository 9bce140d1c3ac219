"""Throughput of a trainer of K runs (tsdsae.trainer.Trainer) against one run at a time.

    python benchmarks/packed_rate.py [--device cpu|cuda] [--packs 1 2 4 8 16 32]
                                     [--models dsae:1 ts_dsae:2] [--z-dim 32] [--batch 128]
                                     [--frames 251] [--threads N] [--steps 5] [--rounds 3]

For each model/stage and each pack size K, one JSON line: the packed step (K runs of one
trainer, each its own batch of `--batch` clips, each run's own training step in turn: the
trainer's pass, loss, backward and Adam) as steps/s and
trial_steps_per_s = K x steps/s, beside the unpacked single-trial step (the trainer's pass,
benchmarks/step_rate.py) timed in the same process in alternating rounds on equal work:
ratio = the median over rounds of K x packed steps/s / single steps/s (>= 1: packing beats
running the members one after another; round_ratios lists them). A first line per model (k 1,
packed false) is the single trial alone in its own process. peak_memory_mb: the GPU's peak
allocation, or on CPU the process's peak resident memory, of the packed step alone (read before
the single trial is built; each K runs in a fresh process).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from tsdsae.config import apply_overrides, paper  # noqa: E402
from tsdsae.dataset import Dataset, Split  # noqa: E402


def synthetic_data(batch: int, frames: int) -> Dataset:
    """`batch` random clips (log-mel-like values) as train and val."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, frames, 80, generator=g) * 3 - 5
    split = Split(x, torch.ones(batch, frames, dtype=torch.bool),
                  torch.zeros(batch, dtype=torch.long),
                  torch.zeros(batch, frames, dtype=torch.long),
                  [str(i) for i in range(batch)], ("a",))
    return Dataset({"train": split, "val": split}, name="synthetic")


def packed_step(variant: str, stage: int, z_dim: int, k: int, batch: int, frames: int,
                device: torch.device):
    """A closure running one step of each of K runs of `variant` in `stage` (one trainer)."""
    from tsdsae.train_step import train_step
    from tsdsae.trainer import Trainer

    cfgs = [apply_overrides(paper(), {"name": f"m{i}", "seed": i, "model.z_dim": z_dim,
                                      "schedule.variant": variant, "schedule.switch_epoch": 1,
                                      "optim.batch_size": batch, "checkpoint.root": "/nonexistent"})
            for i in range(k)]
    trainer = Trainer(cfgs, data=synthetic_data(batch, frames), device=device, progress=False,
                      save=False)
    plans = [run.prepare_epoch(0) for run in trainer.runs]
    if stage == 2:
        plans = [run.prepare_epoch(1) for run in trainer.runs]
    if plans[0].stage != stage:
        raise ValueError(f"{variant} has no stage {stage}")
    split = trainer.splits["train"]
    idx = torch.arange(batch, device=device)
    x, mask = split.features[idx], split.mask[idx]
    priors = [run.prior_cache["train"](idx) if plan.informed_prior else None
              for run, plan in zip(trainer.runs, plans)]

    def step():
        terms = [train_step(run.step_model, run.optimizer, x, mask, plan, (1, 1, 1, 1), prior,
                            core=run.model, masked_kl=run.passes.masked_kl)
                 for run, plan, prior in zip(trainer.runs, plans, priors)]
        return {"loss": torch.stack([t["loss"] for t in terms])}

    return step


def measure_one(args) -> dict:
    """Child process: one (model, stage, K) row; K = 0 is the unpacked single trial alone.

    For K >= 1 the packed step's peak memory is read first (before the single trial exists);
    then `--rounds` rounds alternate the two on the same work, K x n single-trial steps and n
    packed steps (n = ceil(steps / K)), so that drift of the machine's speed hits both alike;
    the ratio is the median of the rounds' ratios."""
    import statistics

    import step_rate
    from tsdsae.train_step import keep_freed_memory

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    device = torch.device(args.device)
    variant, stage = args.model.split(":")
    stage = int(stage)

    def single():
        return step_rate.setup_step(variant, stage, args.z_dim, args.batch, args.frames, device)

    if args.k == 0:
        dt = step_rate.time_steps(single(), device, args.steps, 2)
        return {"steps_per_s": 1 / dt, "peak_memory_mb": step_rate.peak_memory_mb(device)}
    packed = packed_step(variant, stage, args.z_dim, args.k, args.batch, args.frames, device)
    n = -(-args.steps // args.k)
    first = step_rate.time_steps(packed, device, n, 2)
    peak = step_rate.peak_memory_mb(device)
    one = single()
    step_rate.time_steps(one, device, 1, 2)                                   # its warm-up
    packed_dt, single_dt, ratios = [first], [], []
    for _ in range(args.rounds):
        single_dt.append(step_rate.time_steps(one, device, n * args.k, 0))
        packed_dt.append(step_rate.time_steps(packed, device, n, 0))
        ratios.append(args.k * single_dt[-1] / packed_dt[-1])
    return {"steps_per_s": 1 / statistics.median(packed_dt),
            "single_steps_per_s": 1 / statistics.median(single_dt),
            "ratio": statistics.median(ratios), "ratios": ratios, "peak_memory_mb": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--models", nargs="+", default=["dsae:1", "ts_dsae:2"],
                   help="variant:stage pairs")
    p.add_argument("--z-dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--frames", type=int, default=251)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds of single and packed steps per K (median ratio)")
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.k is not None:
        print(json.dumps(measure_one(args)), flush=True)
        return 0
    common = ["--device", args.device, "--z-dim", str(args.z_dim), "--batch", str(args.batch),
              "--frames", str(args.frames), "--threads", str(args.threads),
              "--steps", str(args.steps), "--rounds", str(args.rounds)]

    def child(model: str, k: int) -> dict:
        out = subprocess.run([sys.executable, __file__, *common, "--model", model, "--k", str(k)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    for model in args.models:
        variant, stage = model.split(":")
        single = child(model, 0)
        base = {"model": variant, "stage": int(stage), "z_dim": args.z_dim, "batch": args.batch,
                "frames": args.frames, "device": args.device, "gpu": gpu,
                "threads": args.threads}
        print(json.dumps({**base, "k": 1, "packed": False,
                          "steps_per_s": round(single["steps_per_s"], 3),
                          "trial_steps_per_s": round(single["steps_per_s"], 3),
                          "peak_memory_mb": round(single["peak_memory_mb"], 1)}), flush=True)
        for k in args.packs:
            row = child(model, k)
            print(json.dumps({**base, "k": k, "packed": True,
                              "steps_per_s": round(row["steps_per_s"], 3),
                              "trial_steps_per_s": round(k * row["steps_per_s"], 3),
                              "single_steps_per_s": round(row["single_steps_per_s"], 3),
                              "ratio": round(row["ratio"], 3),
                              "round_ratios": [round(r, 3) for r in row["ratios"]],
                              "peak_memory_mb": round(row["peak_memory_mb"], 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
