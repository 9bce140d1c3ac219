"""A run's page: `report.html`, one self-contained file to open and listen to, and the pieces
the sweep's page (tune/report_page.py) is built from.

The page of one run (`write_run_page`, written at the end of `tsdsae.train` and rebuilt by
`python -m tsdsae.run_report CHECKPOINT`) holds: what the scores say in words, the scores of the
scored split (and val beside it), the K x K table of which instrument each global swap is heard
as (the LDA's prediction of decode(z_i, v_j) against j's instrument, METHOD s6), an example
pair A/B of different instruments through the model (inputs, reconstruction, global and local
swap as audio players with log-mel spectrograms), a swap matrix of one clip per instrument
(melody of the row's clip, v of the column's; up to MATRIX_INSTRUMENTS instruments), the
per-epoch losses with KL_v (log scale, the stage switch marked) and the projection of v.

Images and sounds are embedded as data: URIs, so a page needs no network, no JavaScript and no
sibling files (MLflow previews it as an artifact); its WAVs are also written to `report_files/`.
"""
from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from tsdsae import features

GRIFFIN_LIM_ITERS = 32


def spectrogram_png(logmel: torch.Tensor, title: str) -> bytes:
    """PNG bytes of a log-mel (T, F) as an image (time left to right, low mels at the bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 1.5))
    seconds = logmel.shape[0] * features.HOP / features.SAMPLE_RATE
    ax.imshow(logmel.T.numpy(), origin="lower", aspect="auto", cmap="magma",
              extent=(0, seconds, 0, logmel.shape[1]), vmin=-12, vmax=float(logmel.max()))
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("s", fontsize=7, labelpad=1)
    ax.set_ylabel("mel", fontsize=7, labelpad=1)
    ax.tick_params(labelsize=6)
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def wav_bytes(audio: torch.Tensor) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio.detach().cpu().float().clamp(-1, 1).numpy(), features.SAMPLE_RATE,
             format="WAV", subtype="PCM_16")
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def example_pair(split, seed: int = 0) -> tuple[int, int]:
    """Indices (a, b) of two clips of different instruments in a tsdsae.dataset.Split: a of the
    first instrument present, b of the next; chosen by `seed`. Raises ValueError when the split
    holds one instrument only."""
    labels = split.instrument.cpu().numpy()
    present = sorted(set(labels.tolist()))
    if len(present) < 2:
        raise ValueError("the scored split holds clips of one instrument only; a swap pair "
                         "needs two instruments")
    rng = np.random.default_rng(seed)
    a = int(rng.choice(np.flatnonzero(labels == present[0])))
    b = int(rng.choice(np.flatnonzero(labels == present[1])))
    return a, b


class Sound:
    """One row of a pair table: a label in words, WAV bytes, a spectrogram PNG."""

    def __init__(self, label: str, audio: torch.Tensor, logmel: torch.Tensor, file: str):
        self.label, self.file = label, file
        self.wav = wav_bytes(audio)
        self.png = spectrogram_png(logmel, label)


@torch.no_grad()
def model_sounds(m, split, a: int, b: int, names: tuple[str, str],
                 prefix: str = "") -> list[Sound]:
    """Reconstruction of A, global swap decode(z_A, v_B) and local swap decode(z_B, v_A) of one
    trained model `m` (a tsdsae.inference.InferenceModel; posterior means; Griffin-Lim audio at
    16 kHz)."""
    idx = torch.tensor([a, b])
    x, mask = split.features[idx], split.mask[idx]
    enc = m.encode(x, mask)
    recon = m.decode(enc.z[:1], enc.v[:1], enc.mask[:1])[0]
    gswap = m.decode(enc.z[:1], enc.v[1:], enc.mask[:1])[0]      # melody of A, instrument of B
    lswap = m.decode(enc.z[1:], enc.v[:1], enc.mask[1:])[0]      # melody of B, instrument of A
    name_a, name_b = names
    out = []
    for what, feats, label in (
            ("recon", recon, f"reconstruction of A ({name_a})"),
            ("global_swap", gswap, f"global swap: melody of A, instrument of B ({name_b})"),
            ("local_swap", lswap, f"local swap: melody of B, instrument of A ({name_a})")):
        audio = m.to_audio(feats, n_iter=GRIFFIN_LIM_ITERS)
        out.append(Sound(label, audio, feats.cpu(), f"{prefix}{what}.wav"))
    return out


def input_sounds(split, a: int, b: int, names: tuple[str, str], prefix: str = "") -> list[Sound]:
    """The pair's inputs A and B as sounds: the stored recordings, or Griffin-Lim of their
    features where the split holds no audio; files `{prefix}input_A.wav` / `..._B.wav`."""
    from tsdsae.evaluate import listen

    out = []
    for idx, tag, name in ((a, "A", names[0]), (b, "B", names[1])):
        x, mask = split.features[idx], split.mask[idx]
        audio = (split.audio[idx] if split.audio is not None
                 else listen(x[None], mask[None], GRIFFIN_LIM_ITERS)[0])
        out.append(Sound(f"input {tag}: {name} ({split.keys[idx]})", audio, x,
                         f"{prefix}input_{tag}.wav"))
    return out


def sound_rows(sounds: Sequence[Sound]) -> str:
    rows = []
    for s in sounds:
        rows.append(
            f"<tr><td class='what'>{html.escape(s.label)}</td>"
            f"<td><audio controls preload='auto' data-file='{html.escape(s.file)}' "
            f"src='{data_uri(s.wav, 'audio/wav')}'></audio><br>"
            f"<a download='{html.escape(s.file)}' href='report_files/{html.escape(s.file)}'>"
            f"{html.escape(s.file)}</a></td>"
            f"<td><img alt='log-mel of {html.escape(s.label)}' "
            f"src='{data_uri(s.png, 'image/png')}'></td></tr>")
    return "<table class='pair'>" + "".join(rows) + "</table>"


STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; font-size: 0.9em; vertical-align: middle; }
td.what { width: 260px; }
img.figure { max-width: 100%; border: 1px solid #ddd; }
.verdict { background: #f4f8f4; border-left: 4px solid #2ca02c; padding: 0.5em 1em; }
"""


