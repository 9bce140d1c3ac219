"""p(x_t | z_t, v): the decoder.

    h = dec([z_t ; v])        frame-wise MLP '^' or BiLSTM '><' (layers.SequenceEncoder), v
                              broadcast over time
    p(x_t | z_t, v) = N(W h_t + b, I)

z (B, T, Z), v (B, V), mask (B, T) -> Normal (B, T, F) with unit scale (the loss uses only its
mean: plain squared error, METHOD s3).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Normal

from tsdsae.config import ModelConfig
from tsdsae.model.layers import PLAIN, Blocks, SequenceEncoder


class Likelihood(nn.Module):
    def __init__(self, cfg: ModelConfig, blocks: Blocks = PLAIN):
        super().__init__()
        self.net = SequenceEncoder(cfg.likelihood, cfg.z_dim + cfg.v_dim, cfg.decoder_hidden,
                                   blocks)
        self.out = blocks.linear(self.net.out_dim, cfg.input_dim)

    def forward(self, z: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> Normal:
        """p(x_t | z_t, v) for t = 1..T: (B, T, F)."""
        zv = torch.cat([z, v.unsqueeze(1).expand(-1, z.shape[1], -1)], dim=-1)
        mean = self.out(self.net(zv, mask))
        return Normal(mean, mean.new_ones(()).expand_as(mean), validate_args=False)
