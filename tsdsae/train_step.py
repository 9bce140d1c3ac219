"""One optimisation step, pure torch on any device. Used as-is by tsdsae.trainer on one process
and on Ray Train workers (where `model` is the DDP wrapper and `core` the raw DSAE).

No host-device synchronisation happens inside a step: the returned terms are detached device
tensors that the caller accumulates and reads once per epoch.
"""
from __future__ import annotations

import ctypes
import functools
import sys
from typing import Callable

import torch
from torch import nn
from torch.distributions import Normal

from tsdsae.losses import elbo_terms, masked_kl_mean, swap_terms, total_loss
from tsdsae.model.dsae import DSAE
from tsdsae.schedule import StagePlan

MaskedKL = Callable[..., torch.Tensor]


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (CPU training).

    A step allocates and frees ~150 MB of activations. With glibc's defaults the large blocks are
    mmap'd and unmapped every step, so each step page-faults ~38,000 fresh zeroed pages (about a
    quarter of a 2-core step's time). Serving everything from the heap and never trimming it
    cuts that to ~1,000. Process-wide and idempotent; a no-op where glibc's mallopt is missing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    ok = libc.mallopt(m_mmap_max, 0) == 1
    ok = libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and ok
    return ok


def loss_terms(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, plan: StagePlan,
               swap_weights=(1.0, 1.0, 1.0, 1.0), v_prior: Normal | None = None,
               core: DSAE | None = None, masked_kl: MaskedKL = masked_kl_mean
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward pass and the loss of this stage: returns (loss, named terms).

    x (B, T, F), mask (B, T). `model` runs the pass: the DSAE (built from the plain or the
    CPU blocks) or a DDP wrapper of it; `core` is the DSAE (default: `model` itself);
    `masked_kl` the KL_z averaging (METHOD s3) to use (tsdsae.model.fast_cpu.TrainingPass
    says which goes with a device). With swaps, two independent permutations of the batch are drawn
    (METHOD s4). `v_prior` is the informed prior for this batch when the caller has it cached;
    otherwise, when the stage needs it, the frozen snapshot is evaluated here.
    """
    core = core if core is not None else model
    perms = None
    if plan.swaps:
        perms = (torch.randperm(x.shape[0], device=x.device),
                 torch.randperm(x.shape[0], device=x.device))
    out = model(x, mask, swap_perms=perms)
    if plan.informed_prior and v_prior is None:
        v_prior = core.informed_prior(x, mask)
    terms = elbo_terms(x, mask, out, v_prior if plan.informed_prior else None, masked_kl)
    if plan.swaps:
        terms.update(swap_terms(out, mask, perms, masked_kl))
    loss = total_loss(terms, swap_weights)
    terms["loss"] = loss
    return loss, terms


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               mask: torch.Tensor, plan: StagePlan, swap_weights=(1.0, 1.0, 1.0, 1.0),
               v_prior: Normal | None = None, core: DSAE | None = None,
               masked_kl: MaskedKL = masked_kl_mean) -> dict[str, torch.Tensor]:
    """forward, loss, backward, optimiser step. Returns detached terms (device tensors)."""
    optimizer.zero_grad(set_to_none=True)
    loss, terms = loss_terms(model, x, mask, plan, swap_weights, v_prior, core, masked_kl)
    loss.backward()
    optimizer.step()
    return {k: v.detach() for k, v in terms.items()}


@torch.no_grad()
def eval_step(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, plan: StagePlan,
              swap_weights=(1.0, 1.0, 1.0, 1.0), v_prior: Normal | None = None,
              core: DSAE | None = None, masked_kl: MaskedKL = masked_kl_mean
              ) -> dict[str, torch.Tensor]:
    """The same loss without gradients (validation samples too, as in training)."""
    _, terms = loss_terms(model, x, mask, plan, swap_weights, v_prior, core, masked_kl)
    return {k: v.detach() for k, v in terms.items()}


def build_optimizer(model: DSAE, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 0.0, amsgrad: bool = False) -> torch.optim.Adam:
    """Adam over every model parameter in a fixed order. Frozen groups have no gradient, so Adam
    skips them and keeps their moments; this keeps one optimiser state across the stage switch."""
    return torch.optim.Adam(list(model.parameters()), lr=lr, betas=betas, eps=eps,
                            weight_decay=weight_decay, amsgrad=amsgrad)
