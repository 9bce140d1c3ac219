"""q(z_1:T | x_1:T [, v]): the local (melody) posterior, with its frame feature network.

    feat_t = zfeat(x)_t            '^' MLP, '>' forward, '<' backward, '><' bi-LSTM
                                   (layers.SequenceEncoder), with v appended when v_condition
    'x'   q(z_t | feat_t)                     factorised: all frames at once
    '>'   q(z_t | MLP([feat_t ; z_t-1]))      autoregressive on the previous sample; an MLP with
                                              the transition sizes, tanh after every layer
    '>>'  q(z_t | LSTM([feat_t ; z_t-1]))     autoregressive with memory (transition sizes)
each N(mu(h_t), diag exp(logvar(h_t))), z_0 = 0. Autoregressive options sample step by step
(reparameterised), so the posterior and its samples come back together.
x (B, T, F), mask (B, T), v (B, V) or None -> (DiagNormal (B, T, Z), z (B, T, Z)).
"""
from __future__ import annotations

import torch
from torch import nn

from tsdsae.config import ModelConfig
from tsdsae.model.layers import PLAIN, Blocks, DiagNormal, SequenceEncoder, normal


class ZPosterior(nn.Module):
    def __init__(self, cfg: ModelConfig, blocks: Blocks = PLAIN):
        super().__init__()
        self.kind = cfg.z_posterior
        self.v_condition = cfg.v_condition
        self.z_dim = cfg.z_dim
        self.features = SequenceEncoder(cfg.z_feature, cfg.input_dim, cfg.encoder_hidden, blocks)
        feat_dim = self.features.out_dim + (cfg.v_dim if cfg.v_condition else 0)
        sizes = (feat_dim + cfg.z_dim, *cfg.transition_hidden)
        if self.kind == "x":
            head_in = feat_dim
        elif self.kind == ">":
            self.transition = blocks.mlp(sizes[0], cfg.transition_hidden)
            head_in = self.transition.out_dim
        else:  # '>>'
            self.cells = nn.ModuleList(nn.LSTMCell(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
            head_in = sizes[-1]
        self.head = blocks.head(head_in, cfg.z_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, v: torch.Tensor | None = None,
                sample: bool = True) -> tuple[DiagNormal, torch.Tensor]:
        """q(z_t | ...) for t = 1..T and z_1:T: samples when `sample`, else the means (an
        autoregressive posterior then runs on its means)."""
        return self.from_features(self.features(x, mask), v, sample)

    def from_features(self, feat: torch.Tensor, v: torch.Tensor | None, sample: bool
                      ) -> tuple[DiagNormal, torch.Tensor]:
        """The posterior given the frame features feat (B, T, H)."""
        if self.v_condition:
            feat = torch.cat([feat, v.unsqueeze(1).expand(-1, feat.shape[1], -1)], dim=-1)
        if self.kind == "x":
            q = self.head(feat)
            return q, (q.rsample() if sample else q.mean)
        b, t, _ = feat.shape
        z_prev = feat.new_zeros(b, self.z_dim)
        if self.kind == ">>":
            state = [(feat.new_zeros(b, c.hidden_size), feat.new_zeros(b, c.hidden_size))
                     for c in self.cells]
        means, logvars, zs = [], [], []
        for step in range(t):
            h = torch.cat([feat[:, step], z_prev], dim=-1)
            if self.kind == ">":
                h = self.transition(h)
            else:
                for i, cell in enumerate(self.cells):
                    state[i] = cell(h, state[i])
                    h = state[i][0]
            q = self.head(h)
            z_prev = q.rsample() if sample else q.mean
            means.append(q.loc)
            logvars.append(q.logvar)
            zs.append(z_prev)
        return normal(torch.stack(means, 1), torch.stack(logvars, 1)), torch.stack(zs, 1)
