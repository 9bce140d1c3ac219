"""Evaluation of the global latent (METHOD s6): LDA on v, macro-F1 before and after swaps.

1. Fit sklearn's LinearDiscriminantAnalysis on the posterior means of v over the training split,
   labels = instrument.
2. On the evaluation split pair every clip i with a random clip j of another instrument (seeded).
3. Re-encode, take v's posterior mean, predict with the LDA, macro-F1 against:
     pre_swap  decode(z_i, v_i)  -> y_i
     gswap     decode(z_i, v_j)  -> y_j   (the global latent must carry the instrument)
     lswap     decode(z_j, v_i)  -> y_i   (the local latent must not)
F1 near 1 means v alone sets the instrument; near 0 means the instrument follows z (collapse).

Checkpoints are chosen on the validation split; the split scored and reported is `eval.split`
(default test, METHOD s5: not the split that chose the checkpoint). `evaluate_run` is what the
end of a run does: the evaluation split (with the pitch metric per the eval config) plus the
validation split's LDA scores beside it, as val_pre_swap / val_gswap / val_lswap.

Optionally (`pitch=True`) the local latent too, with the same pairs: raw pitch accuracy
(tsdsae.pitch, CREPE f0, 50 cents) of Griffin-Lim audio against Griffin-Lim audio of the input
whose z was decoded:
     rpa_recon  decode(z_i, v_i)  vs  x_i
     rpa_gswap  decode(z_i, v_j)  vs  x_i   (pitch must follow z)
     rpa_lswap  decode(z_j, v_i)  vs  x_j
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.metrics import confusion_matrix, f1_score

from tsdsae import features
from tsdsae.cli import cli_main
from tsdsae.config import EvalConfig, RunConfig
from tsdsae.dataset import Dataset, MissingSplitError, Split
from tsdsae.model.dsae import DSAE

LDA_SCORES = ("pre_swap", "gswap", "lswap")


@torch.no_grad()
def _batched(fn, n: int, batch: int):
    return torch.cat([fn(slice(s, min(s + batch, n))) for s in range(0, n, batch)])


@torch.no_grad()
def v_means(model: DSAE, split, device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior means of v (N, V) of every clip of `split` (in memory, or streamed in
    manifest order) and their instrument labels (N,)."""
    means, labels = [], []
    for x, m, instrument in split.chunks(batch):
        means.append(model.encode_means(x.to(device), m.to(device))[0].cpu())
        labels.append(instrument.cpu())
    return torch.cat(means), torch.cat(labels)


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


def listen(feats: torch.Tensor, mask: torch.Tensor, n_iter: int = 32) -> torch.Tensor:
    """Griffin-Lim audio (B, (T - 1) * 256) of log-mel (B, T, F); masked frames become silence
    (padding frames of a dataset are zeros, which would otherwise invert to loud noise)."""
    silent = float(np.log(features.LOG_EPS))
    return features.mel_to_audio(feats.masked_fill(~mask[..., None], silent), n_iter=n_iter)


