"""p(z_t | z_<t): the local prior.

    'x'   p(z_t) = N(0, I)
    '>'   p(z_t | z_t-1) = N(mu(h_t-1), diag exp(logvar(h_t-1))),  h = MLP(z)    (transition sizes)
    '>>'  p(z_t | z_<t)  = N(mu(h_t-1), diag exp(logvar(h_t-1))),  h = LSTM(z)   [default]
and always p(z_1) = N(0, I). The network runs over the posterior samples z_1:T-1 at once; its
outputs are shifted by one step. z (B, T, Z) -> DiagNormal (B, T, Z).
"""
from __future__ import annotations

import torch
from torch import nn

from tsdsae.config import ModelConfig
from tsdsae.model.layers import PLAIN, Blocks, DiagNormal, normal


class ZPrior(nn.Module):
    def __init__(self, cfg: ModelConfig, blocks: Blocks = PLAIN):
        super().__init__()
        self.kind = cfg.z_prior
        sizes = cfg.transition_hidden
        if self.kind == ">":
            self.transition = blocks.mlp(cfg.z_dim, sizes)
        elif self.kind == ">>":
            self.transition = nn.LSTM(cfg.z_dim, sizes[0], num_layers=len(sizes), batch_first=True)
        if self.kind != "x":
            self.head = blocks.head(sizes[-1] if self.kind == ">" else sizes[0], cfg.z_dim)

    def forward(self, z: torch.Tensor) -> DiagNormal:
        """p(z_t | z_<t) for t = 1..T: (B, T, Z)."""
        if self.kind == "x":
            zeros = torch.zeros_like(z)
            return normal(zeros, zeros)
        if self.kind == ">":
            h = self.transition(z[:, :-1])                                  # (B, T-1, H)
        else:
            h, _ = self.transition(z[:, :-1])
        p = self.head(h)
        first = z.new_zeros(z.shape[0], 1, z.shape[2])                      # p(z_1) = N(0, I)
        return normal(torch.cat([first, p.loc], 1), torch.cat([first, p.logvar], 1))
