import pytest

from tune.grid import load_grid, narrow, parse_only, points, trial_groups


def test_paper_grid_is_the_papers_288_runs_with_shared_stage_one():
    g = load_grid("paper")
    assert g.size() == 144
    pts = points(g, ["data/dmelodies", "data/urmp"])
    assert len(pts) == 288
    groups = trial_groups(g, ["data/dmelodies", "data/urmp"])
    # per (z_dim, amsgrad, seed, dataset): one DSAE trial and one shared-stage-1 trial
    assert len(groups) == 2 * 3 * 2 * 6 * 2
    shared = [gr for gr in groups if len(gr.variants) == 3]
    assert len(shared) == 72
    assert all(set(gr.variants) == {"dsae_freeze", "ts_dsae_wo_reg", "ts_dsae"} for gr in shared)
    assert sum(len(gr.variants) for gr in groups) == 288
    assert all("schedule.variant" not in gr.overrides for gr in groups)


def test_unshared_groups_are_one_variant_each():
    groups = trial_groups(load_grid("smoke"), share_stage_1=False)
    assert sorted(len(g.variants) for g in groups) == [1, 1, 1, 1]


@pytest.mark.parametrize("name", ["paper", "architecture", "capacity", "smoke"])
def test_shipped_grids_load_and_validate(name):
    g = load_grid(name)
    assert g.size() >= 4 and points(g)


def test_narrowing_and_bad_keys(tmp_path):
    g = narrow(load_grid("paper"), parse_only(["model.z_dim=8,32", "seed=831",
                                                "schedule.variant=ts_dsae"]))
    assert g.axes["model.z_dim"] == [8, 32] and g.axes["seed"] == [831]
    assert len(trial_groups(g)) == 2 * 2     # z_dim x amsgrad
    with pytest.raises(ValueError, match="model.z_dim"):
        narrow(load_grid("paper"), {"model.z_dim": [64]})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\naxes:\n  model.z_dimm: [8]\n")
    with pytest.raises(ValueError, match="bad.yaml.*model.z_dimm"):
        load_grid(str(bad))
    bad.write_text("name: bad\naxes:\n  model.z_prior: [lstm]\n")
    with pytest.raises(ValueError, match="model.z_prior"):
        load_grid(str(bad))
    with pytest.raises(ValueError, match="not found"):
        load_grid("nope")
