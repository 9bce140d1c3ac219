"""Building blocks of the factor modules: the diagonal Gaussian, MLPs, Gaussian heads, masked
pooling and the recurrent frame encoders. Plain torch layers (nn.Linear, nn.Tanh, nn.LSTM).

Which classes build the MLPs, Gaussian heads and output linears is chosen when a model is built
(`Blocks`: PLAIN here; tsdsae.model.fast_cpu.CPU_BLOCKS computes the same functions of the same
parameters faster on CPU). The factor modules are the only definition of the model either way.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.distributions import Distribution, Normal


def standard_normal(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """eps ~ N(0, I) of `shape` from torch's global generator (`normal_()`, the draws of
    torch's own Normal.rsample)."""
    return torch.empty(shape, dtype=dtype, device=device).normal_()


class DiagNormal(Normal):
    """A diagonal Gaussian kept as mean and log-variance (`loc`, `logvar`); its `scale`,
    exp(logvar / 2), is computed on first use. The KL terms work from the log-variances
    (tsdsae.losses). Argument validation is off: it would synchronise with the device."""

    def __init__(self, loc: torch.Tensor, logvar: torch.Tensor):
        if loc.shape != logvar.shape:
            loc, logvar = torch.broadcast_tensors(loc, logvar)
        self.loc, self.logvar = loc, logvar
        self._scale: torch.Tensor | None = None
        Distribution.__init__(self, self.loc.shape, validate_args=False)

    @property
    def scale(self) -> torch.Tensor:
        if self._scale is None:
            self._scale = torch.exp(0.5 * self.logvar)
        return self._scale

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """loc + eps * scale, eps ~ N(0, I): the same draws as torch's Normal.rsample."""
        eps = standard_normal(self._extended_shape(sample_shape), self.loc.dtype,
                              self.loc.device)
        return torch.addcmul(self.loc, eps, self.scale)

    def expand(self, batch_shape, _instance=None) -> "DiagNormal":
        shape = torch.Size(batch_shape)
        return DiagNormal(self.loc.expand(shape), self.logvar.expand(shape))

    def rows(self, index) -> "DiagNormal":
        """The distribution of the batch rows `index` (a slice or an index tensor)."""
        return DiagNormal(self.loc[index], self.logvar[index])


def normal(mean: torch.Tensor, logvar: torch.Tensor) -> DiagNormal:
    """A diagonal Gaussian from mean and log-variance."""
    return DiagNormal(mean, logvar)


class MLP(nn.Module):
    """Linear -> tanh for every size in `hidden` (the last included), as in the paper.
    (..., in_dim) -> (..., hidden[-1])."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(in_dim, size), nn.Tanh()]
            in_dim = size
        self.layers = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GaussianHead(nn.Module):
    """Two linear maps to mean and log-variance: features (..., H) -> DiagNormal (..., D)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mean = nn.Linear(in_dim, out_dim)
        self.logvar = nn.Linear(in_dim, out_dim)

    def forward(self, h: torch.Tensor) -> DiagNormal:
        return normal(self.mean(h), self.logvar(h))


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The classes a model's blocks are built from: `mlp` (an MLP: same constructor, same
    parameters), `head` (a GaussianHead), `linear` (an nn.Linear). Subclasses that compute the
    same function of the same parameters keep checkpoints interchangeable."""

    mlp: type = MLP
    head: type = GaussianHead
    linear: type = nn.Linear


PLAIN = Blocks()


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid frames: h (B, T, H), mask (B, T) bool -> (B, H). An empty sequence
    gives zeros."""
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence within its valid length, leaving padding in place.

    x (B, T, ...), lengths (B,). A gather on the device (no host sync, traceable by
    torch.export). Its own inverse.
    """
    t = torch.arange(x.shape[1], device=x.device).unsqueeze(0)          # (1, T)
    lengths = lengths.unsqueeze(1)                                       # (B, 1)
    idx = torch.where(t < lengths, lengths - 1 - t, t)                   # (B, T)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, idx)


class SequenceEncoder(nn.Module):
    """Frame features of a sequence, by the reference's option strings (METHOD s2):

    '^'   frame-wise MLP with sizes `hidden`
    '>'   forward LSTM, len(hidden) layers of hidden size hidden[0]
    '<'   backward LSTM (each sequence reversed within its length), same sizes
    '><'  bidirectional LSTM, same sizes; layer l+1 reads both directions of layer l
          (concatenated); the output is the mean of the last layer's two directions

    The recurrent options are the reference's one `nn.LSTM(bidirectional=..., num_layers=L)`
    (same weights, same parameter count), written one single-direction nn.LSTM per layer and
    direction so that every backward pass starts at its sequence's last valid frame.
    x (B, T, D_in), mask (B, T) bool -> (B, T, out_dim); outputs at padding frames are unused.
    """

    def __init__(self, kind: str, in_dim: int, hidden: tuple[int, ...], blocks: Blocks = PLAIN):
        super().__init__()
        self.kind = kind
        if kind == "^":
            self.mlp = blocks.mlp(in_dim, hidden)
            self.out_dim = self.mlp.out_dim
            return
        size, directions = hidden[0], ("forward",) * (">" in kind) + ("backward",) * ("<" in kind)
        sizes = [in_dim] + [size * len(directions)] * (len(hidden) - 1)
        self.directions = directions
        if "forward" in directions:
            self.forward_layers = nn.ModuleList(nn.LSTM(d, size, batch_first=True) for d in sizes)
        if "backward" in directions:
            self.backward_layers = nn.ModuleList(nn.LSTM(d, size, batch_first=True) for d in sizes)
        self.out_dim = size

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "^":
            return self.mlp(x)
        lengths = mask.sum(dim=1)
        h = x
        for layer in range(len(getattr(self, f"{self.directions[0]}_layers"))):
            outs = []
            if "forward" in self.directions:
                outs.append(self.forward_layers[layer](h)[0])
            if "backward" in self.directions:
                backward, _ = self.backward_layers[layer](reverse_padded(h, lengths))
                outs.append(reverse_padded(backward, lengths))
            h = torch.cat(outs, dim=-1)
        return outs[0] if len(outs) == 1 else 0.5 * (outs[0] + outs[1])
