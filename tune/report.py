"""The robustness report: per dataset x model x z_dim x optimiser, the median and spread over
seeds of the swap macro-F1 scores (and the local pitch metric where present), as a CSV, a
Markdown table and box plots laid out like the paper's benchmark figure.

    python -m tune.report --parent-run-id RUN_ID [--tracking-uri URI] [--out results/]
    python -m tune.report --csv results/trials.csv --out results/

Rows come from the MLflow child runs of a sweep (params: data.uri, schedule.variant, model.z_dim,
optim.amsgrad, seed; metrics: eval_pre_swap, eval_gswap, eval_lswap, ...) or from a CSV.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

GROUP = ["dataset", "model", "z_dim", "optimiser"]
SWAP_METRICS = ["pre_swap", "gswap", "lswap"]
PITCH_METRICS = ["rpa_recon", "rpa_gswap", "rpa_lswap"]
MODEL_ORDER = ["dsae", "dsae_freeze", "ts_dsae_wo_reg", "ts_dsae"]
MODEL_LABEL = {"dsae": "DSAE", "dsae_freeze": "DSAE-freeze", "ts_dsae_wo_reg": "TS-DSAE w/o reg",
               "ts_dsae": "TS-DSAE"}
COLOURS = {"dsae": "#d62728", "dsae_freeze": "#ff7f0e", "ts_dsae_wo_reg": "#9467bd",
           "ts_dsae": "#2ca02c"}


def metrics_in(rows: pd.DataFrame) -> list[str]:
    return [m for m in SWAP_METRICS + PITCH_METRICS if m in rows and rows[m].notna().any()]


def dataset_name(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1] or str(uri)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Median, quartiles, min, max and count over seeds, per dataset x model x z_dim x optimiser."""
    metrics = metrics_in(rows)
    agg = rows.groupby(GROUP)[metrics].agg(["median", lambda s: s.quantile(0.25),
                                            lambda s: s.quantile(0.75), "min", "max", "count"])
    agg.columns = [f"{m}_{stat}" for m in metrics
                   for stat in ("median", "q25", "q75", "min", "max", "n")]
    out = agg.reset_index()
    out["model"] = pd.Categorical(out["model"], [m for m in MODEL_ORDER if m in set(out["model"])]
                                  + sorted(set(out["model"]) - set(MODEL_ORDER)))
    return out.sort_values(GROUP).reset_index(drop=True)


