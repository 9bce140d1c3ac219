import pytest

from tsdsae.config import (ModelConfig, RunConfig, apply_overrides, debug, from_flat, paper,
                           to_flat)


def test_paper_preset_is_the_paper():
    cfg = paper()
    assert cfg.model.z_dim == 32 and cfg.model.v_dim == 16
    assert cfg.model.encoder_hidden == (64, 64) and cfg.model.transition_hidden == (32, 32)
    assert (cfg.model.z_feature, cfg.model.v_posterior, cfg.model.z_posterior,
            cfg.model.z_prior, cfg.model.likelihood) == ("^", "^", "x", ">>", "^")
    assert cfg.optim.lr == 1e-3 and cfg.optim.batch_size == 128 and not cfg.optim.amsgrad
    assert (cfg.schedule.switch_epoch, cfg.schedule.max_epochs, cfg.schedule.patience) == (300, 4000, 300)


def test_overrides_parse_types_and_round_trip():
    cfg = apply_overrides(debug(), ["optim.lr=3e-4", "model.z_dim=16", "optim.amsgrad=true",
                                    "model.encoder_hidden=32,16", "schedule.variant=dsae"])
    assert cfg.optim.lr == 3e-4 and cfg.model.z_dim == 16 and cfg.optim.amsgrad is True
    assert cfg.model.encoder_hidden == (32, 16) and cfg.schedule.variant == "dsae"
    assert from_flat(to_flat(cfg)) == cfg
    # Tune / YAML values arrive typed, not as strings
    assert apply_overrides(cfg, {"model.z_dim": 8, "optim.amsgrad": False}).model.z_dim == 8


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1", ["optim.lrr", "lr"]),
    ("bogus=1", ["bogus"]),
    ("model.z_dim=0", ["model.z_dim", "> 0"]),
    ("model.z_dim=-3", ["model.z_dim"]),
    ("model.z_dim=abc", ["model.z_dim", "int"]),
    ("model.z_dim=2.5", ["model.z_dim"]),
    ("model.z_prior=lstm", ["model.z_prior", ">>"]),
    ("model.z_feature=?", ["model.z_feature", "><"]),
    ("schedule.variant=tsdsae", ["schedule.variant", "ts_dsae"]),
    ("schedule.switch_epoch=5000", ["schedule.switch_epoch", "max_epochs"]),
    ("optim.batch_size=-1", ["optim.batch_size"]),
    ("optim.amsgrad=maybe", ["optim.amsgrad"]),
    ("model.encoder_hidden=64,-1", ["model.encoder_hidden"]),
    ("model=1", ["section"]),
    ("nokeyvalue", ["key=value"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ValueError) as err:
        apply_overrides(paper(), [override])
    for w in words:
        assert w in str(err.value)


def test_direct_construction_validates():
    with pytest.raises(ValueError, match="model.z_posterior"):
        ModelConfig(z_posterior="rnn")
    with pytest.raises(ValueError, match="device"):
        RunConfig(device="tpu")


def test_keys_checked_together_can_change_together():
    cfg = apply_overrides(paper(), {"schedule.switch_epoch": 5000, "schedule.max_epochs": 9000})
    assert (cfg.schedule.switch_epoch, cfg.schedule.max_epochs) == (5000, 9000)
    assert from_flat(to_flat(cfg)) == cfg


def test_evaluation_settings_are_their_own_section_and_default_to_test():
    cfg = paper()
    assert (cfg.eval.split, cfg.eval.pitch, cfg.eval.crepe_model, cfg.eval.pitch_clips) == (
        "test", True, "full", 32)
    # independent of tracking: switching tracking off leaves the evaluation as it is
    off = apply_overrides(cfg, ["tracking.enabled=false"])
    assert off.eval == cfg.eval
    flat = to_flat(cfg)
    assert flat["eval.split"] == "test" and "data.eval_split" not in flat
    assert not any(k.startswith("tracking.") and "pitch" in k for k in flat)
    assert apply_overrides(cfg, ["eval.split=val"]).eval.split == "val"
    with pytest.raises(ValueError, match="eval.split='dev'.*test"):
        apply_overrides(cfg, ["eval.split=dev"])
    with pytest.raises(ValueError, match="eval.crepe_model"):
        apply_overrides(cfg, ["eval.crepe_model=huge"])
    for old, new in (("data.eval_split", "eval.split"), ("tracking.pitch", "eval.pitch")):
        with pytest.raises(ValueError, match=f"'{old}' is now '{new}'"):
            apply_overrides(cfg, [f"{old}=val"])
    # a configuration stored under the old names (an older checkpoint) still loads
    stored = {k: v for k, v in to_flat(cfg).items() if not k.startswith("eval.")}
    stored.update({"data.eval_split": "val", "tracking.pitch": False,
                   "tracking.crepe_model": "tiny", "tracking.pitch_clips": 4})
    loaded = from_flat(stored)
    assert loaded.eval == type(cfg.eval)(split="val", pitch=False, crepe_model="tiny",
                                         pitch_clips=4)
