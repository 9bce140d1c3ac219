"""Evaluation of the global latent (METHOD s6): LDA on v, macro-F1 before and after swaps.

1. Fit sklearn's LinearDiscriminantAnalysis on the posterior means of v over the training split,
   labels = instrument.
2. On the evaluation split pair every clip i with a random clip j of another instrument (seeded).
3. Re-encode, take v's posterior mean, predict with the LDA, macro-F1 against:
     pre_swap  decode(z_i, v_i)  -> y_i
     gswap     decode(z_i, v_j)  -> y_j   (the global latent must carry the instrument)
     lswap     decode(z_j, v_i)  -> y_i   (the local latent must not)
F1 near 1 means v alone sets the instrument; near 0 means the instrument follows z (collapse).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.metrics import f1_score

from tsdsae.dataset import Dataset, Split
from tsdsae.model.dsae import DSAE


@torch.no_grad()
def _batched(fn, n: int, batch: int):
    return torch.cat([fn(slice(s, min(s + batch, n))) for s in range(0, n, batch)])


@torch.no_grad()
def v_means(model: DSAE, split: Split, device, batch: int = 256) -> torch.Tensor:
    def f(s):
        x, m = split.features[s].to(device), split.mask[s].to(device)
        return model.encode_means(x, m)[0].cpu()
    return _batched(f, len(split), batch)


def pair_other_instrument(labels: np.ndarray, seed: int) -> np.ndarray:
    """For each i, a random j with labels[j] != labels[i] (seeded)."""
    rng = np.random.default_rng(seed)
    partner = np.empty(len(labels), dtype=np.int64)
    for i, y in enumerate(labels):
        others = np.flatnonzero(labels != y)
        if len(others) == 0:
            raise ValueError("evaluation needs at least two instruments in the evaluation split")
        partner[i] = rng.choice(others)
    return partner


@torch.no_grad()
def evaluate(model: DSAE, data: Dataset, split: str = "val", seed: int = 0,
             device: str | torch.device = "cpu", batch: int = 256) -> dict[str, float]:
    """Returns {"pre_swap": f1, "gswap": f1, "lswap": f1, "lda_train_acc": acc, "n_eval": N}."""
    model = model.to(device).eval()
    train, ev = data["train"], data[split]
    lda = LinearDiscriminantAnalysis()
    lda.fit(v_means(model, train, device).numpy(), train.instrument.numpy())
    y = ev.instrument.numpy()
    j = pair_other_instrument(y, seed)
    jt = torch.from_numpy(j)

    def reencode_v(s, kind):
        idx = torch.arange(len(ev))[s]
        x_i, m_i = ev.features[idx].to(device), ev.mask[idx].to(device)
        x_j, m_j = ev.features[jt[idx]].to(device), ev.mask[jt[idx]].to(device)
        if kind == "pre_swap":
            out, m = model.reconstruct(x_i, m_i), m_i
        elif kind == "gswap":
            out, m = model.swap_global(x_i, m_i, x_j, m_j), m_i    # decode(z_i, v_j)
        else:
            out, m = model.swap_local(x_i, m_i, x_j, m_j), m_j     # decode(z_j, v_i)
        return model.encode_means(out, m)[0].cpu()

    targets = {"pre_swap": y, "gswap": y[j], "lswap": y}
    result: dict[str, float] = {}
    for kind, target in targets.items():
        pred = lda.predict(_batched(lambda s: reencode_v(s, kind), len(ev), batch).numpy())
        result[kind] = float(f1_score(target, pred, average="macro"))
    result["lda_train_acc"] = float(lda.score(v_means(model, train, device).numpy(),
                                              train.instrument.numpy()))
    result["n_eval"] = len(ev)
    return result


def main(argv=None) -> None:
    from tsdsae import checkpoint
    from tsdsae.config import from_flat
    from tsdsae.trainer import load_data, resolve_device

    p = argparse.ArgumentParser(
        prog="python -m tsdsae.evaluate",
        description="LDA macro-F1 of a checkpoint before and after global/local swaps (JSON).")
    p.add_argument("checkpoint", help="checkpoint path or s3:// URI (e.g. runs/NAME/best.pt)")
    p.add_argument("--data", default=None, help="dataset URI (default: the checkpoint's own)")
    p.add_argument("--split", default=None, help="evaluation split (default: data.eval_split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the different-instrument pairing")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    state = checkpoint.load(args.checkpoint)
    cfg = from_flat(state["config"])
    if args.data:
        cfg = from_flat({"data.uri": args.data}, cfg)
    model = DSAE(cfg.model)
    model.load_state_dict(state["model"])
    model.load_snapshot_state_dict(state.get("snapshot"))
    device = resolve_device(args.device)
    result = evaluate(model, load_data(cfg.data), args.split or cfg.data.eval_split, args.seed,
                      device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
