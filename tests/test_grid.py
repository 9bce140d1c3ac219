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


@pytest.mark.parametrize("name", ["paper", "architecture", "capacity", "smoke", "quick",
                                  "fidelity-cpu"])
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


def test_quick_grid_is_the_four_models_in_two_trials_and_narrows():
    g = load_grid("quick")
    assert g.axes["schedule.variant"] == ["dsae", "dsae_freeze", "ts_dsae_wo_reg", "ts_dsae"]
    assert g.axes["model.z_dim"] == [32] and g.axes["optim.amsgrad"] == [False]
    assert g.fixed["schedule.switch_epoch"] < g.fixed["schedule.max_epochs"]
    groups = trial_groups(g, ["data/dmelodies"])
    assert sorted(len(gr.variants) for gr in groups) == [1, 3]
    only_ts = narrow(g, parse_only(["schedule.variant=ts_dsae,dsae"]))
    assert sorted(gr.variants for gr in trial_groups(only_ts)) == [("dsae",), ("ts_dsae",)]
    with pytest.raises(ValueError, match="model.z_dim"):
        narrow(g, {"model.z_dim": [16]})
    fidelity = load_grid("fidelity-cpu")
    assert fidelity.size() == 4 * 2 * 2
    assert {k: fidelity.fixed[k] for k in ("schedule.switch_epoch", "schedule.max_epochs")} == {
        k: g.fixed[k] for k in ("schedule.switch_epoch", "schedule.max_epochs")}


@pytest.mark.parametrize("size", [1, 3, 16, 48])
def test_packed_trials_bundle_runs_of_one_dataset_within_the_pack_size(size):
    """The paper's 288 runs as packed trials (tune.jobs.bundles): every trial group once; a
    bundle holds one dataset (a trainer's runs read one dataset) but mixes seeds, optimisers
    and architectures; neither stage's jobs exceed `size` runs."""
    from tune.jobs import bundles

    datasets = ["data/dmelodies", "data/urmp"]
    groups = trial_groups(load_grid("paper"), datasets)
    trials = bundles(groups, size)
    keys = [g["key"] for b in trials for g in b["groups"]]
    assert sorted(keys) == sorted(g.key for g in groups)
    assert len({b["key"] for b in trials}) == len(trials)
    for b in trials:
        first = len(b["groups"])
        second = sum(len(g["variants"]) for g in b["groups"] if len(g["variants"]) > 1)
        assert first <= size and (second <= size or first == 1)
        assert len({g["overrides"]["data.uri"] for g in b["groups"]}) == 1
    if size == 1:
        assert len(trials) == len(groups) == 144
    if size == 48:      # per dataset 72 groups: 36 shared ones of 3 variants each fill
        assert len(trials) == 2 * 3     # 3 stage 2s of 48 (with the DSAE groups beside them)


def test_a_trials_jobs_train_each_stage_1_before_any_stage_2_in_packs(tmp_path):
    """tune.jobs.plan_runs / plan_jobs: a shared group is a stage-1 run and one run per variant
    starting from its folder; packed, every stage-1 job comes before every stage-2 job and no
    job holds more than the pack size."""
    from tune.jobs import SweepSettings, bundles, plan_jobs, plan_runs

    groups = trial_groups(load_grid("smoke"), [str(tmp_path / "data")])
    sweep = SweepSettings(name="s", preset="debug", checkpoint_root=str(tmp_path / "runs"),
                          tracking_uri="", experiment="e")
    (trial,) = bundles(groups, 8)
    runs = plan_runs(sweep, trial)
    shared = [r for r in runs if r.role == "shared_stage_1"]
    assert len(shared) == len([g for g in groups if len(g.variants) > 1])
    for run in runs:
        if run.role == "trial" and run.variant != "dsae":
            assert run.start is not None and [j.stage for j in run.jobs] == [2]
    jobs = plan_jobs(runs, 4)
    stages = [j.stage for j in jobs]
    assert stages == sorted(stages) and max(len(j.members) for j in jobs) <= 4
    assert sum(len(j.members) for j in jobs) == sum(len(r.jobs) for r in runs)
    assert [len(j.members) for j in plan_jobs(runs, 1)] == [1] * sum(len(r.jobs) for r in runs)