@torch.no_grad()
def pitch_metrics(model: DSAE, split: Split, partner: np.ndarray,
                  device: str | torch.device = "cpu", crepe_model: str = "full",
                  clips: int | None = None, batch: int = 32, griffin_lim_iters: int = 32,
                  seed: int = 0, decoder: str = "weighted_argmax", progress: bool = False
                  ) -> dict[str, float]:
    """Local-latent metric (METHOD s6): mean raw pitch accuracy of the reconstruction and both
    swaps, for clip i and its partner j = partner[i] (see module docstring).

    `clips` limits the evaluation to the first that many clips (CREPE runs on each clip's
    reference and on its three estimates; 'full' costs about 15x 'tiny'); Griffin-Lim's random phase start is seeded by
    `seed` without touching the caller's RNG. Returns rpa_recon, rpa_gswap, rpa_lswap and
    rpa_n_clips (clips whose reference has voiced frames).
    """
    from tqdm.auto import tqdm

    from tsdsae.pitch import crepe_f0, mean_rpa, raw_pitch_accuracy

    device = torch.device(device)
    n = len(split) if clips is None else min(int(clips), len(split))
    idx = np.arange(n)
    crepe = dict(model=crepe_model, decoder=decoder, device=device)
    rng_devices = [device] if device.type == "cuda" else []
    per_clip: dict[str, list[np.ndarray]] = {"recon": [], "gswap": [], "lswap": []}
    starts = range(0, n, batch)
    calls = iter(range(1 << 30))

    def gl(x, m):
        # Seeded per call: torchcrepe's first use initialises a network (drawing random numbers)
        # before loading its weights, so one seed up front would not fix later phases.
        torch.manual_seed(seed * 1_000_003 + next(calls))
        return listen(x, m, griffin_lim_iters)

    with torch.random.fork_rng(devices=rng_devices):
        # Reference tracks: Griffin-Lim of every input whose z gets decoded (i and its j).
        need = np.unique(np.concatenate([idx, partner[idx]]))
        refs = {}
        for s in tqdm(range(0, len(need), batch), desc="pitch: references", unit="batch",
                      disable=not progress, leave=False):
            sel = torch.from_numpy(need[s:s + batch])
            x, m = split.features[sel].to(device), split.mask[sel].to(device)
            track = crepe_f0(gl(x, m), **crepe)
            refs.update({int(k): track[r] for r, k in enumerate(sel.tolist())})
        for s in tqdm(starts, desc="pitch: swaps", unit="batch", disable=not progress,
                      leave=False):
            i = torch.from_numpy(idx[s:s + batch])
            j = torch.from_numpy(partner[i.numpy()])
            x_i, m_i = split.features[i].to(device), split.mask[i].to(device)
            x_j, m_j = split.features[j].to(device), split.mask[j].to(device)
            outs = {"recon": (model.reconstruct(x_i, m_i), m_i, i),
                    "gswap": (model.swap_global(x_i, m_i, x_j, m_j), m_i, i),   # decode(z_i, v_j)
                    "lswap": (model.swap_local(x_i, m_i, x_j, m_j), m_j, j)}    # decode(z_j, v_i)
            # One CREPE pass over the batch's three estimates, on the frames where their
            # reference is voiced (the only frames raw pitch accuracy counts).
            audio = [gl(out, m) for out, m, _ in outs.values()]
            ref = {kind: _stack_tracks([refs[int(k)] for k in ref_idx.tolist()])
                   for kind, (_, _, ref_idx) in outs.items()}
            voiced = np.concatenate([r.f0 > 0 for r in ref.values()])
            est = crepe_f0(torch.cat(audio), only=voiced, **crepe)
            for k, kind in enumerate(outs):
                rows = slice(k * len(i), (k + 1) * len(i))
                per_clip[kind].append(raw_pitch_accuracy(ref[kind], est[rows]))
    result = {f"rpa_{kind}": mean_rpa(np.concatenate(v)) for kind, v in per_clip.items()}
    result["rpa_n_clips"] = int((~np.isnan(np.concatenate(per_clip["recon"]))).sum())
    return result


def _stack_tracks(tracks):
    from tsdsae.pitch import PitchTrack
    return PitchTrack(np.concatenate([t.f0 for t in tracks]),
                      np.concatenate([t.periodicity for t in tracks]), tracks[0].times)


def missing_split_fix(split: str) -> str:
    """What to do when a dataset lacks the evaluation split `split` (one clause)."""
    other = "val" if split != "val" else "test"
    return (f"score another split with eval.split={other} (tsdsae.evaluate: --split {other}), "
            f"or prepare the dataset again with a {split} split")


def require_split(data: Dataset, split: str) -> None:
    """Raise MissingSplitError (one line: the dataset, the missing split, the fix) unless
    `data` has `split`."""
    if split not in data.splits:
        raise MissingSplitError(repr(data.name), split, data.splits, missing_split_fix(split))


def check_eval_split(cfg: RunConfig) -> None:
    """Before training: raise MissingSplitError when the configured dataset has no
    `cfg.eval.split` (read from the manifest; the toy dataset always has train/val/test), so a
    run does not train for hours and then fail to evaluate."""
    if cfg.data.uri == "toy":
        return
    from tsdsae.data import load_manifest, split_names

    have = split_names(load_manifest(cfg.data.uri, cfg.data.endpoint_url or None))
    if cfg.eval.split not in have:
        raise MissingSplitError(cfg.data.uri, cfg.eval.split, have,
                                missing_split_fix(cfg.eval.split))


