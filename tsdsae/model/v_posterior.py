"""q(v | x_1:T): the global (instrument) posterior.

    h_t = enc(x)_t                              frame-wise MLP '^' or BiLSTM '><' (layers.SequenceEncoder)
    hbar = sum_t m_t h_t / sum_t m_t            masked mean pool over valid frames
    q(v | x_1:T) = N(mu(hbar), diag exp(logvar(hbar)))

x (B, T, F), mask (B, T) bool -> DiagNormal (B, V). This is the "global encoder" of METHOD s4;
its frozen copy is the informed prior p(v | x) of stage 2.
"""
from __future__ import annotations

import torch
from torch import nn

from tsdsae.config import ModelConfig
from tsdsae.model.layers import PLAIN, Blocks, DiagNormal, SequenceEncoder, masked_mean


class VPosterior(nn.Module):
    def __init__(self, cfg: ModelConfig, blocks: Blocks = PLAIN):
        super().__init__()
        self.encoder = SequenceEncoder(cfg.v_posterior, cfg.input_dim, cfg.encoder_hidden, blocks)
        self.head = blocks.head(self.encoder.out_dim, cfg.v_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> DiagNormal:
        """q(v | x_1:T): (B, V)."""
        return self.head(masked_mean(self.encoder(x, mask), mask))
