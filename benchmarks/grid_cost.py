"""Cost model of the paper's robustness grid (METHOD s5) from measured step rates.

    python benchmarks/grid_cost.py --device cuda [--trials-per-gpu 4 --packing-speedup 2.9]
    python benchmarks/grid_cost.py --rates rates.jsonl      # JSON lines of benchmarks/step_rate.py
    python benchmarks/grid_cost.py --device cuda --packed-rates packed.jsonl   # packed_rate.py

For every cell of the grid (z_dim x optimiser x seed x dataset) the sweep trains DSAE (all epochs
in one stage), one shared stage 1 (C epochs) and three stage-2 forks (DSAE-freeze, TS-DSAE w/o
reg, TS-DSAE). Epochs default to the paper's budget with no early stop (the logged runs went all
4,000 epochs). Each epoch is ceil(n_train / 128) training steps plus the validation forward passes
(`--eval-cost` of a training step each). With K trials packed on one device whose aggregate
throughput is `--packing-speedup` times one trial's, device-hours divide by that speedup.
`--packed-rates` takes the speedups from benchmarks/packed_rate.py's JSON lines instead: the best
`ratio` over K of DSAE stage 1 for stage-1 jobs and of TS-DSAE stage 2 for stage-2 jobs.
Prints one JSON line per model and one for the whole grid.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (variant, stage) pairs the grid trains, and which epochs they run
JOBS = [("dsae", 1), ("ts_dsae", 1), ("dsae_freeze", 2), ("ts_dsae_wo_reg", 2), ("ts_dsae", 2)]
DATASETS = {"dmelodies": (2400, 600), "urmp": (2080, 260)}   # train / validation clips


def load_rates(path: str) -> dict[tuple[str, int, int], float]:
    rates = {}
    for line in Path(path).read_text().splitlines():
        if line.strip().startswith("{"):
            r = json.loads(line)
            if r.get("mode", "single") == "single" and "ms_per_step" in r:
                rates[(r["model"], r["stage"], r["z_dim"])] = r["ms_per_step"] / 1000.0
    return rates


def load_packing_speedups(path: str) -> dict[int, tuple[float, int]]:
    """{stage: (best ratio, its K)} from packed_rate.py JSON lines (dsae rows for stage 1,
    ts_dsae rows for stage 2)."""
    best: dict[int, tuple[float, int]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip().startswith("{"):
            continue
        r = json.loads(line)
        if not r.get("packed") or (r["model"], r["stage"]) not in (("dsae", 1), ("ts_dsae", 2)):
            continue
        if r["ratio"] > best.get(r["stage"], (0.0, 0))[0]:
            best[r["stage"]] = (r["ratio"], r["k"])
    return best


def measure_rates(device: str, z_dims, threads: int, steps: int) -> dict:
    import torch

    import step_rate
    from tsdsae.train_step import keep_freed_memory

    torch.set_num_threads(threads)
    keep_freed_memory()
    rates = {}
    for z in z_dims:
        for variant, stage in JOBS:
            r = step_rate.measure(variant, stage, z, 128, 251, torch.device(device), steps, 3)
            print(json.dumps({"measured": True, **r}), flush=True)
            rates[(variant, stage, z)] = r["ms_per_step"] / 1000.0
    return rates


def grid_cost(rates: dict, z_dims, seeds: int, optimisers: int, datasets, epochs: int,
              switch: int, batch: int, eval_cost: float, packing_speedup) -> list[dict]:
    """Device-hours per job and for the grid. `packing_speedup`: one factor, or {stage: factor}."""
    rows = []
    total = 0.0
    for variant, stage in JOBS:
        n_epochs = epochs if variant == "dsae" else (switch if stage == 1 else epochs - switch)
        seconds = 0.0
        for z in z_dims:
            step_s = rates[(variant, stage, z)]
            for name in datasets:
                n_train, n_val = DATASETS[name]
                per_epoch = (math.ceil(n_train / batch) + eval_cost * math.ceil(n_val / batch))
                seconds += seeds * optimisers * n_epochs * per_epoch * step_s
        speedup = (packing_speedup.get(stage, 1.0) if isinstance(packing_speedup, dict)
                   else packing_speedup)
        hours = seconds / 3600 / speedup
        total += hours
        label = f"{variant}/stage{stage}" if variant != "dsae" else "dsae"
        rows.append({"job": label, "device_hours": round(hours, 2),
                     "packing_speedup": speedup})
    runs = 4 * len(z_dims) * seeds * optimisers * len(datasets)
    rows.append({"job": "grid", "runs": runs, "device_hours": round(total, 2),
                 "hours_per_run": round(total / runs, 4), "packing_speedup": packing_speedup})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rates", help="step_rate.py JSON lines to use instead of measuring")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--z-dims", default="8,16,32")
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--optimisers", type=int, default=2)
    p.add_argument("--datasets", default="dmelodies,urmp")
    p.add_argument("--epochs", type=int, default=4000)
    p.add_argument("--switch-epoch", type=int, default=300)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-cost", type=float, default=0.35,
                   help="cost of a validation batch relative to a training step (forward only)")
    p.add_argument("--trials-per-gpu", type=int, default=1)
    p.add_argument("--packing-speedup", type=float, default=1.0,
                   help="aggregate throughput of --trials-per-gpu packed trials over one trial")
    p.add_argument("--packed-rates", help="packed_rate.py JSON lines: per-stage packing speedups")
    p.add_argument("--goal-hours", type=float, default=4.0)
    args = p.parse_args(argv)
    z_dims = [int(z) for z in args.z_dims.split(",")]
    rates = (load_rates(args.rates) if args.rates
             else measure_rates(args.device, z_dims, args.threads, args.steps))
    speedup = args.packing_speedup
    packs = {}
    if args.packed_rates:
        packs = load_packing_speedups(args.packed_rates)
        speedup = {stage: ratio for stage, (ratio, _) in packs.items()}
    rows = grid_cost(rates, z_dims, args.seeds, args.optimisers, args.datasets.split(","),
                     args.epochs, args.switch_epoch, args.batch, args.eval_cost, speedup)
    for row in rows:
        row.update(device=args.device, trials_per_gpu=args.trials_per_gpu)
        if row["job"] == "grid":
            if packs:
                row["packing_speedup"] = {f"stage{s}": {"ratio": r, "k": k}
                                          for s, (r, k) in packs.items()}
            row["goal_hours"] = args.goal_hours
            row["meets_goal"] = row["device_hours"] <= args.goal_hours
            # the paper's logged cost: ~4.7 GPU-hours per run on an RTX A5000, 288 runs
            row["paper_gpu_hours"] = round(4.7 * row["runs"], 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