@torch.no_grad()
def evaluate(model: DSAE, data: Dataset, split: str = "test", seed: int = 0,
             device: str | torch.device = "cpu", batch: int = 256, pitch: bool = False,
             crepe_model: str = "full", pitch_clips: int | None = None,
             progress: bool = False) -> dict[str, float]:
    """Returns {"pre_swap": f1, "gswap": f1, "lswap": f1, "lda_train_acc": acc, "n_eval": N,
    "gswap_confusion": K x K counts, "instruments": K names}: macro-F1 over the K instruments
    (METHOD s6; each clip paired with a clip of any other instrument), and which instrument
    each global swap decode(z_i, v_j) is heard as (row: j's instrument, column: the LDA's
    prediction; a collapsed v moves the counts off the diagonal).

    The LDA is fitted on the train split and `split` is scored (MissingSplitError when the
    dataset lacks it). With `pitch`, also rpa_recon, rpa_gswap, rpa_lswap, rpa_n_clips (see
    `pitch_metrics`; `crepe_model` 'full' as in the paper or 'tiny', `pitch_clips` to bound the
    cost).
    """
    require_split(data, split)
    model = model.to(device).eval()
    train, ev = data["train"], data[split]
    lda = LinearDiscriminantAnalysis()
    train_v, train_y = (t.numpy() for t in v_means(model, train, device))
    lda.fit(train_v, train_y)
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
    result: dict = {}
    classes = np.arange(len(ev.instruments))
    for kind, target in targets.items():
        pred = lda.predict(_batched(lambda s: reencode_v(s, kind), len(ev), batch).numpy())
        result[kind] = float(f1_score(target, pred, average="macro"))
        if kind == "gswap":      # row: the instrument of v's clip j; column: the one heard
            result["gswap_confusion"] = confusion_matrix(target, pred, labels=classes).tolist()
    result["instruments"] = list(ev.instruments)
    result["lda_train_acc"] = float(lda.score(train_v, train_y))
    result["n_eval"] = len(ev)
    if pitch:
        result.update(pitch_metrics(model, ev, j, device, crepe_model, pitch_clips,
                                    seed=seed, progress=progress))
    return result


