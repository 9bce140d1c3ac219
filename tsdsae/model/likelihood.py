"""p(x_t | z_t, v): the decoder, Gaussian with mean MLP([z_t ; v]) ('^') or BiLSTM ('><').

z (B, T, Z), v (B, V) broadcast over time -> Normal (B, T, F) with unit scale (the loss uses only
its mean: plain squared error, METHOD s3).

The frame-wise MLP's first layer on [z_t ; v] is evaluated as W_z z_t + (W_v v + b): identical
maths, but the v part is computed once per clip, and `decode_many` shares W_z z across several
v's (the reconstruction and both swaps decode the same z with different v).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

from tsdsae.config import ModelConfig
from tsdsae.model.layers import MLP, SequenceEncoder, linear, linear_on_half


class Likelihood(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.likelihood
        self.z_dim = cfg.z_dim
        in_dim = cfg.z_dim + cfg.v_dim
        if self.kind == "^":
            self.net = MLP(in_dim, cfg.decoder_hidden)
        else:
            self.net = SequenceEncoder("><", in_dim, cfg.decoder_hidden)
        self.out = nn.Linear(self.net.out_dim, cfg.input_dim)

    def hidden_many(self, z: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        """Last hidden layer of the frame-wise MLP, in sigmoid form s (hidden = 2s - 1, see
        tsdsae.model.layers), for K pairings of the same z: z (B, T, Z), vs (K, B, V) ->
        (K, B, T, H). Means are `linear_on_half(s, self.out)`."""
        first: nn.Linear = self.net.first
        w = 2.0 * first.weight                                               # sigmoid form: 2a
        hz = linear(z, w[:, :self.z_dim])                                    # (B, T, H)
        hv = F.linear(vs, w[:, self.z_dim:], 2.0 * first.bias)               # (K, B, H)
        return self.net.half_from_first(hz.unsqueeze(0) + hv.unsqueeze(2))

    def decode_many(self, z: torch.Tensor, vs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Means for K pairings of the same z: z (B, T, Z), vs (K, B, V) -> (K, B, T, F)."""
        if self.kind == "^":
            return linear_on_half(self.hidden_many(z, vs), self.out)
        k, b, _ = vs.shape
        t = z.shape[1]
        zz = z.unsqueeze(0).expand(k, -1, -1, -1)
        zv = torch.cat([zz, vs.unsqueeze(2).expand(-1, -1, t, -1)], dim=-1).reshape(k * b, t, -1)
        h = self.net(zv, mask.repeat(k, 1))
        return linear(h, self.out.weight, self.out.bias).view(k, b, t, -1)

    def forward(self, z: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> Normal:
        mean = self.decode_many(z, v.unsqueeze(0), mask)[0]
        return Normal(mean, torch.ones_like(mean), validate_args=False)
