"""Training step rate: forward, loss, backward and optimiser step on a realistic batch.

    python benchmarks/step_rate.py [--model M] [--stage 1|2] [--z-dim N] [--batch 128]
                                   [--frames 251] [--threads N] [--device cpu|cuda] [--plain]
    python benchmarks/step_rate.py --ray [--workers 1 2] [...]
Prints one JSON line per configuration. With no --model/--stage/--z-dim it runs DSAE and TS-DSAE
stage 1 and stage 2 at z_dim 8 and 32 (with --ray: TS-DSAE stage 2 at z_dim 32). The step runs
the trainer's model (built from tsdsae.model.fast_cpu's blocks on CPU); --plain times the
plain blocks instead.

--ray: the same step inside Ray Train workers (tsdsae.trainer.Ranks' DDP wrapper and weighted
gradient all-reduce), the global batch split across N workers, next to the single-process rate:
`vs_single` = Ray steps/s / single-process steps/s and `overhead_pct` = 100 * (1 - vs_single),
both measured in steady state (warm-up steps excluded); `job_s` is the whole TorchTrainer run
including worker start-up. Every configuration uses the same CPU threads in total (--threads,
divided among the workers) or one GPU per worker.
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
from tsdsae.model import DSAE, fast_cpu  # noqa: E402
from tsdsae.model.layers import PLAIN  # noqa: E402
from tsdsae.losses import masked_kl_mean  # noqa: E402
from tsdsae.train_step import build_optimizer, keep_freed_memory, train_step  # noqa: E402
from tsdsae.trainer import PriorCache  # noqa: E402
from tsdsae.dataset import Split  # noqa: E402


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup_step(variant: str, stage: int, z_dim: int, batch: int, frames: int,
               device: torch.device, rank: int = 0, world_size: int = 1, wrap=None,
               plain: bool = False):
    """A closure running one training step on this rank's part of a fixed global batch.
    The model is built as the trainer builds it (tsdsae.model.fast_cpu.training_pass: the CPU
    blocks on CPU), or from the plain blocks when `plain`; `wrap(module)` gives the module the
    step runs (a DDP wrapper under Ray)."""
    passes = (fast_cpu.TrainingPass(PLAIN, masked_kl_mean) if plain
              else fast_cpu.training_pass(device))
    torch.manual_seed(0)
    model = DSAE(ModelConfig(z_dim=z_dim), passes.blocks).to(device)
    opt = build_optimizer(model, 1e-3)
    switch = 1
    epoch = 0 if stage == 1 else switch
    plan = schedule.plan(variant, epoch, switch)
    if plan.stage != stage:
        raise ValueError(f"{variant} has no stage {stage}")
    part = torch.arange(batch).tensor_split(world_size)[rank]
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(batch, frames, 80, generator=g)[part] * 3 - 5).to(device)
    n = len(part)
    mask = torch.ones(n, frames, dtype=torch.bool, device=device)
    model.set_trainable(set(plan.trainable))
    prior = None
    if plan.informed_prior:
        model.take_snapshot()
        split = Split(x, mask, torch.zeros(n, dtype=torch.long, device=device),
                      torch.zeros(n, frames, dtype=torch.long, device=device),
                      [str(i) for i in range(n)], ("a",))
        prior = PriorCache(model, split)(torch.arange(n, device=device))
    step_model = wrap(model) if wrap is not None else model

    def step():
        return train_step(step_model, opt, x, mask, plan, (1, 1, 1, 1), prior, core=model,
                          masked_kl=passes.masked_kl)

    return step


def time_steps(step, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per step in steady state."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        terms = step()
    float(terms["loss"].sum())          # waits for the device (a pack of runs: one loss each)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def measure(variant: str, stage: int, z_dim: int, batch: int, frames: int, device: torch.device,
            steps: int, warmup: int, plain: bool = False) -> dict:
    dt = time_steps(setup_step(variant, stage, z_dim, batch, frames, device, plain=plain), device,
                    steps, warmup)
    return {"mode": "single", "pass": "plain" if plain else "trainer", "model": variant,
            "stage": stage, "z_dim": z_dim, "batch": batch,
            "frames": frames, "device": str(device), "threads": torch.get_num_threads(),
            "steps_per_s": round(1 / dt, 3), "ms_per_step": round(dt * 1000, 2),
            "peak_memory_mb": round(peak_memory_mb(device), 1)}


def _ray_worker(config: dict) -> None:
    """One Ray Train worker: time steps on this rank's part of the global batch."""
    import tempfile

    import ray.train
    import ray.train.torch

    from tsdsae.ray_train import configure_device
    from tsdsae.trainer import Ranks

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    keep_freed_memory()     # as the trainer does in every worker
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    configure_device(device)
    ranks = Ranks(rank, world)
    ranks.share = len(torch.arange(config["batch"]).tensor_split(world)[rank]) / config["batch"]
    wrap = (lambda m: ranks.wrap(m, device)) if world > 1 else None
    step = setup_step(config["model"], config["stage"], config["z_dim"], config["batch"],
                      config["frames"], device, rank, world, wrap)
    dt = time_steps(step, device, config["steps"], config["warmup"])
    metrics = {"steps_per_s": 1 / dt, "threads_per_worker": torch.get_num_threads(),
               "peak_memory_mb": peak_memory_mb(device), "device": str(device)}
    if rank != 0:
        ray.train.report(metrics)
        return
    # Result.metrics holds only metrics that came with a checkpoint: attach a tiny one.
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def measure_ray(variant: str, stage: int, z_dim: int, batch: int, frames: int, workers: int,
                threads: int, use_gpu: bool, steps: int, warmup: int, storage: str) -> dict:
    import uuid

    import ray.train
    from ray.train.torch import TorchTrainer

    per_worker = max(1, threads // workers)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"model": variant, "stage": stage, "z_dim": z_dim, "batch": batch,
                           "frames": frames, "threads": per_worker, "use_gpu": use_gpu,
                           "steps": steps, "warmup": warmup},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": threads / workers}),
        run_config=ray.train.RunConfig(name=f"step-rate-{uuid.uuid4().hex[:8]}",
                                       storage_path=storage))
    t0 = time.perf_counter()
    metrics = trainer.fit().metrics
    job_s = time.perf_counter() - t0
    dt = 1 / metrics["steps_per_s"]
    return {"mode": "ray", "workers": workers, "model": variant, "stage": stage, "z_dim": z_dim,
            "batch": batch, "frames": frames, "device": metrics["device"],
            "threads_per_worker": metrics["threads_per_worker"],
            "steps_per_s": round(1 / dt, 3), "ms_per_step": round(dt * 1000, 2),
            "peak_memory_mb": round(metrics["peak_memory_mb"], 1), "job_s": round(job_s, 1)}