def evaluate_run(model: DSAE, data: Dataset, cfg: EvalConfig,
                 device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """The end-of-run evaluation, whatever the tracking: `evaluate` on `cfg.split` (with the
    pitch metric when `cfg.pitch`), its name as "split", and, when that split is not val, the
    validation split's LDA scores as val_pre_swap, val_gswap, val_lswap."""
    scores: dict = {"split": cfg.split}
    scores.update(evaluate(model, data, cfg.split, device=device, pitch=cfg.pitch,
                           crepe_model=cfg.crepe_model, pitch_clips=cfg.pitch_clips or None,
                           progress=progress))
    if cfg.split != "val" and "val" in data.splits:
        val = evaluate(model, data, "val", device=device)
        scores.update({f"val_{k}": val[k] for k in LDA_SCORES})
    return scores


def evaluation_plan(cfg) -> str:
    """The line printed before the end-of-run evaluation: what it computes."""
    e = cfg.eval
    pitch = (f", CREPE {e.crepe_model} pitch accuracy on {e.pitch_clips or 'all'} "
             f"{e.split} clips" if e.pitch else "")
    return (f"evaluating the best checkpoint: LDA on v (fitted on train) scored on {e.split}"
            f"{' and val' if e.split != 'val' else ''}{pitch}, figures...")


def evaluation_words(scores: dict, n_instruments: int) -> str:
    """What the scores say (METHOD s6): macro-F1 of the instrument predicted from v of the
    reconstruction (pre_swap), of decode(z_i, v_j) against j's instrument (gswap) and of
    decode(z_j, v_i) against i's (lswap); near 1 = v alone carries the instrument, near 0 = it
    follows z (collapse), about 1/K = chance for K instruments."""
    g, loc = scores.get("gswap", float("nan")), scores.get("lswap", float("nan"))
    chance = 1.0 / max(n_instruments, 1)
    heard = np.asarray(scores.get("gswap_confusion") or [[1, 1]]).sum(axis=0)
    if (heard > 0).sum() == 1:
        what = ("v carries nothing the LDA can use: every global swap is heard as one "
                "instrument (a macro-F1 of 1/K or less by construction)")
    elif g >= 0.9 and loc >= 0.9:
        what = "v carries the instrument (the global and local latents separate)"
    elif max(g, loc) <= 0.25:
        what = "the instrument follows z: the global latent collapsed"
    else:
        what = "v carries the instrument only partly"
    return (f"{scores.get('split', 'eval')} split: pre_swap {scores.get('pre_swap', 0):.2f}, "
            f"gswap {g:.2f}, lswap {loc:.2f} (macro-F1 of the instrument heard in the "
            f"reconstruction / the global swap / the local swap; 1 = v alone sets it, "
            f"chance {chance:.2f} for {n_instruments} instruments): {what}")


def data_location_from_checkpoint(stored: str, checkpoint_uri: str, confirmed: bool) -> str:
    """The dataset a checkpoint names, when it may be used without --data: 'toy', an existing
    local folder, or an s3:// URI the user confirmed. Raises UsageError saying what to pass."""
    from pathlib import Path

    from tsdsae.cli import UsageError

    if stored == "toy":
        return stored
    if stored.startswith("s3://"):
        if confirmed:
            return stored
        raise UsageError(f"{checkpoint_uri} names its dataset {stored}; a checkpoint does not "
                         f"decide where data is read from: pass --data {stored} (with "
                         "--endpoint-url if it is not AWS) or --data-from-checkpoint")
    if "://" in stored or not Path(stored).is_dir():
        raise UsageError(f"{checkpoint_uri} was trained on {stored!r}, which is not a folder "
                         "here; pass --data with the dataset's location")
    return stored


@cli_main
def main(argv=None) -> int:
    from tsdsae import checkpoint
    from tsdsae.config import from_flat
    from tsdsae.trainer import load_data, resolve_device

    p = argparse.ArgumentParser(
        prog="python -m tsdsae.evaluate",
        description="LDA macro-F1 of a checkpoint before and after global/local swaps (JSON).")
    p.add_argument("checkpoint", help="checkpoint path or s3:// URI (e.g. runs/NAME/best.pt)")
    p.add_argument("--data", default=None,
                   help="dataset URI (default: the checkpoint's own when it is a local folder "
                        "or 'toy'; an s3:// location stored in a checkpoint is only read when "
                        "passed here or with --data-from-checkpoint)")
    p.add_argument("--data-from-checkpoint", action="store_true",
                   help="read the s3:// dataset the checkpoint names (with your credentials "
                        "and --endpoint-url / AWS_ENDPOINT_URL, never an endpoint it stores)")
    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint for s3:// checkpoints and datasets "
                        "(default: AWS_ENDPOINT_URL)")
    p.add_argument("--split", default=None,
                   help="evaluation split (default: the run's eval.split, normally test)")
    p.add_argument("--seed", type=int, default=0, help="seed of the different-instrument pairing")
    p.add_argument("--device", default="auto")
    p.add_argument("--pitch", action="store_true",
                   help="also the local metric: CREPE raw pitch accuracy of recon/gswap/lswap")
    p.add_argument("--crepe-model", choices=("full", "tiny"), default="full",
                   help="CREPE capacity for --pitch (default: full, as in the paper)")
    p.add_argument("--pitch-clips", type=int, default=None,
                   help="score pitch on the first N evaluation clips only (default: all)")
    p.add_argument("--page", metavar="DIR", default=None,
                   help="also write the run's page (report.html: scores, which instrument each "
                        "global swap is heard as, swaps to listen to, losses per epoch) to DIR, "
                        "e.g. runs/NAME/report")
    args = p.parse_args(argv)
    state = checkpoint.load(args.checkpoint, endpoint_url=args.endpoint_url)
    cfg = from_flat(state["config"])
    # Locations in a checkpoint are information, not instructions: the endpoint (and so where
    # signed requests go) is always the user's, and an s3:// dataset it names is read only when
    # the user passes it (or confirms with --data-from-checkpoint).
    data_uri = args.data or data_location_from_checkpoint(cfg.data.uri, args.checkpoint,
                                                          args.data_from_checkpoint)
    cfg = from_flat({"data.uri": data_uri, "data.endpoint_url": args.endpoint_url or ""}, cfg)
    model = DSAE(cfg.model)
    checkpoint.restore_model(model, state, args.checkpoint)
    device = resolve_device(args.device)
    data = load_data(cfg.data)
    split = args.split or cfg.eval.split
    require_split(data, split)
    print(f"scoring the {split} split of {data.name} ({len(data[split])} clips; LDA fitted on "
          f"train)", file=sys.stderr)
    result = evaluate(model, data, split, args.seed, device, pitch=args.pitch,
                      crepe_model=args.crepe_model, pitch_clips=args.pitch_clips, progress=True)
    result = {"split": split, **result}
    print(evaluation_words(result, len(result["instruments"])), file=sys.stderr)
    if args.page:
        from tsdsae.run_report import write_run_page

        path = write_run_page(args.checkpoint, data[split], split, result, args.page,
                              args.endpoint_url, seed=args.seed)
        print(f"page: {path}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