def markdown_table(summary: pd.DataFrame) -> str:
    metrics = [c[:-len("_median")] for c in summary.columns if c.endswith("_median")]
    head = "| dataset | model | z_dim | optimiser | " + " | ".join(
        f"{m} median [min, max]" for m in metrics) + " | seeds |"
    lines = [head, "|" + "---|" * (5 + len(metrics))]
    for _, r in summary.iterrows():
        cells = [f"{r[f'{m}_median']:.3f} [{r[f'{m}_min']:.3f}, {r[f'{m}_max']:.3f}]"
                 for m in metrics]
        n = int(r[f"{metrics[0]}_n"]) if metrics else 0
        lines.append(f"| {r['dataset']} | {MODEL_LABEL.get(r['model'], r['model'])} | "
                     f"{r['z_dim']} | {r['optimiser']} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines) + "\n"


METRIC_LABEL = {"pre_swap": "pre-swap F1", "gswap": "global-swap F1", "lswap": "local-swap F1",
                "rpa_recon": "pitch acc. (recon)", "rpa_gswap": "pitch acc. (g-swap)",
                "rpa_lswap": "pitch acc. (l-swap)"}


def models_in(rows: pd.DataFrame) -> list[str]:
    present = set(rows["model"])
    return [m for m in MODEL_ORDER if m in present] + sorted(present - set(MODEL_ORDER))


def robustness_figure(rows: pd.DataFrame, dataset: str, optimiser: str, split: str | None = None):
    """The paper's benchmark figure for one dataset x optimiser: a grid of axes with one row per
    metric (pre_swap, gswap, lswap, then the pitch scores where present) and one column per z_dim;
    in each axes one coloured box per model over seeds, with every seed drawn as a point on top
    (so one seed is still visible), and a legend naming the models.

    Returns the matplotlib Figure (the caller saves and closes it). Raises ValueError when there
    are no rows for (dataset, optimiser).
    """
    sub = rows[(rows["dataset"] == dataset) & (rows["optimiser"] == optimiser)]
    if sub.empty:
        raise ValueError(f"no rows for dataset {dataset!r} with optimiser {optimiser!r}")
    metrics = metrics_in(sub)
    models = models_in(sub)
    z_dims = sorted(sub["z_dim"].unique())
    fig, axes = plt.subplots(len(metrics), len(z_dims), squeeze=False, sharey=True,
                             figsize=(0.9 + 0.75 * len(models) * len(z_dims) + 0.6,
                                      1.2 + 1.9 * len(metrics)))
    rng = np.random.default_rng(0)        # jitter of the seed points only
    for r, metric in enumerate(metrics):
        for c, z in enumerate(z_dims):
            ax = axes[r][c]
            for k, model in enumerate(models):
                vals = sub[(sub["model"] == model) & (sub["z_dim"] == z)][metric].dropna()
                if not len(vals):
                    continue
                colour = COLOURS.get(model, "#7f7f7f")
                bp = ax.boxplot([vals.values], positions=[k], widths=0.6, patch_artist=True,
                                manage_ticks=False, showfliers=False,
                                medianprops={"color": "black", "linewidth": 1.5})
                bp["boxes"][0].set_facecolor(colour)
                bp["boxes"][0].set_alpha(0.45)
                bp["boxes"][0].set_gid(f"box:{model}")
                jitter = rng.uniform(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(1)
                ax.scatter(k + jitter, vals.values, s=22, color=colour, edgecolor="black",
                           linewidth=0.5, zorder=3, gid=f"seeds:{model}")
            ax.set_xticks(range(len(models)), [MODEL_LABEL.get(m, m) for m in models],
                          rotation=30, ha="right", fontsize=8)
            if r < len(metrics) - 1:               # model names under the bottom row only
                ax.tick_params(labelbottom=False)
            ax.set_xlim(-0.6, len(models) - 0.4)
            ax.set_ylim(-0.05, 1.05)
            ax.grid(axis="y", alpha=0.3)
            if r == 0:
                ax.set_title(f"z_dim = {z}", fontsize=10)
            if c == 0:
                ax.set_ylabel(METRIC_LABEL.get(metric, metric), fontsize=9)
            ax.set_gid(f"{metric}|{z}")
    handles = [plt.Line2D([], [], marker="s", linestyle="", markersize=10,
                          color=COLOURS.get(m, "#7f7f7f"), alpha=0.7) for m in models]
    labels = [MODEL_LABEL.get(m, m) for m in models]
    # As many legend columns as fit the figure's width (about 0.075 in per character at
    # fontsize 9 plus the marker), so no entry is cut off at the right; more rows otherwise.
    entry = 0.45 + 0.075 * max(len(label) for label in labels)
    ncol = max(1, min(len(models), int(fig.get_figwidth() // entry)))
    legend_rows = -(-len(models) // ncol)
    fig.set_figheight(fig.get_figheight() + 0.25 * (legend_rows - 1))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, fontsize=9)
    n_seeds = int(sub.groupby(["model", "z_dim"]).size().max())
    fig.suptitle(f"{dataset} / {optimiser}: " + (f"{split} split, " if split else "")
                 + f"{n_seeds} seed{'s' if n_seeds != 1 else ''} per box", fontsize=11)
    fig.tight_layout(rect=(0, (0.3 + 0.25 * legend_rows) / fig.get_figheight(), 1, 1))
    return fig


def box_plots(rows: pd.DataFrame, out_dir: Path, split: str | None = None) -> list[Path]:
    """One PNG per dataset x optimiser (robustness_figure), named
    robustness-<dataset>-<optimiser>.png; returns the paths."""
    paths = []
    for dataset, opt in sorted(rows.groupby(["dataset", "optimiser"]).groups):
        fig = robustness_figure(rows, dataset, opt, split)
        path = Path(out_dir) / f"robustness-{_slug(dataset)}-{opt}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))


def scored_split(rows: pd.DataFrame) -> str | None:
    """The evaluation split the rows were scored on ("test", "val", ...), "mixed" if several,
    None when the rows do not say."""
    if "split" not in rows or rows["split"].isna().all():
        return None
    splits = sorted(set(rows["split"].dropna()))
    return splits[0] if len(splits) == 1 else "mixed (" + ", ".join(splits) + ")"


def write_report(rows: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """trials.csv (all rows), summary.csv, summary.md and one robustness-<dataset>-<optimiser>.png
    per dataset x optimiser in `out_dir`. Keys of the returned dict: trials_csv, summary_csv,
    summary_md and figure:<dataset>/<optimiser>. Raises ValueError when `rows` is empty."""
    if rows.empty:
        raise ValueError("no finished trials with evaluation metrics to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    split = scored_split(rows)
    paths = {"trials_csv": out / "trials.csv", "summary_csv": out / "summary.csv",
             "summary_md": out / "summary.md"}
    rows.sort_values(GROUP + ["seed"]).to_csv(paths["trials_csv"], index=False)
    summary.to_csv(paths["summary_csv"], index=False)
    scored = (f"Scored on the **{split}** split" if split else "Scored on the evaluation split")
    paths["summary_md"].write_text(
        "# Robustness of the global latent (macro-F1 over seeds)\n\n"
        f"{scored} (checkpoints chosen on val). pre_swap / gswap / lswap: LDA macro-F1 of the "
        "instrument read from v after reconstruction / global swap / local swap (1 = v alone "
        "sets the instrument; near 0 = the instrument follows z). rpa_*: CREPE raw pitch "
        "accuracy of the decoded audio against the input's (pitch must follow z).\n\n"
        + markdown_table(summary))
    for path in box_plots(rows, out, split):
        dataset, opt = path.stem[len("robustness-"):].rsplit("-", 1)
        paths[f"figure:{dataset}/{opt}"] = path
    return paths


def verdict(summary: pd.DataFrame) -> list[str]:
    """What the sweep shows, in words: one line per dataset x z_dim x optimiser, each model's
    median gswap / lswap and what they mean (METHOD s6: near 1 = v alone sets the instrument;
    near 0 = the instrument follows z, the global latent's collapse; near 1/2 with two
    instruments = chance). Example: "dmelodies, z_dim 32, adam: TS-DSAE keeps the instrument in
    v (gswap 1.00, lswap 1.00); DSAE does not: gswap 0.05, lswap 0.06 (collapse: the instrument
    follows z)"."""
    lines = []
    for (dataset, z, opt), cell in summary.groupby(["dataset", "z_dim", "optimiser"], observed=True):
        if "gswap_median" not in cell:
            continue
        parts = []
        for _, r in cell.sort_values("model").iterrows():
            g, loc = r["gswap_median"], r["lswap_median"]
            name = MODEL_LABEL.get(r["model"], r["model"])
            if g >= 0.9 and loc >= 0.9:
                parts.append(f"{name} keeps the instrument in v (gswap {g:.2f}, lswap {loc:.2f})")
                continue
            if max(g, loc) <= 0.25:
                why = "collapse: the instrument follows z"
            elif min(g, loc) >= 0.3 and max(g, loc) <= 0.7:
                why = "near chance: v does not carry the instrument"
            else:
                why = "partly"
            parts.append(f"{name} does not: gswap {g:.2f}, lswap {loc:.2f} ({why})")
        n = int(cell["gswap_n"].max())
        lines.append(f"{dataset}, z_dim {z}, {opt} ({n} seed{'s' if n != 1 else ''}): "
                     + "; ".join(parts))
    return lines


def rows_from_mlflow(parent_run_id: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per finished child run of a sweep's parent run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10_000)
    rows = []
    for run in runs:
        p, m = run.data.params, run.data.metrics
        if "eval_gswap" not in m:
            continue
        row = {"dataset": dataset_name(p.get("data.uri", "?")),
               "model": p.get("schedule.variant", "?"), "z_dim": int(p.get("model.z_dim", 0)),
               "optimiser": "amsgrad" if p.get("optim.amsgrad") == "True" else "adam",
               "seed": int(p.get("seed", 0)), "run_id": run.info.run_id,
               "split": p.get("eval.split") or p.get("data.eval_split"),
               "data_uri": p.get("data.uri"),
               "checkpoint": run.data.tags.get("tsdsae.best_checkpoint")}
        for metric in SWAP_METRICS + PITCH_METRICS:
            value = m.get(f"eval_{metric}")
            row[metric] = value if value is not None and not math.isnan(value) else None
        rows.append(row)
    return pd.DataFrame(rows)


def log_report(paths: dict[str, Path], parent_run_id: str, tracking_uri: str | None = None) -> None:
    """Log every report file to the sweep's parent run under report/ (and the page's WAVs under
    report/report_files/ when report.html is among them)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for path in paths.values():
        client.log_artifact(parent_run_id, str(path), artifact_path="report")
    files = Path(paths["summary_md"]).parent / "report_files"
    if "report_html" in paths and files.is_dir():
        client.log_artifacts(parent_run_id, str(files), artifact_path="report/report_files")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tune.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--parent-run-id", help="MLflow run id of the sweep's parent run")
    src.add_argument("--csv", help="a trials CSV (columns dataset, model, z_dim, optimiser, seed, ...)")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    args = p.parse_args(argv)
    if args.csv:
        rows = pd.read_csv(args.csv)
    else:
        from tsdsae.tracking import resolve_tracking_uri
        uri = resolve_tracking_uri(args.tracking_uri)
        rows = rows_from_mlflow(args.parent_run_id, uri)
    paths = write_report(rows, args.out)
    if args.parent_run_id and not args.no_log:
        log_report(paths, args.parent_run_id, uri)
    print(paths["summary_md"].read_text())
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
