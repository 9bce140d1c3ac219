"""q(z_1:T | x_1:T [, v]): the local (melody) posterior, with its frame feature network.

feat_t = zfeat(x)_t   ('^' MLP, '>' forward LSTM, '<' backward LSTM, '><' averaged BiLSTM)
options (METHOD s2):
    'x'   q(z_t | feat_t)                 factorised: all frames at once
    '>'   q(z_t | MLP([feat_t ; z_t-1]))  autoregressive on the previous sample
    '>>'  q(z_t | LSTM([feat_t ; z_t-1])) autoregressive with memory
with v_condition, v is concatenated to feat_t. Autoregressive options sample step by step
(reparameterised), so the posterior and its samples come back together.
x (B, T, F), mask (B, T), v (B, V) or None -> (Normal (B, T, Z), z sample (B, T, Z)).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Normal

from tsdsae.config import ModelConfig
from tsdsae.model.layers import MLP, GaussianHead, SequenceEncoder, normal


class ZPosterior(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.z_posterior
        self.v_condition = cfg.v_condition
        self.z_dim = cfg.z_dim
        self.features = SequenceEncoder(cfg.z_feature, cfg.input_dim, cfg.encoder_hidden)
        in_dim = self.features.out_dim + (cfg.v_dim if cfg.v_condition else 0)
        if self.kind == "x":
            head_in = in_dim
        elif self.kind == ">":
            self.step_mlp = MLP(in_dim + cfg.z_dim, (cfg.encoder_hidden[-1],))
            head_in = self.step_mlp.out_dim
        else:  # '>>'
            sizes = (in_dim + cfg.z_dim, *cfg.transition_hidden)
            self.cells = nn.ModuleList([nn.LSTMCell(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
            head_in = cfg.transition_hidden[-1]
        self.head = GaussianHead(head_in, cfg.z_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, v: torch.Tensor | None = None,
                sample: bool = True) -> tuple[Normal, torch.Tensor]:
        if self.features.kind == "^":    # the MLP's sigmoid form (tsdsae.model.layers)
            return self.from_features(self.features.mlp.half(x), v, sample, half=True)
        return self.from_features(self.features(x, mask), v, sample)

    def from_first(self, pre2: torch.Tensor, v: torch.Tensor | None = None, sample: bool = True
                   ) -> tuple[Normal, torch.Tensor]:
        """The same posterior given twice the feature MLP's first-layer output (B, T, H) (MLP
        option; see MLP.half_from_first)."""
        return self.from_features(self.features.mlp.half_from_first(pre2), v, sample, half=True)

    def from_features(self, feat: torch.Tensor, v: torch.Tensor | None, sample: bool,
                      half: bool = False) -> tuple[Normal, torch.Tensor]:
        """feat: the features, or their sigmoid form s (features 2s - 1) when `half`."""
        if half and (self.v_condition or self.kind != "x"):
            feat, half = 2.0 * feat - 1.0, False
        if self.v_condition:
            feat = torch.cat([feat, v.unsqueeze(1).expand(-1, feat.shape[1], -1)], dim=-1)
        if self.kind == "x":
            q = self.head(feat, half=half)
            return q, (q.rsample() if sample else q.mean)
        return self._autoregressive(feat, sample)

    def _autoregressive(self, feat: torch.Tensor, sample: bool) -> tuple[Normal, torch.Tensor]:
        b, t, _ = feat.shape
        z_prev = feat.new_zeros(b, self.z_dim)
        state = None
        if self.kind == ">>":
            state = [(feat.new_zeros(b, c.hidden_size), feat.new_zeros(b, c.hidden_size))
                     for c in self.cells]
        means, logvars, zs = [], [], []
        for step in range(t):
            h = torch.cat([feat[:, step], z_prev], dim=-1)
            if self.kind == ">":
                h = self.step_mlp.half(h)
            else:
                for i, cell in enumerate(self.cells):
                    state[i] = cell(h, state[i])
                    h = state[i][0]
            mean, logvar = self.head.mean_logvar(h, half=self.kind == ">")
            z_prev = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
            means.append(mean)
            logvars.append(logvar)
            zs.append(z_prev)
        return normal(torch.stack(means, 1), torch.stack(logvars, 1)), torch.stack(zs, 1)
