"""Training step rate: forward, loss, backward and optimiser step on a realistic batch.

    python benchmarks/step_rate.py [--model M] [--stage 1|2] [--z-dim N] [--batch 128]
                                   [--frames 251] [--threads N] [--device cpu|cuda]
Prints one JSON line per configuration. With no --model/--stage/--z-dim it runs DSAE and TS-DSAE
stage 1 and stage 2 at z_dim 8 and 32.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tsdsae import schedule  # noqa: E402
from tsdsae.config import ModelConfig, VARIANTS  # noqa: E402
from tsdsae.model import DSAE  # noqa: E402
from tsdsae.train_step import build_optimizer, train_step  # noqa: E402
from tsdsae.trainer import PriorCache  # noqa: E402
from tsdsae.dataset import Split  # noqa: E402


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant: str, stage: int, z_dim: int, batch: int, frames: int, device: torch.device,
            steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = DSAE(ModelConfig(z_dim=z_dim)).to(device)
    opt = build_optimizer(model, 1e-3)
    switch = 1
    epoch = 0 if stage == 1 else switch
    plan = schedule.plan(variant, epoch, switch)
    if plan.stage != stage:
        raise ValueError(f"{variant} has no stage {stage}")
    x = torch.randn(batch, frames, 80, device=device) * 3 - 5
    mask = torch.ones(batch, frames, dtype=torch.bool, device=device)
    model.set_trainable(set(plan.trainable))
    prior = None
    if plan.informed_prior:
        model.take_snapshot()
        split = Split(x, mask, torch.zeros(batch, dtype=torch.long, device=device),
                      torch.zeros(batch, frames, dtype=torch.long, device=device),
                      [str(i) for i in range(batch)], ("a",))
        prior = PriorCache(model, split)(torch.arange(batch, device=device))

    def step():
        return train_step(model, opt, x, mask, plan, (1, 1, 1, 1), prior)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        terms = step()
    float(terms["loss"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return {"model": variant, "stage": stage, "z_dim": z_dim, "batch": batch, "frames": frames,
            "device": str(device), "threads": torch.get_num_threads(),
            "steps_per_s": round(1 / dt, 3), "ms_per_step": round(dt * 1000, 2),
            "peak_memory_mb": round(peak_memory_mb(device), 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=VARIANTS)
    p.add_argument("--stage", type=int, choices=(1, 2))
    p.add_argument("--z-dim", type=int)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--frames", type=int, default=251)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.model or args.stage or args.z_dim:
        variants = [args.model or "ts_dsae"]
        stages = [args.stage] if args.stage else [1, 2]
        zs = [args.z_dim] if args.z_dim else [8, 32]
        configs = [(v, s, z) for v in variants for s in stages for z in zs
                   if not (v == "dsae" and s == 2)]
    else:
        configs = [(v, s, z) for z in (8, 32) for v, s in
                   (("dsae", 1), ("ts_dsae", 1), ("ts_dsae", 2))]
    for variant, stage, z in configs:
        print(json.dumps(measure(variant, stage, z, args.batch, args.frames, device,
                                 args.steps, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
