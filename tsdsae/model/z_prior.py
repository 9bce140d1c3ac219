"""p(z_t | z_<t): the local prior.

    'x'   p(z_t) = N(0, I)
    '>'   p(z_t | z_t-1) = N(mu(MLP(z_t-1)), diag sigma^2(MLP(z_t-1)))
    '>>'  p(z_t | z_<t)  = N(mu(h_t-1), diag sigma^2(h_t-1)),  h = LSTM(z_1:t-1)   [default]
and always p(z_1) = N(0, I). The network runs over the posterior samples z_1:T-1 in one fused
call; its outputs are shifted by one step. z (B, T, Z) -> Normal (B, T, Z).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Normal

from tsdsae.config import ModelConfig
from tsdsae.model.layers import MLP, GaussianHead, StackedLSTM, normal


class ZPrior(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.z_prior
        if self.kind == ">":
            self.net = MLP(cfg.z_dim, cfg.transition_hidden)
        elif self.kind == ">>":
            self.net = StackedLSTM(cfg.z_dim, cfg.transition_hidden)
        if self.kind != "x":
            self.head = GaussianHead(self.net.out_dim, cfg.z_dim)

    def forward(self, z: torch.Tensor) -> Normal:
        if self.kind == "x":
            zeros = torch.zeros_like(z)
            return normal(zeros, zeros)
        if self.kind == ">":    # the MLP's sigmoid form (tsdsae.model.layers)
            mean, logvar = self.head.mean_logvar(self.net.half(z[:, :-1]), half=True)
        else:
            mean, logvar = self.head.mean_logvar(self.net(z[:, :-1]))       # (B, T-1, H)
        first = mean.new_zeros(z.shape[0], 1, z.shape[2])                    # p(z_1) = N(0, I)
        return normal(torch.cat([first, mean], 1), torch.cat([first, logvar], 1))
