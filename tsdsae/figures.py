"""Pictures and sounds of a trained model, as files (the tracking module logs them).

- `spectrogram_grid`: log-mel panels in a grid (inputs, reconstructions, swaps);
- `v_projection`: posterior means of v in 2-D (PCA, or LDA), coloured by instrument;
- `z_trajectories`: the first two principal components of z_1:T over time for a few clips,
  above their notes, so one can see z follow the melody;
- `trial_artifacts`: all of the above plus a few swap WAVs for one trained model and dataset.

matplotlib runs on the Agg backend (no display needed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tsdsae import features
from tsdsae.dataset import Dataset, Split
from tsdsae.model.dsae import DSAE

# Colour range of log-mel panels: the top 25 nepers (about 110 dB) below the loudest bin.
DYNAMIC_RANGE = 25.0


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def spectrogram_grid(rows: list[list[tuple[str, torch.Tensor]]], path: str | Path,
                     title: str | None = None) -> Path:
    """A grid of log-mel panels: rows of (panel title, features (T, 80)). One colour scale for
    all panels; time in seconds, mel bins upwards. Returns the PNG path."""
    plt = _pyplot()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    peak = max(float(f.max()) for r in rows for _, f in r)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.4 * n_rows + 0.4),
                             squeeze=False, sharey=True, layout="constrained")
    image = None
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            name, feats = row[c]
            f = feats.detach().cpu().float().numpy()
            seconds = (f.shape[0] - 1) * features.HOP / features.SAMPLE_RATE
            image = ax.imshow(f.T, origin="lower", aspect="auto", cmap="magma",
                              vmin=peak - DYNAMIC_RANGE, vmax=peak,
                              extent=(0.0, seconds, 0, f.shape[1]))
            ax.set_title(name, fontsize=9)
            if r == n_rows - 1:
                ax.set_xlabel("time (s)")
            if c == 0:
                ax.set_ylabel("mel bin")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="log power")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


@torch.no_grad()
def _means(model: DSAE, split: Split, index: np.ndarray, device, batch: int = 256):
    vs, zs = [], []
    for s in range(0, len(index), batch):
        i = torch.from_numpy(index[s:s + batch])
        v, z = model.encode_means(split.features[i].to(device), split.mask[i].to(device))
        vs.append(v.cpu())
        zs.append(z.cpu())
    return torch.cat(vs).numpy(), torch.cat(zs).numpy()


def v_projection(model: DSAE, split: Split, path: str | Path, method: str = "pca",
                 max_clips: int = 2000, device: str | torch.device = "cpu", seed: int = 0
                 ) -> Path:
    """Scatter of the posterior means of v (one point per clip) coloured by instrument.

    method 'pca': the first two principal components. 'lda': the discriminant axes (with two
    instruments there is one; the second axis is then v's first principal component).
    """
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    if method not in ("pca", "lda"):
        raise ValueError(f"method={method!r}: choose 'pca' or 'lda'")
    rng = np.random.default_rng(seed)
    index = np.arange(len(split))
    if len(index) > max_clips:
        index = np.sort(rng.choice(index, max_clips, replace=False))
    v, _ = _means(model.to(device).eval(), split, index, device)
    labels = split.instrument.cpu().numpy()[index]
    pca = PCA(n_components=min(2, v.shape[1], len(v)))
    if method == "pca" or len(np.unique(labels)) < 2:
        xy, names = pca.fit_transform(v), ("PC 1", "PC 2")
    else:
        lda = LinearDiscriminantAnalysis().fit(v, labels)
        d = lda.transform(v)
        if d.shape[1] >= 2:
            xy, names = d[:, :2], ("LD 1", "LD 2")
        else:
            xy, names = np.column_stack([d[:, 0], pca.fit_transform(v)[:, 0]]), ("LD 1", "PC 1")
    if xy.shape[1] == 1:
        xy = np.column_stack([xy[:, 0], np.zeros(len(xy))])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    for c in np.unique(labels):
        sel = labels == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, alpha=0.7, label=split.instruments[c])
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title(f"posterior mean of v ({method.upper()}, {len(v)} clips)", fontsize=10)
    ax.legend(fontsize=8, markerscale=2)
    return _save(fig, path)


def z_trajectories(model: DSAE, split: Split, path: str | Path, clips: int = 4,
                   device: str | torch.device = "cpu", seed: int = 0) -> Path:
    """Principal components 1 and 2 of the posterior means z_t over time for `clips` clips
    (PCA fitted on their valid frames), above each clip's notes (MIDI pitch, rests blank)."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(split), min(clips, len(split)), replace=False))
    _, z = _means(model.to(device).eval(), split, index, device)         # (n, T, Z)
    mask = split.mask[torch.from_numpy(index)].cpu().numpy()
    pca = PCA(n_components=min(2, z.shape[2])).fit(z[mask])
    notes = split.notes[torch.from_numpy(index)].cpu().numpy()
    has_notes = bool((notes >= 0).any())
    plt = _pyplot()
    n_panels = 2 + has_notes
    fig, axes = plt.subplots(n_panels, 1, figsize=(7, 1.9 * n_panels), sharex=True)
    frame_s = features.HOP / features.SAMPLE_RATE
    for k, i in enumerate(index):
        valid = mask[k]
        t = np.flatnonzero(valid) * frame_s
        pcs = pca.transform(z[k][valid])
        label = f"{split.keys[i]} ({split.instruments[int(split.instrument[i])]})"
        for p in range(pcs.shape[1]):
            axes[p].plot(t, pcs[:, p], lw=1, color=f"C{k}", label=label if p == 0 else None)
        if has_notes:
            pitch = np.where(notes[k][valid] >= 0, notes[k][valid], np.nan).astype(float)
            axes[-1].plot(t, pitch, lw=1.5, color=f"C{k}")
    for p in range(2):
        axes[p].set_ylabel(f"z PC {p + 1}")
    if has_notes:
        axes[-1].set_ylabel("note (MIDI)")
    axes[-1].set_xlabel("time (s)")
    axes[0].legend(fontsize=7, loc="upper right")
    axes[0].set_title("posterior mean of z over time", fontsize=10)
    return _save(fig, path)


def _pairs(labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n clips i and partners j of another instrument (any other clip if there is one only)."""
    from tsdsae.evaluate import pair_other_instrument

    rng = np.random.default_rng(seed)
    i = rng.choice(len(labels), min(n, len(labels)), replace=False)
    if len(np.unique(labels)) > 1:
        j = pair_other_instrument(labels, seed)[i]
    else:
        j = (i + 1 + rng.integers(0, max(len(labels) - 1, 1), len(i))) % len(labels)
    return i, j


@torch.no_grad()
def trial_artifacts(model: DSAE, data: Dataset, out_dir: str | Path, split: str = "val",
                    pairs: int = 4, wavs: int = 2, seed: int = 0,
                    device: str | torch.device = "cpu", griffin_lim_iters: int = 32,
                    progress: bool = False) -> list[Path]:
    """Files describing one trained model on `data[split]`, written under `out_dir`:

    swap_grid.png       `pairs` rows: input i, input j, recon i, decode(z_i, v_j), decode(z_j, v_i)
                        (j a clip of another instrument);
    swaps/pairK_*.wav   for the first `wavs` pairs: content_input (source audio when the split
                        has it, else Griffin-Lim of the features), timbre_input, content_recon,
                        global_swap = decode(z_i, v_j), local_swap = decode(z_j, v_i);
    v_projection.png    v means by instrument (PCA);
    z_trajectories.png  z over time for a few clips.
    Returns the paths written.
    """
    from tqdm.auto import tqdm

    from tsdsae.evaluate import listen
    from tsdsae.inference import write_wav

    out = Path(out_dir)
    ev = data[split]
    model = model.to(device).eval()
    labels = ev.instrument.cpu().numpy()
    i, j = _pairs(labels, pairs, seed)
    it, jt = torch.from_numpy(i), torch.from_numpy(j)
    x_i, m_i = ev.features[it].to(device), ev.mask[it].to(device)
    x_j, m_j = ev.features[jt].to(device), ev.mask[jt].to(device)
    recon = model.reconstruct(x_i, m_i)
    gswap = model.swap_global(x_i, m_i, x_j, m_j)         # decode(z_i, v_j)
    lswap = model.swap_local(x_i, m_i, x_j, m_j)          # decode(z_j, v_i)
    name = ev.instruments

    def shown(x, m):                      # padding frames as silence, not as zeros
        return x.masked_fill(~m[..., None], float(np.log(features.LOG_EPS)))

    rows = []
    for k in range(len(i)):
        a, b = name[labels[i[k]]], name[labels[j[k]]]
        rows.append([(f"input i: {a}", shown(x_i[k], m_i[k])),
                     (f"input j: {b}", shown(x_j[k], m_j[k])),
                     ("recon i", shown(recon[k], m_i[k])),
                     (f"gswap: z_i, v_j ({b})", shown(gswap[k], m_i[k])),
                     (f"lswap: z_j, v_i ({a})", shown(lswap[k], m_j[k]))])
    written = [spectrogram_grid(rows, out / "swap_grid.png",
                                title=f"{split}: swaps between clips of different instruments")]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for k in tqdm(range(min(wavs, len(i))), desc="swap WAVs", unit="pair",
                      disable=not progress):
            sounds = {
                "content_input": _source(ev, i[k], x_i[k], m_i[k], griffin_lim_iters),
                "timbre_input": _source(ev, j[k], x_j[k], m_j[k], griffin_lim_iters),
                "content_recon": listen(recon[k:k + 1], m_i[k:k + 1], griffin_lim_iters)[0],
                "global_swap": listen(gswap[k:k + 1], m_i[k:k + 1], griffin_lim_iters)[0],
                "local_swap": listen(lswap[k:k + 1], m_j[k:k + 1], griffin_lim_iters)[0],
            }
            for what, audio in sounds.items():
                written.append(write_wav(out / "swaps" / f"pair{k}_{what}.wav", audio))
    written.append(v_projection(model, ev, out / "v_projection.png", device=device, seed=seed))
    written.append(z_trajectories(model, ev, out / "z_trajectories.png", device=device,
                                  seed=seed))
    return written


def _source(split: Split, index: int, x: torch.Tensor, mask: torch.Tensor, n_iter: int
            ) -> torch.Tensor:
    """The clip's source audio when the split carries it, else Griffin-Lim of its features."""
    from tsdsae.evaluate import listen

    if split.audio is not None:
        return split.audio[index]
    return listen(x[None], mask[None], n_iter)[0]
