"""torch.compile of the plain model against the CPU blocks (tsdsae.model.fast_cpu).

    python benchmarks/compile_rate.py [--variant ts_dsae] [--stage 2] [--z-dim 32] [--batch 128]
                                      [--frames 251] [--threads 2] [--steps 5] [--rounds 3]

One JSON line per way of running the same training step (forward, the stage's loss, backward,
Adam) on one fixed batch: "plain" (the factor modules in eager mode), "fast_cpu" (the model
built from the CPU blocks, as the trainer builds it) and "compiled" (torch.compile, inductor,
of the plain model's forward and loss; the optimiser step eager). The ways alternate in `--rounds` rounds of `--steps` steps each, so the
machine's drift hits them alike; ms_per_step is the median over the rounds. "compile_s" is the
compiled way's first call (tracing and code generation). vs_fast_cpu = fast_cpu ms / this ms
(> 1: faster than the CPU blocks).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tsdsae import schedule  # noqa: E402
from tsdsae.config import ModelConfig  # noqa: E402
from tsdsae.losses import elbo_terms, masked_kl_mean, swap_terms, total_loss  # noqa: E402
from tsdsae.model import DSAE, fast_cpu  # noqa: E402
from tsdsae.model.layers import PLAIN, normal  # noqa: E402
from tsdsae.train_step import build_optimizer, keep_freed_memory, train_step  # noqa: E402


def setup(args, blocks=PLAIN):
    """The model (built from `blocks`, the same initial weights either way), its optimiser, the
    batch, the stage plan and the cached informed prior."""
    torch.manual_seed(0)
    model = DSAE(ModelConfig(z_dim=args.z_dim), blocks)
    opt = build_optimizer(model, 1e-3)
    plan = schedule.plan(args.variant, 0 if args.stage == 1 else 1, 1)
    if plan.stage != args.stage:
        raise SystemExit(f"{args.variant} has no stage {args.stage}")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.frames, 80, generator=g) * 3 - 5
    mask = torch.ones(args.batch, args.frames, dtype=torch.bool)
    model.set_trainable(set(plan.trainable))
    prior = None
    if plan.informed_prior:
        model.take_snapshot()
        with torch.no_grad():
            prior = model.informed_prior(x, mask)
    return model, opt, plan, x, mask, prior


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="ts_dsae")
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--z-dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--frames", type=int, default=251)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    model, opt, plan, x, mask, prior = setup(args)
    fast, fast_opt, _, _, _, _ = setup(args, fast_cpu.CPU_BLOCKS)
    weights = (1.0, 1.0, 1.0, 1.0)

    def loss_of(x, mask, perm_g, perm_l, prior_loc, prior_logvar):
        perms = (perm_g, perm_l) if plan.swaps else None
        out = model(x, mask, swap_perms=perms)
        v_prior = normal(prior_loc, prior_logvar) if plan.informed_prior else None
        terms = elbo_terms(x, mask, out, v_prior, masked_kl_mean)
        if plan.swaps:
            terms.update(swap_terms(out, mask, perms, masked_kl_mean))
        return total_loss(terms, weights)

    compiled_loss = torch.compile(loss_of)
    zeros = torch.zeros(args.batch, model.cfg.v_dim)
    p_loc, p_logvar = (prior.loc, prior.logvar) if prior is not None else (zeros, zeros)

    def compiled_step():
        opt.zero_grad(set_to_none=True)
        perm_g, perm_l = torch.randperm(args.batch), torch.randperm(args.batch)
        loss = compiled_loss(x, mask, perm_g, perm_l, p_loc, p_logvar)
        loss.backward()
        opt.step()
        return loss

    ways = {
        "plain": lambda: train_step(model, opt, x, mask, plan, weights, prior, core=model),
        "fast_cpu": lambda: train_step(fast, fast_opt, x, mask, plan, weights, prior,
                                       masked_kl=fast_cpu.masked_kl_mean),
        "compiled": compiled_step,
    }
    t0 = time.perf_counter()
    compiled_step()
    compile_s = time.perf_counter() - t0
    for way in ways.values():                                   # warm-up
        way()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                way()
            times[name].append((time.perf_counter() - t) / args.steps * 1000)
    fast_ms = statistics.median(times["fast_cpu"])
    for name, ms in times.items():
        row = {"way": name, "variant": args.variant, "stage": args.stage, "z_dim": args.z_dim,
               "batch": args.batch, "frames": args.frames, "threads": args.threads,
               "ms_per_step": round(statistics.median(ms), 1),
               "rounds_ms": [round(v, 1) for v in ms],
               "vs_fast_cpu": round(fast_ms / statistics.median(ms), 3)}
        if name == "compiled":
            row["compile_s"] = round(compile_s, 1)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