def load_split(uri: str, split_name: str, endpoint_url: str | None = None,
               checkpoint: str | None = None):
    """The scored split of a dataset URI (with audio when stored). For the built-in toy data,
    the toy settings of `checkpoint`'s run config rebuild the same clips."""
    if uri == "toy":
        from tsdsae.config import DataConfig
        from tsdsae.trainer import load_data

        cfg = DataConfig(uri="toy")
        if checkpoint:
            from tsdsae import inference
            cfg = inference.load(checkpoint, endpoint_url=endpoint_url).config.data
        return load_data(cfg)[split_name]
    from tsdsae.data import load_dataset

    return load_dataset(uri, splits=[split_name], with_audio=True,
                        endpoint_url=endpoint_url)[split_name]




MATRIX_INSTRUMENTS = 6          # instruments in a page's swap matrix (one clip each)


def loss_curves_png(history: Sequence[Mapping], switch_epoch: int | None = None) -> bytes:
    """PNG bytes of the per-epoch losses of a run's history (train and val loss, recon, KL_z,
    KL_v; log scale, since KL_v of a collapsed v is 1e-4 next to a reconstruction of 0.3), the
    stage switch as a dashed line when `switch_epoch` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in history]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss"),
                       ("train_recon", "recon"), ("train_kl_z", "KL_z"), ("train_kl_v", "KL_v")):
        values = [max(float(r[key]), 1e-8) if key in r else np.nan for r in history]
        ax.plot(epochs, values, label=label, lw=1.2)
    if switch_epoch is not None and epochs and epochs[0] <= switch_epoch <= epochs[-1]:
        ax.axvline(switch_epoch - 0.5, color="grey", ls="--", lw=1, label="stage 2 starts")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title("losses per epoch (train terms; KL_v per v dimension)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def confusion_html(matrix: Sequence[Sequence[int]], names: Sequence[str]) -> str:
    """HTML table of a K x K count matrix: row = the instrument of the clip whose v was used
    (what the global swap should sound like), column = the instrument the LDA hears; the
    diagonal is right."""
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for i, row in enumerate(matrix):
        total = max(sum(row), 1)
        cells = "".join(
            f"<td style='background: rgba(44,160,44,{0.15 + 0.85 * c / total:.2f})'>{c}</td>"
            if i == j else f"<td>{c}</td>" for j, c in enumerate(row))
        rows.append(f"<tr><th>{html.escape(names[i])}</th>{cells}</tr>")
    return ("<table class='confusion'><tr><th>v of (row) / heard as (column)</th>" + head + "</tr>"
            + "".join(rows) + "</table>")


def scores_html(scores: Mapping) -> str:
    """The numeric scores of an evaluation as a two-column table."""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v if isinstance(v, int) else f'{v:.3f}'}"
                   "</td></tr>"
                   for k, v in scores.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool))
    return f"<table class='scores'><tr><th>score</th><th>value</th></tr>{rows}</table>"


def one_clip_per_instrument(split, limit: int = MATRIX_INSTRUMENTS, seed: int = 0) -> list[int]:
    """Indices of one clip (chosen by `seed`) of each of the first `limit` instruments present
    in a tsdsae.dataset.Split."""
    labels = split.instrument.cpu().numpy()
    rng = np.random.default_rng(seed)
    return [int(rng.choice(np.flatnonzero(labels == k)))
            for k in sorted(set(labels.tolist()))[:limit]]


@torch.no_grad()
def swap_matrix(m, split, clips: Sequence[int]) -> tuple[str, list[Sound]]:
    """HTML of a swap matrix of model `m` (a tsdsae.inference.InferenceModel): cell (r, c)
    plays decode(z_r, v_c), the melody of clip r with the global latent of clip c (the diagonal
    is the reconstruction). Returns the table and its sounds (for the WAV files)."""
    idx = torch.tensor(list(clips))
    enc = m.encode(split.features[idx], split.mask[idx])
    names = [split.instruments[int(split.instrument[i])] for i in clips]
    sounds, rows = [], []
    for r in range(len(clips)):
        cells = []
        for c in range(len(clips)):
            feats = m.decode(enc.z[r:r + 1], enc.v[c:c + 1], enc.mask[r:r + 1])[0]
            label = f"melody of {names[r]} clip, v of {names[c]} clip"
            s = Sound(label, m.to_audio(feats, n_iter=GRIFFIN_LIM_ITERS), feats.cpu(),
                      f"matrix_{r}_{c}.wav")
            sounds.append(s)
            cells.append(f"<td><audio controls preload='none' src='{data_uri(s.wav, 'audio/wav')}'>"
                         f"</audio></td>")
        rows.append(f"<tr><th>melody: {html.escape(names[r])}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th>v: {html.escape(n)}</th>" for n in names)
    return f"<table class='matrix'><tr><th></th>{head}</tr>{''.join(rows)}</table>", sounds


def write_run_page(checkpoint: str, split, split_name: str, scores: Mapping, out_dir: str | Path,
                   endpoint_url: str | None = None, seed: int = 0) -> Path:
    """Write `out_dir/report.html` for one run (WAVs in `out_dir/report_files/`); returns its
    path. `checkpoint`: the run's best.pt (its history, or the history of last.pt beside it
    when there is one, gives the loss curves); `split`: the scored split (tsdsae.dataset.Split,
    with audio when stored); `scores`: tsdsae.evaluate.evaluate_run's result (with
    gswap_confusion and instruments). Raises ValueError when the split holds one instrument."""
    from tsdsae import checkpoint as ckpt
    from tsdsae import inference
    from tsdsae.evaluate import evaluation_words
    from tsdsae.figures import v_projection

    out = Path(out_dir)
    files = out / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    state = ckpt.load(checkpoint, endpoint_url=endpoint_url)          # read once
    m = inference.InferenceModel(*inference.model_from_state(state, checkpoint))
    cfg = m.config
    last = checkpoint.rsplit("/", 1)[0] + "/last.pt" if "/" in checkpoint else "last.pt"
    history = state.get("history") or []
    if ckpt.exists(last, endpoint_url):            # the whole run, not only up to the best epoch
        history = ckpt.load(last, endpoint_url=endpoint_url).get("history") or history
    names = list(scores.get("instruments") or split.instruments)
    a, b = example_pair(split, seed)
    pair_names = (names[int(split.instrument[a])], names[int(split.instrument[b])])
    inputs = input_sounds(split, a, b, pair_names)
    pair = model_sounds(m, split, a, b, pair_names)
    matrix, matrix_sounds = swap_matrix(m, split, one_clip_per_instrument(split, seed=seed))
    for s in inputs + pair + matrix_sounds:
        (files / s.file).write_bytes(s.wav)
    with tempfile.TemporaryDirectory() as tmp:
        projection = v_projection(m.model, split, Path(tmp) / "v.png", seed=seed).read_bytes()
    switch = None if cfg.schedule.variant == "dsae" else cfg.schedule.switch_epoch
    curves = loss_curves_png(history, switch) if history else b""
    confusion = (confusion_html(scores["gswap_confusion"], names)
                 if scores.get("gswap_confusion") else "<p>(not computed)</p>")
    title = (f"{cfg.name}: {cfg.schedule.variant}, z_dim {cfg.model.z_dim}, seed {cfg.seed}, "
             f"data {cfg.data.uri}")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="verdict"><p>{html.escape(evaluation_words(scores, len(names)))}</p>
<p>Checkpoint {html.escape(checkpoint)} (best validation loss, epoch {state.get("epoch")}).</p></div>
<h2>Scores ({html.escape(split_name)} split; val_* on the validation split)</h2>
{scores_html(scores)}
<h2>Which instrument each global swap is heard as</h2>
<p>Rows: the instrument of the clip whose global latent v was decoded with another clip's z;
columns: the instrument the LDA on v hears in the result. A diagonal means v carries the
instrument; a collapsed v puts the counts in the column of z's instrument instead.</p>
{confusion}
<h2>Listen: one pair</h2>
<p>The global swap keeps A's melody (z) and takes B's instrument (v); the local swap the other
way round. Model outputs are decoded log-mels heard through Griffin-Lim.</p>
{sound_rows(inputs + pair)}
<h2>Swap matrix: one clip per instrument</h2>
<p>Cell (row, column) plays the melody of the row's clip with the global latent of the column's
clip; the diagonal is the reconstruction.</p>
{matrix}
<h2>Training</h2>
{f"<p><img class='figure' alt='losses per epoch' src='{data_uri(curves, 'image/png')}'></p>" if curves else ""}
<p><img class='figure' alt='projection of v' src='{data_uri(projection, 'image/png')}'></p>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    (out / "scores.json").write_text(json.dumps(dict(scores), indent=1))
    return path
