"""The two-stage schedule (METHOD s4) as a pure function of the epoch.

    model            stage 1 (epochs 0 .. C-1)          stage 2 (epoch >= C)
    dsae             - (one stage: all train from epoch 0, p(v) = N(0, I))
    dsae_freeze      local frozen (random init)          local train, global frozen, p(v) = N(0, I)
    ts_dsae_wo_reg   local frozen                        all train, informed prior
    ts_dsae          local frozen                        all train, informed prior, 4 swap terms
In stage 1 the frozen local modules still run and feed the decoder. The decoder always trains.
"""
from __future__ import annotations

import dataclasses

from tsdsae.config import VARIANTS


@dataclasses.dataclass(frozen=True)
class StagePlan:
    stage: int                      # 1 or 2 (DSAE has only stage 1)
    trainable: frozenset[str]       # subset of {"global", "local", "decoder"}
    informed_prior: bool            # KL_v against q_snapshot(v | x) instead of N(0, I)
    swaps: bool                     # add the four swap KL terms
    last_stage: bool                # no later stage follows (early stopping counts here)


def stage_of(variant: str, epoch: int, switch_epoch: int) -> int:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    if variant == "dsae":
        return 1
    return 1 if epoch < switch_epoch else 2


def plan(variant: str, epoch: int, switch_epoch: int) -> StagePlan:
    stage = stage_of(variant, epoch, switch_epoch)
    everything = frozenset({"global", "local", "decoder"})
    if variant == "dsae":
        return StagePlan(1, everything, False, False, True)
    if stage == 1:
        return StagePlan(1, frozenset({"global", "decoder"}), False, False, False)
    if variant == "dsae_freeze":
        return StagePlan(2, frozenset({"local", "decoder"}), False, False, True)
    return StagePlan(2, everything, True, variant == "ts_dsae", True)


def num_stages(variant: str) -> int:
    return 1 if variant == "dsae" else 2


def stage_epochs(variant: str, stage: int, switch_epoch: int, max_epochs: int) -> range:
    """The epochs of one stage: what one Ray Train job per stage runs."""
    if variant == "dsae" or stage == 2:
        start = 0 if variant == "dsae" else switch_epoch
        return range(start, max_epochs)
    return range(0, min(switch_epoch, max_epochs))


def takes_snapshot(variant: str) -> bool:
    """Whether the switch snapshots the global encoder as the informed prior."""
    return variant in ("ts_dsae_wo_reg", "ts_dsae")
