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


def box_plots(rows: pd.DataFrame, path: Path) -> Path:
    """One row of panels per dataset x optimiser, one panel per metric; within a panel, groups by
    z_dim with one box per model (like the paper's benchmark figure)."""
    metrics = metrics_in(rows)
    facets = sorted(rows.groupby(["dataset", "optimiser"]).groups)
    models = [m for m in MODEL_ORDER if m in set(rows["model"])] + sorted(
        set(rows["model"]) - set(MODEL_ORDER))
    z_dims = sorted(rows["z_dim"].unique())
    fig, axes = plt.subplots(len(facets), len(metrics), squeeze=False,
                             figsize=(4.2 * len(metrics), 3.2 * len(facets)))
    width = 0.8 / max(len(models), 1)
    for r, (dataset, opt) in enumerate(facets):
        sub = rows[(rows["dataset"] == dataset) & (rows["optimiser"] == opt)]
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            for k, model in enumerate(models):
                data, pos = [], []
                for i, z in enumerate(z_dims):
                    vals = sub[(sub["model"] == model) & (sub["z_dim"] == z)][metric].dropna()
                    if len(vals):
                        data.append(vals.values)
                        pos.append(i + (k - (len(models) - 1) / 2) * width)
                if data:
                    bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True,
                                    manage_ticks=False)
                    for patch in bp["boxes"]:
                        patch.set_facecolor(COLOURS.get(model, "#7f7f7f"))
                        patch.set_alpha(0.75)
            ax.set_xticks(range(len(z_dims)), [f"z={z}" for z in z_dims])
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{dataset} / {opt}: {metric}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS.get(m, "#7f7f7f"), alpha=0.75)
               for m in models]
    fig.legend(handles, [MODEL_LABEL.get(m, m) for m in models], loc="lower center",
               ncol=len(models), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """trials.csv (all rows), summary.csv, summary.md and robustness.png in `out_dir`."""
    if rows.empty:
        raise ValueError("no finished trials with evaluation metrics to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    paths = {"trials_csv": out / "trials.csv", "summary_csv": out / "summary.csv",
             "summary_md": out / "summary.md", "box_plots": out / "robustness.png"}
    rows.sort_values(GROUP + ["seed"]).to_csv(paths["trials_csv"], index=False)
    summary.to_csv(paths["summary_csv"], index=False)
    paths["summary_md"].write_text("# Robustness of the global latent (macro-F1 over seeds)\n\n"
                                   + markdown_table(summary))
    box_plots(rows, paths["box_plots"])
    return paths


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
               "seed": int(p.get("seed", 0)), "run_id": run.info.run_id}
        for metric in SWAP_METRICS + PITCH_METRICS:
            value = m.get(f"eval_{metric}")
            row[metric] = value if value is not None and not math.isnan(value) else None
        rows.append(row)
    return pd.DataFrame(rows)


def log_report(paths: dict[str, Path], parent_run_id: str, tracking_uri: str | None = None) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for path in paths.values():
        client.log_artifact(parent_run_id, str(path), artifact_path="report")


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
