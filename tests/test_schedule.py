"""The two-stage schedule (METHOD s4), per variant and stage: the plan, and what a training step
under it does to a model (which groups move, the prior on v, the swap terms)."""
import pytest
import torch

from tsdsae import schedule
from tsdsae.config import ModelConfig
from tsdsae.model import DSAE
from tsdsae.train_step import build_optimizer, train_step

SWITCH = 3
ALL = {"global", "local", "decoder"}
# variant, stage -> (groups that train, informed prior, swap terms)   (METHOD s4's table)
EXPECTED = {
    ("dsae", 1): (ALL, False, False),
    ("dsae_freeze", 1): ({"global", "decoder"}, False, False),
    ("dsae_freeze", 2): ({"local", "decoder"}, False, False),
    ("ts_dsae_wo_reg", 1): ({"global", "decoder"}, False, False),
    ("ts_dsae_wo_reg", 2): (ALL, True, False),
    ("ts_dsae", 1): ({"global", "decoder"}, False, False),
    ("ts_dsae", 2): (ALL, True, True),
}
SWAP_TERMS = {"gswap_v", "gswap_z", "lswap_v", "lswap_z"}


def _epoch(variant: str, stage: int) -> int:
    return SWITCH + 1 if stage == 2 else SWITCH - 1


@pytest.mark.parametrize("variant, stage", sorted(EXPECTED), ids=lambda p: str(p))
def test_a_step_under_each_plan_trains_the_planned_groups_with_the_planned_loss(variant, stage):
    trains, informed, swaps = EXPECTED[variant, stage]
    p = schedule.plan(variant, _epoch(variant, stage), SWITCH)
    assert (p.stage, set(p.trainable), p.informed_prior, p.swaps) == (stage, trains, informed,
                                                                      swaps)
    assert "decoder" in p.trainable
    assert p.last_stage == (stage == schedule.num_stages(variant))
    assert schedule.takes_snapshot(variant) == (variant in ("ts_dsae_wo_reg", "ts_dsae"))

    torch.manual_seed(0)
    model = DSAE(ModelConfig(input_dim=4, z_dim=3, v_dim=2, encoder_hidden=(5,),
                             transition_hidden=(6,), decoder_hidden=(7,)))
    if stage == 2 and schedule.takes_snapshot(variant):
        model.take_snapshot()
    model.set_trainable(set(p.trainable))
    before = {g: [t.detach().clone() for t in model.group_parameters(g)] for g in ALL}
    opt = build_optimizer(model, 1e-2)
    x, mask = torch.randn(4, 6, 4), torch.ones(4, 6, dtype=torch.bool)
    terms = train_step(model, opt, x, mask, p)
    for group in ALL:
        after = model.group_parameters(group)
        moved = [not torch.equal(a, b) for a, b in zip(before[group], after)]
        assert all(moved) if group in trains else not any(moved), (group, moved)
    assert SWAP_TERMS <= terms.keys() if swaps else not SWAP_TERMS & terms.keys()
    # the informed prior is the global encoder as it was at the switch: before any update it
    # equals q(v | x) on the same input, so KL_v is 0; against N(0, I) it is not
    assert (terms["kl_v"].item() == 0.0) == informed


def test_stage_epochs_cover_the_run_once():
    for variant in ("dsae", "dsae_freeze", "ts_dsae_wo_reg", "ts_dsae"):
        epochs = [e for s in range(1, schedule.num_stages(variant) + 1)
                  for e in schedule.stage_epochs(variant, s, SWITCH, 8)]
        assert epochs == list(range(8)), variant
        for e in epochs:
            assert schedule.stage_of(variant, e, SWITCH) == (1 if variant == "dsae" or e < SWITCH
                                                             else 2)
    with pytest.raises(ValueError, match="unknown variant"):
        schedule.plan("vae", 0, SWITCH)
