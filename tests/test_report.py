import numpy as np
import pandas as pd
import pytest

from tune.report import markdown_table, summarise, write_report


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


def test_write_report_makes_csv_markdown_and_png(tmp_path):
    paths = write_report(fake_rows(), tmp_path / "r")
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    assert paths["box_plots"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(paths["trials_csv"])) == 48
    with pytest.raises(ValueError, match="no finished trials"):
        write_report(pd.DataFrame(), tmp_path / "empty")
