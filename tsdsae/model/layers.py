"""Building blocks shared by the factor modules: MLPs, masked pooling, mask-aware LSTMs."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Normal


def normal(mean: torch.Tensor, logvar: torch.Tensor) -> Normal:
    """A diagonal Gaussian from mean and log-variance. Argument validation is off: it would
    synchronise with the device on every step."""
    return Normal(mean, torch.exp(0.5 * logvar), validate_args=False)


_MINUS_ONE = torch.tensor(-1.0)


class _Tanh(torch.autograd.Function):
    """tanh computed as 2 sigmoid(2x) - 1.

    The same function up to float rounding (absolute difference <= 1.2e-7), but on CPU torch's
    sigmoid kernel is about 10x faster than its tanh kernel, and tanh is the largest elementwise
    cost of a step. The backward is the usual (1 - y^2) g.
    """

    @staticmethod
    def forward(ctx, x):
        # -1 + 2 * sigmoid(2x): three single passes over memory (scale, sigmoid, affine)
        y = torch.add(_MINUS_ONE, torch.sigmoid(x * 2.0), alpha=2.0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


def tanh(x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return _Tanh.apply(x)
    return torch.tanh(x)     # elsewhere the native kernel is fast and fusable


class Tanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tanh(x)


class MLP(nn.Module):
    """Linear -> tanh for every hidden size (including the last hidden one), as in the paper."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h), Tanh()]
            in_dim = h
        self.layers = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @property
    def first(self) -> nn.Linear:
        return self.layers[0]

    def tail(self, pre: torch.Tensor) -> torch.Tensor:
        """The MLP given its first Linear's output (pre-activation): tanh, then the rest."""
        return self.layers[2:](tanh(pre))


class GaussianHead(nn.Module):
    """Two linear maps to mean and log-variance: features (..., H) -> Normal (..., D)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mean = nn.Linear(in_dim, out_dim)
        self.logvar = nn.Linear(in_dim, out_dim)

    def forward(self, h: torch.Tensor) -> Normal:
        return normal(*self.mean_logvar(h))

    def mean_logvar(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # both heads in one GEMM (same parameters, one pass over h)
        w = torch.cat([self.mean.weight, self.logvar.weight])
        b = torch.cat([self.mean.bias, self.logvar.bias])
        return torch.nn.functional.linear(h, w, b).chunk(2, dim=-1)


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid frames: h (B, T, H), mask (B, T) bool -> (B, H)."""
    m = mask.to(h.dtype)
    # a batched matmul (B, 1, T) @ (B, T, H): no (B, T, H) temporary for h * m
    return torch.bmm(m.unsqueeze(1), h).squeeze(1) / m.sum(dim=1, keepdim=True).clamp_min(1.0)


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence within its valid length, leaving padding in place.

    x (B, T, ...), lengths (B,). Done with a gather on the device, so a backward LSTM never sees
    padding first and nothing is copied to the host (no pack_padded_sequence sync). Its own inverse.
    """
    t = torch.arange(x.shape[1], device=x.device).unsqueeze(0)          # (1, T)
    lengths = lengths.unsqueeze(1)                                       # (B, 1)
    idx = torch.where(t < lengths, lengths - 1 - t, t)                   # (B, T)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, idx)


class StackedLSTM(nn.Module):
    """A uni-directional LSTM with per-layer sizes; one fused nn.LSTM when all sizes are equal."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        if len(set(hidden)) == 1:
            self.layers = nn.ModuleList([nn.LSTM(in_dim, hidden[0], num_layers=len(hidden),
                                                 batch_first=True)])
        else:
            sizes = (in_dim, *hidden)
            self.layers = nn.ModuleList([nn.LSTM(a, b, batch_first=True)
                                         for a, b in zip(sizes[:-1], sizes[1:])])
        self.out_dim = hidden[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lstm in self.layers:
            x, _ = lstm(x)
        return x


class SequenceEncoder(nn.Module):
    """Frame features for a sequence, by the reference's option strings:

    '^'  frame-wise MLP          '>'  forward LSTM
    '<'  backward LSTM           '><' BiLSTM, the two directions averaged (not concatenated)

    x (B, T, D_in), mask (B, T) -> (B, T, H). Backward passes respect each sequence's length.
    """

    def __init__(self, kind: str, in_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.kind = kind
        if kind == "^":
            self.mlp = MLP(in_dim, hidden)
        if kind in (">", "><"):
            self.forward_lstm = StackedLSTM(in_dim, hidden)
        if kind in ("<", "><"):
            self.backward_lstm = StackedLSTM(in_dim, hidden)
        self.out_dim = hidden[-1]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "^":
            return self.mlp(x)
        outs = []
        if self.kind in (">", "><"):
            outs.append(self.forward_lstm(x))
        if self.kind in ("<", "><"):
            lengths = mask.sum(dim=1)
            outs.append(reverse_padded(self.backward_lstm(reverse_padded(x, lengths)), lengths))
        return outs[0] if len(outs) == 1 else 0.5 * (outs[0] + outs[1])
