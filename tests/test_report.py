import numpy as np
import pandas as pd
import pytest

import matplotlib.pyplot as plt
from matplotlib.collections import PathCollection
from matplotlib.patches import PathPatch

from tune.report import MODEL_LABEL, markdown_table, robustness_figure, summarise, write_report


def fake_rows(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for dataset in ("dmelodies", "urmp"):
        for model in ("dsae", "ts_dsae"):
            for z in (8, 32):
                for opt in ("adam", "amsgrad"):
                    for s in (831, 277, 736):
                        good = model == "ts_dsae"
                        rows.append({"dataset": dataset, "model": model, "z_dim": z, "optimiser": opt,
                                     "seed": s, "pre_swap": 0.95 + 0.05 * rng.random(),
                                     "gswap": (0.95 if good else 0.05) + 0.02 * rng.random(),
                                     "lswap": (0.97 if good else 0.06) + 0.02 * rng.random()})
    return pd.DataFrame(rows)


def test_summary_has_medians_over_seeds():
    rows = fake_rows()
    s = summarise(rows)
    assert len(s) == 2 * 2 * 2 * 2
    cell = s[(s.dataset == "dmelodies") & (s.model == "dsae") & (s.z_dim == 8) & (s.optimiser == "adam")]
    expect = rows[(rows.dataset == "dmelodies") & (rows.model == "dsae") & (rows.z_dim == 8)
                  & (rows.optimiser == "adam")]["gswap"].median()
    assert cell["gswap_median"].item() == pytest.approx(expect)
    assert (s["gswap_n"] == 3).all()
    md = markdown_table(s)
    assert "TS-DSAE" in md and md.count("\n") == len(s) + 2


def test_write_report_makes_csv_markdown_and_one_figure_per_dataset_and_optimiser(tmp_path):
    rows = fake_rows().assign(split="test")
    paths = write_report(rows, tmp_path / "r")
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    figures = sorted(k for k in paths if k.startswith("figure:"))
    assert figures == ["figure:dmelodies/adam", "figure:dmelodies/amsgrad", "figure:urmp/adam",
                       "figure:urmp/amsgrad"]
    assert paths["figure:urmp/adam"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(paths["trials_csv"])) == 48
    assert "Scored on the **test** split" in paths["summary_md"].read_text()
    with pytest.raises(ValueError, match="no finished trials"):
        write_report(pd.DataFrame(), tmp_path / "empty")


def _boxes_and_points(ax):
    boxes = [p for p in ax.patches if isinstance(p, PathPatch) and (p.get_gid() or "").startswith("box:")]
    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    return boxes, points


@pytest.mark.parametrize("seeds", [1, 6])
def test_figure_has_an_axes_per_metric_and_z_dim_with_a_box_and_seed_points_per_model(seeds):
    rows = fake_rows()
    rows = rows[rows.seed.isin([831, 277, 736][:seeds])] if seeds == 1 else pd.concat(
        [fake_rows(i).assign(seed=lambda d, i=i: d.seed + i) for i in range(2)])
    rows = rows.assign(rpa_gswap=0.7)                          # a pitch score adds a row of axes
    fig = robustness_figure(rows, "dmelodies", "adam", split="test")
    try:
        metrics = ["pre_swap", "gswap", "lswap", "rpa_gswap"]
        assert sorted(ax.get_gid() for ax in fig.axes) == sorted(
            f"{m}|{z}" for m in metrics for z in (8, 32))
        n_seeds = 1 if seeds == 1 else 6
        for ax in fig.axes:
            boxes, points = _boxes_and_points(ax)
            assert sorted(b.get_gid() for b in boxes) == ["box:dsae", "box:ts_dsae"]
            assert sorted(c.get_gid() for c in points) == ["seeds:dsae", "seeds:ts_dsae"]
            assert all(len(c.get_offsets()) == n_seeds for c in points)
            metric, z = ax.get_gid().split("|")
            truth = rows[(rows.dataset == "dmelodies") & (rows.optimiser == "adam")
                         & (rows.model == "ts_dsae") & (rows.z_dim == int(z))][metric]
            ts_points = next(c for c in points if c.get_gid() == "seeds:ts_dsae")
            assert sorted(ts_points.get_offsets()[:, 1]) == pytest.approx(sorted(truth))
        legend = fig.legends[0]
        assert [t.get_text() for t in legend.get_texts()] == [MODEL_LABEL["dsae"], MODEL_LABEL["ts_dsae"]]
        assert "test split" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_legend_of_four_models_at_one_z_dim_fits_inside_the_saved_figure(tmp_path):
    # The quick grid's figure: 4 models, one z_dim; every legend entry lies inside the canvas.
    rows = pd.concat([fake_rows().query("z_dim == 32 and dataset == 'dmelodies'")
                      .assign(model=m) for m in ("dsae", "dsae_freeze", "ts_dsae_wo_reg",
                                                 "ts_dsae")])
    fig = robustness_figure(rows, "dmelodies", "adam", split="test")
    try:
        fig.savefig(tmp_path / "f.png", dpi=100)
        renderer = fig.canvas.get_renderer()
        canvas = fig.bbox
        texts = fig.legends[0].get_texts()
        assert len(texts) == 4
        for text in texts:
            box = text.get_window_extent(renderer)
            assert canvas.x0 <= box.x0 and box.x1 <= canvas.x1, text.get_text()
            assert canvas.y0 <= box.y0 and box.y1 <= canvas.y1, text.get_text()
        for ax in fig.axes:                      # the legend does not cover the x tick labels
            for label in ax.get_xticklabels():
                if label.get_visible() and label.get_text():
                    legend_top = max(t.get_window_extent(renderer).y1 for t in texts)
                    assert label.get_window_extent(renderer).y0 > legend_top
    finally:
        plt.close(fig)
