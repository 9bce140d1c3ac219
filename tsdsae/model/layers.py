"""Building blocks shared by the factor modules: MLPs, masked pooling, mask-aware LSTMs.

Every tanh unit of the MLPs is evaluated in *sigmoid form*. Since tanh(a) = 2 sigmoid(2a) - 1,
a hidden layer keeps s = sigmoid(2a) instead of y = tanh(a) = 2s - 1, and the factor 2 and the
affine map 2s - 1 are folded into the adjacent linear maps (small ops on the weights):

    W y + b = (2W) s + (b - W 1)        a linear map of a tanh output, applied to s

so a hidden layer costs one GEMM and one sigmoid pass over its activations. Same parameters and
the same function up to float rounding (differences of order 1e-7); on CPU torch's sigmoid is
also about 10x faster than its tanh, and the separate scale and affine passes of 2 sigmoid(2a) - 1
would cost as much as the sigmoid itself. Modules that hand a hidden layer to a linear consumer
(a Gaussian head, the decoder's output layer, masked pooling) pass s and fold; `MLP.forward`
returns y for every other caller.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Normal


# -- frame-wise linear maps -----------------------------------------------------------------------

# Below this many rows a linear map is cheap either way and F.linear is used.
_ONEDNN_MIN_ROWS = 2048
_plain = threading.local()
_CONV_ARGS = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1)     # stride, padding, dilation, ..., groups


def _as_pixels(x: torch.Tensor) -> torch.Tensor:
    """(..., C) contiguous -> a (1, C, rows, 1) channels-last view of the same memory."""
    c = x.shape[-1]
    return x.contiguous().view(1, -1, 1, c).permute(0, 3, 1, 2)


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b evaluated as a 1x1 convolution over channels-last "pixels" (one per row).

    The same product, but it runs in oneDNN, which uses this CPU's AVX-512 GEMM kernels, where
    torch's CPU matmul goes to MKL's sgemm: on the skinny shapes of this model (rows x 32..80 by
    32..80) that is 2.5-3x faster for the forward, input-gradient and weight-gradient products
    alike. The views cost nothing: a contiguous (rows, C) matrix *is* a channels-last image.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        pixels = _as_pixels(x)
        w4 = weight.contiguous().view(*weight.shape, 1, 1)
        y = F.conv2d(pixels, w4, bias)                                   # (1, N, rows, 1)
        ctx.save_for_backward(pixels, w4)
        ctx.in_shape = x.shape
        ctx.has_bias = bias is not None
        return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        pixels, w4 = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = gw = gb = None
        if need_x or need_w:
            gx, gw, _ = torch.ops.aten.convolution_backward(
                _as_pixels(grad), pixels, w4, None, *_CONV_ARGS, [need_x, need_w, False])
        if gx is not None:
            gx = gx.permute(0, 2, 3, 1).reshape(ctx.in_shape)
        if gw is not None:
            gw = gw.view(w4.shape[:2])
        if need_b and ctx.has_bias:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """F.linear for frame-wise maps: x (..., K), weight (N, K) -> (..., N).

    On CPU (float32, many rows) it runs as a oneDNN 1x1 convolution (`_OneDNNLinear`); on other
    devices, for few rows, and while torch.compile/export traces, it is F.linear.
    """
    if (getattr(_plain, "on", False) or torch.compiler.is_compiling()
            or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.dim() < 2 or x.numel() < _ONEDNN_MIN_ROWS * x.shape[-1]
            or not torch.backends.mkldnn.is_available()):
        return F.linear(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


@contextlib.contextmanager
def plain_linear():
    """Within this block (this thread) `linear` is F.linear: for tracing to a portable graph
    (torch.export), where a branch on the number of rows would pin dynamic sizes."""
    before = getattr(_plain, "on", False)
    _plain.on = True
    try:
        yield
    finally:
        _plain.on = before


# -- Gaussians, sigmoid form, MLPs ---------------------------------------------------------------

class DiagNormal(Normal):
    """A diagonal Gaussian kept as mean and log-variance (`loc`, `logvar`); its `scale`,
    exp(logvar / 2), is computed on first use. The KL terms work from the log-variances
    (tsdsae.losses), so distributions that are only compared never pay for the scale.
    Argument validation is off: it would synchronise with the device on every step."""

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
        # the same draws as Normal.rsample; loc + eps * scale in one pass
        eps = torch.empty(self._extended_shape(sample_shape), dtype=self.loc.dtype,
                          device=self.loc.device).normal_()
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


def on_half(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') with W' s + b' = W (2s - 1) + b: a linear map of a tanh output y = 2s - 1,
    rewritten to act on its sigmoid form s."""
    shift = -weight.sum(dim=1)
    return 2.0 * weight, shift if bias is None else bias + shift


