"""The sweep's report page: `report.html`, one self-contained file to open first.

It holds the robustness figure(s), the summary table, what the sweep shows in words, and, for each
model (and z_dim), one example pair of clips of different instruments as audio players with their
log-mel spectrograms: input A, input B, the reconstruction of A, the global swap decode(z_A, v_B)
("melody of A, instrument of B") and the local swap decode(z_B, v_A) ("melody of B, instrument of
A"). Every model hears the same pair, taken from the scored split.

Images and sounds are embedded as data: URIs, so the page needs no network, no JavaScript and no
sibling files (MLflow previews it as an artifact of the sweep's parent run). The WAV files are also
written to `report_files/` beside it for download.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import pandas as pd

from tsdsae.run_report import (STYLE, data_uri, example_pair, input_sounds, load_split,
                                model_sounds, sound_rows)

def _table_html(summary: pd.DataFrame) -> str:
    from tune.report import MODEL_LABEL

    metrics = [c[:-len("_median")] for c in summary.columns if c.endswith("_median")]
    head = "".join(f"<th>{html.escape(m)}<br><small>median [min, max]</small></th>" for m in metrics)
    rows = []
    for _, r in summary.iterrows():
        cells = "".join(f"<td>{r[f'{m}_median']:.3f} <small>[{r[f'{m}_min']:.3f}, "
                        f"{r[f'{m}_max']:.3f}]</small></td>" for m in metrics)
        n = int(r[f"{metrics[0]}_n"]) if metrics else 0
        rows.append(f"<tr><td>{html.escape(str(r['dataset']))}</td>"
                    f"<td>{html.escape(MODEL_LABEL.get(r['model'], str(r['model'])))}</td>"
                    f"<td>{r['z_dim']}</td><td>{html.escape(str(r['optimiser']))}</td>{cells}"
                    f"<td>{n}</td></tr>")
    return ("<table class='summary'><tr><th>dataset</th><th>model</th><th>z_dim</th>"
            f"<th>optimiser</th>{head}<th>seeds</th></tr>" + "".join(rows) + "</table>")


def dataset_section(rows: pd.DataFrame, split, split_name: str, heading: str,
                    files: Path, endpoint_url: str | None = None, seed: int = 0) -> str:
    """HTML of one dataset: the example pair's inputs, then one pair table per (model, z_dim)
    (the first optimiser and seed of that cell that has a checkpoint). WAVs go to `files`."""
    from tsdsae import inference
    from tune.report import MODEL_LABEL, models_in

    a, b = example_pair(split, seed)
    names = (split.instruments[int(split.instrument[a])], split.instruments[int(split.instrument[b])])
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in heading)
    inputs = input_sounds(split, a, b, names, f"{slug}_")
    parts = [f"<h2>{html.escape(heading)}: the same pair through every model</h2>",
             sound_rows(inputs)]
    with_ckpt = rows.dropna(subset=["checkpoint"]) if "checkpoint" in rows else rows.iloc[:0]
    for model in models_in(with_ckpt) if len(with_ckpt) else []:
        for z in sorted(with_ckpt[with_ckpt["model"] == model]["z_dim"].unique()):
            run = with_ckpt[(with_ckpt["model"] == model) & (with_ckpt["z_dim"] == z)].sort_values(
                ["optimiser", "seed"]).iloc[0]
            prefix = f"{slug}_{model}-z{z}-{run['optimiser']}-s{run['seed']}_"
            trained = inference.load(str(run["checkpoint"]), endpoint_url=endpoint_url)
            sounds = model_sounds(trained, split, a, b, names, prefix)
            parts.append(
                f"<h3>{html.escape(MODEL_LABEL.get(model, model))}, z_dim {z} "
                f"<small>({html.escape(str(run['optimiser']))}, seed {run['seed']})</small></h3>"
                + sound_rows(sounds))
            inputs += sounds
    if len(parts) == 2:
        parts.append("<p>No checkpoints were found for these runs.</p>")
    for s in inputs:
        (files / s.file).write_bytes(s.wav)
    return "\n".join(parts)


def write_report_page(rows: pd.DataFrame, summary: pd.DataFrame, figures: Sequence[Path],
                      out_dir: str | Path, split_name: str, title: str,
                      verdict_lines: Sequence[str], endpoint_url: str | None = None,
                      seed: int = 0) -> Path:
    """Write `out_dir/report.html` (and the WAVs in `out_dir/report_files/`); returns its path.

    rows: one row per run (columns dataset, data_uri, model, z_dim, optimiser, seed, checkpoint);
    per dataset, the first optimiser and seed of each (model, z_dim) with a checkpoint gets a
    pair table. The pair comes from the scored split `split_name` of each dataset (inputs are
    the stored recordings, or Griffin-Lim of the features where the dataset has no audio).
    """
    out = Path(out_dir)
    files = out / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    sections = []
    uris = rows["data_uri"].dropna().unique() if "data_uri" in rows else []
    for uri in uris:
        sub = rows[rows["data_uri"] == uri]
        ckpts = sub["checkpoint"].dropna() if "checkpoint" in sub else []
        split = load_split(uri, split_name, endpoint_url, ckpts.iloc[0] if len(ckpts) else None)
        sections.append(dataset_section(sub, split, split_name, str(sub["dataset"].iloc[0]),
                                        files, endpoint_url, seed))
    figs = "".join(f"<p><img class='figure' alt='robustness figure {html.escape(p.stem)}' "
                   f"src='{data_uri(Path(p).read_bytes(), 'image/png')}'></p>" for p in figures)
    verdict = "".join(f"<li>{html.escape(line)}</li>" for line in verdict_lines)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="verdict"><p>What this sweep shows (scored on the <b>{html.escape(split_name)}</b> split;
checkpoints chosen on val):</p><ul>{verdict}</ul></div>
<h2>Listen</h2>
<p>A global swap keeps A's melody (the local latent z) and takes B's instrument (the global latent
v). If v holds the instrument, the global swap sounds like B's instrument playing A's melody and the
local swap like A's instrument playing B's melody. Inputs are the {html.escape(split_name)}-split
recordings; model outputs are decoded log-mels heard through Griffin-Lim.</p>
{''.join(sections) or '<p>No runs to listen to.</p>'}
<h2>Robustness over seeds</h2>
<p>pre_swap / gswap / lswap: macro-F1 of the instrument read from v (LDA) after reconstruction,
global swap and local swap. 1: v alone sets the instrument. Near 0: the instrument follows z (the
global latent collapsed). rpa_*: CREPE raw pitch accuracy against the input (pitch must follow
z).</p>
{figs}
{_table_html(summary)}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
