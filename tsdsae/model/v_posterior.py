"""q(v | x_1:T): the global (instrument) posterior.

A frame-wise encoder ('^' MLP or '><' BiLSTM), masked mean pooling over time, then Gaussian heads:
    h_t = enc(x)_t,  hbar = sum_t m_t h_t / sum_t m_t,  q(v | x) = N(mu(hbar), diag exp(logvar(hbar)))
x (B, T, F), mask (B, T) -> Normal (B, V). This module is the "global encoder" of METHOD s4; its
frozen copy is the informed prior p(v | x) of stage 2.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Normal

from tsdsae.config import ModelConfig
from tsdsae.model.layers import GaussianHead, SequenceEncoder, masked_mean, masked_mean_half


class VPosterior(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = SequenceEncoder(cfg.v_posterior, cfg.input_dim, cfg.encoder_hidden)
        self.head = GaussianHead(self.encoder.out_dim, cfg.v_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Normal:
        if self.encoder.kind == "^":     # pool the MLP's sigmoid form (tsdsae.model.layers)
            return self.head(masked_mean_half(self.encoder.mlp.half(x), mask))
        return self.head(masked_mean(self.encoder(x, mask), mask))

    def from_first(self, pre2: torch.Tensor, mask: torch.Tensor) -> Normal:
        """The same posterior given twice the frame MLP's first-layer output (B, T, H) (MLP
        option; see MLP.half_from_first)."""
        return self.head(masked_mean_half(self.encoder.mlp.half_from_first(pre2), mask))