def run_ray(configs, args) -> None:
    import tempfile

    import ray

    from tsdsae.ray_train import runtime_env

    use_gpu = args.device.startswith("cuda")
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), runtime_env=runtime_env(), log_to_driver=False,
                 configure_logging=False)
        time.sleep(10)       # let Ray's start-up work settle before timing anything
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as storage:
        for variant, stage, z in configs:
            # The single-process rate is taken before and after the Ray rows (Ray idling in
            # the background both times); the ratios use their mean, so drift shows as their gap.
            before = measure(variant, stage, z, args.batch, args.frames, device, args.steps,
                             args.warmup)
            print(json.dumps(before), flush=True)
            rows = [measure_ray(variant, stage, z, args.batch, args.frames, workers, args.threads,
                                use_gpu, args.steps, args.warmup, storage)
                    for workers in args.workers]
            after = measure(variant, stage, z, args.batch, args.frames, device, args.steps,
                            args.warmup)
            print(json.dumps(after), flush=True)
            single = (before["steps_per_s"] + after["steps_per_s"]) / 2
            for row in rows:
                ratio = row["steps_per_s"] / single
                row.update(single_steps_per_s=round(single, 3), vs_single=round(ratio, 3),
                           overhead_pct=round(100 * (1 - ratio), 1))
                print(json.dumps(row), flush=True)


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
    p.add_argument("--plain", action="store_true",
                   help="time the plain model's pass instead of the trainer's (the fast CPU "
                        "pass on CPU)")
    p.add_argument("--ray", action="store_true",
                   help="also run the step in Ray Train workers and compare (JSON per row)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="with --ray: numbers of workers to measure (default: 1 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()     # as the trainer does
    device = torch.device(args.device)
    if args.model or args.stage or args.z_dim:
        variants = [args.model or "ts_dsae"]
        stages = [args.stage] if args.stage else [1, 2]
        zs = [args.z_dim] if args.z_dim else [8, 32]
        configs = [(v, s, z) for v in variants for s in stages for z in zs
                   if not (v == "dsae" and s == 2)]
    elif args.ray:
        configs = [("ts_dsae", 2, 32)]
    else:
        configs = [(v, s, z) for z in (8, 32) for v, s in
                   (("dsae", 1), ("ts_dsae", 1), ("ts_dsae", 2))]
    if args.ray:
        run_ray(configs, args)
        return
    for variant, stage, z in configs:
        print(json.dumps(measure(variant, stage, z, args.batch, args.frames, device,
                                 args.steps, args.warmup, args.plain)), flush=True)


if __name__ == "__main__":
    main()