def linear_on_half(s: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`layer(2s - 1)` without materialising 2s - 1."""
    return linear(s, *on_half(layer.weight, layer.bias))


class MLP(nn.Module):
    """Linear -> tanh for every hidden size (including the last hidden one), as in the paper.

    `layers` holds the parameters in order (Linear, Tanh, Linear, Tanh, ...); the passes evaluate
    them in sigmoid form (module docstring): `half(x)` returns s with tanh output 2s - 1.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h), nn.Tanh()]
            in_dim = h
        self.layers = nn.Sequential(*layers)
        self.out_dim = in_dim

    @property
    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    @property
    def first(self) -> nn.Linear:
        return self.layers[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The tanh outputs of the last hidden layer (..., out_dim)."""
        return 2.0 * self.half(x) - 1.0

    def half(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid form s of the last hidden layer: tanh output = 2s - 1."""
        first = self.first
        return self.half_from_first(linear(x, 2.0 * first.weight, 2.0 * first.bias))

    def half_from_first(self, pre2: torch.Tensor) -> torch.Tensor:
        """`half` given twice the first Linear's output, 2a (callers fold the 2 into weights)."""
        s = torch.sigmoid(pre2)
        for layer in self.linears[1:]:
            w, b = on_half(layer.weight, layer.bias)
            s = torch.sigmoid(linear(s, 2.0 * w, 2.0 * b))
        return s


class GaussianHead(nn.Module):
    """Two linear maps to mean and log-variance: features (..., H) -> Normal (..., D)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mean = nn.Linear(in_dim, out_dim)
        self.logvar = nn.Linear(in_dim, out_dim)

    def forward(self, h: torch.Tensor, half: bool = False) -> Normal:
        return normal(*self.mean_logvar(h, half))

    def mean_logvar(self, h: torch.Tensor, half: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of features h, or of 2h - 1 when `half` (h a sigmoid form)."""
        # both heads in one GEMM (same parameters, one pass over h)
        w = torch.cat([self.mean.weight, self.logvar.weight])
        b = torch.cat([self.mean.bias, self.logvar.bias])
        if half:
            w, b = on_half(w, b)
        return linear(h, w, b).chunk(2, dim=-1)


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid frames: h (B, T, H), mask (B, T) bool -> (B, H)."""
    m = mask.to(h.dtype)
    # a batched matmul (B, 1, T) @ (B, T, H): no (B, T, H) temporary for h * m
    return torch.bmm(m.unsqueeze(1), h).squeeze(1) / m.sum(dim=1, keepdim=True).clamp_min(1.0)


def masked_mean_half(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`masked_mean(2s - 1, mask)` for a sigmoid form s (B, T, H): the affine map is applied to
    the pooled (B, H) sums, not to the frames."""
    m = mask.to(s.dtype)
    count = m.sum(dim=1, keepdim=True)
    total = torch.bmm(m.unsqueeze(1), s).squeeze(1)
    return (2.0 * total - count) / count.clamp_min(1.0)


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
