"""Scores at training budgets in steps: TS-DSAE and DSAE on one dataset, one JSON line a run.

    python benchmarks/budget_ladder.py --data data/varied --budgets 1400:2100 1400:4200 \
        --seeds 831 277 --models ts_dsae dsae --out ladder/
    python benchmarks/budget_ladder.py --data data/varied --pack-to varied.npz   # then, where the
    python benchmarks/budget_ladder.py --pack varied.npz --device cuda ...      # data stack is not

A budget S1:S2 is stage-1 steps then stage-2 steps (tsdsae.config.step_budget: epochs of
ceil(n_train / 128) steps, patience = the whole budget; DSAE trains S1 + S2 steps in its one
stage). Each run trains with the paper's model and optimiser, keeps its best-on-val checkpoint
in OUT/runs/NAME/best.pt and prints {"model", "seed", "stage1_steps", "stage2_steps",
"epochs", "best_epoch", "seconds", "device", test pre_swap / gswap / lswap, val_*}: the LDA
scores of tsdsae.evaluate (pitch off; `python -m tsdsae.evaluate OUT/runs/NAME/best.pt --pitch`
adds it where torchcrepe is installed).

--pack-to writes the dataset's splits to one .npz (features as float16 to halve its size,
masks, labels, notes, keys; no audio, no pickles) and exits; --pack trains from such a file
instead of a dataset URI, for a machine without the shard reader's dependencies. Runs trained
from a pack see features rounded to float16 (about 3 significant digits of a log-mel).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tsdsae.config import apply_overrides, paper, step_budget  # noqa: E402
from tsdsae.dataset import Dataset, Split  # noqa: E402


def write_pack(data: Dataset, path: str) -> None:
    """The splits of `data` as one .npz (see the module docstring)."""
    arrays = {}
    for name in data.splits:
        s = data[name]
        arrays.update({f"{name}/features": s.features.numpy().astype(np.float16),
                       f"{name}/mask": s.mask.numpy(), f"{name}/instrument": s.instrument.numpy(),
                       f"{name}/notes": s.notes.numpy().astype(np.int16),
                       f"{name}/keys": np.array(s.keys)})
    arrays["instruments"] = np.array(data[next(iter(data.splits))].instruments)
    np.savez(path, **arrays)


def read_pack(path: str, name: str) -> Dataset:
    """A Dataset from write_pack's file (loaded with allow_pickle=False)."""
    z = np.load(path, allow_pickle=False)
    instruments = tuple(str(i) for i in z["instruments"])
    splits = {}
    for split in sorted({k.split("/")[0] for k in z.files if "/" in k}):
        splits[split] = Split(torch.from_numpy(z[f"{split}/features"].astype(np.float32)),
                              torch.from_numpy(z[f"{split}/mask"]),
                              torch.from_numpy(z[f"{split}/instrument"].astype(np.int64)),
                              torch.from_numpy(z[f"{split}/notes"].astype(np.int64)),
                              [str(k) for k in z[f"{split}/keys"]], instruments)
    return Dataset(splits, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="dataset URI (a folder or s3://...)")
    p.add_argument("--pack", help="a .npz written by --pack-to, instead of --data")
    p.add_argument("--pack-to", help="write the dataset's splits to this .npz and exit")
    p.add_argument("--budgets", nargs="+", default=["1400:2100"], help="S1:S2 steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[831])
    p.add_argument("--models", nargs="+", default=["ts_dsae", "dsae"])
    p.add_argument("--z-dim", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="ladder")
    p.add_argument("--data-uri", default=None,
                   help="data.uri stored in the checkpoints (default: --data, or the pack's "
                        "name); where tsdsae.evaluate finds the data later")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.pack:
        data = read_pack(args.pack, Path(args.pack).stem)
    else:
        from tsdsae.data import load_dataset
        data = load_dataset(args.data)
    if args.pack_to:
        write_pack(data, args.pack_to)
        print(json.dumps({"pack": args.pack_to, "splits": {k: len(data[k]) for k in data.splits}}))
        return 0
    from tsdsae.evaluate import LDA_SCORES, evaluate
    from tsdsae.trainer import Trainer

    uri = args.data_uri or args.data or Path(args.pack).stem
    n_train = len(data["train"])
    for budget in args.budgets:
        s1, s2 = (int(x) for x in budget.split(":"))
        for seed in args.seeds:
            for model in args.models:
                name = f"{model}-z{args.z_dim}-s{seed}-{s1}-{s2}"
                cfg = apply_overrides(paper(), {
                    "name": name, "seed": seed, "schedule.variant": model,
                    "model.z_dim": args.z_dim, "data.uri": uri, "device": args.device,
                    "checkpoint.root": f"{args.out}/runs", "checkpoint.every": 100000,
                    "tracking.enabled": False})
                cfg = step_budget(cfg, n_train, s1, s2)
                t0 = time.perf_counter()
                trainer = Trainer(cfg, data=data, progress=False)
                (result,) = trainer.fit(resume=False)
                seconds = time.perf_counter() - t0
                best = trainer.run.best_model()
                test = evaluate(best, data, "test", device=trainer.device)
                val = evaluate(best, data, "val", device=trainer.device)
                print(json.dumps({
                    "model": model, "seed": seed, "z_dim": args.z_dim, "stage1_steps": s1,
                    "stage2_steps": s2, "epochs": result["epochs_run"],
                    "switch_epoch": cfg.schedule.switch_epoch,
                    "best_epoch": result["best_epoch"], "seconds": round(seconds, 1),
                    "device": str(trainer.device),
                    **{k: round(test[k], 4) for k in LDA_SCORES},
                    "gswap_confusion": test["gswap_confusion"],
                    **{f"val_{k}": round(val[k], 4) for k in LDA_SCORES}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
