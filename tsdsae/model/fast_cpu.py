"""Building blocks that compute the plain blocks' functions of the same parameters faster on
CPU, and the fused KL_z (tested equal to the plain model in float64, values and gradients, for
every option set). A model built with `CPU_BLOCKS` (`DSAE(cfg, CPU_BLOCKS)`) has the plain
model's parameters and state_dict; only how its MLPs, Gaussian heads and output linear compute
differs. A reader of the model can skip this file: it holds no maths of its own.

1. oneDNN linears (`Linear`, `linear`). A frame-wise linear map y = x W^T + b over many rows
   runs as a 1x1 convolution over channels-last "pixels" (`_OneDNNLinear`): oneDNN's AVX-512
   kernels, where torch's CPU matmul goes to MKL sgemm, are 2.5-3x faster on this model's skinny
   shapes (rows x 32..80 by 32..80) for the forward, input-gradient and weight-gradient products.
2. tanh in sigmoid form (`TanhMLP`). tanh(a) = 2 sigmoid(2a) - 1, so inside an MLP a layer keeps
   s = sigmoid(2a) instead of y = tanh(a) = 2s - 1, and the factor 2 and the affine map 2s - 1
   are folded into the next linear map (small ops on the weights):
       W y + b = (2W) s + (b - W 1)
   so a hidden layer costs one GEMM and one sigmoid pass (torch's CPU sigmoid is ~10x faster
   than its tanh); the MLP's output is 2s - 1, as the plain MLP's.
3. Gaussian heads (`Head`): mean and log-variance in one GEMM of the concatenated weights.
4. A fused masked KL (`masked_kl_mean`) with a hand-written backward: a few passes over the
   (B, T, Z) tensors instead of the ~30 autograd records for the composed expression.

An MLP edited away from Linear -> Tanh (another nonlinearity, dropout, ...) runs its plain
forward inside a CPU-blocks model; `plain_blocks(model)` names such MLPs and
`report_plain_blocks` says so once. LSTMs and everything else are the plain modules.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from tsdsae import losses
from tsdsae.model.layers import MLP, PLAIN, Blocks, DiagNormal, GaussianHead, normal

logger = logging.getLogger(__name__)

# -- 1. oneDNN linears ----------------------------------------------------------------------------

# Below this many rows a linear map is cheap either way and F.linear is used.
_ONEDNN_MIN_ROWS = 2048
_CONV_ARGS = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1)     # stride, padding, dilation, ..., groups


def _as_pixels(x: torch.Tensor) -> torch.Tensor:
    """(..., C) contiguous -> a (1, C, rows, 1) channels-last view of the same memory."""
    c = x.shape[-1]
    return x.contiguous().view(1, -1, 1, c).permute(0, 3, 1, 2)


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b evaluated as a 1x1 convolution over channels-last pixels (one per row)."""

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
    @once_differentiable
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
    """F.linear(x, weight, bias): x (..., K), weight (N, K) -> (..., N); a oneDNN 1x1
    convolution for float32 CPU tensors with many rows, F.linear otherwise."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.dim() < 2 or x.numel() < _ONEDNN_MIN_ROWS * x.shape[-1]
            or not torch.backends.mkldnn.is_available()):
        return F.linear(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


# -- 2-3. the blocks: tanh in sigmoid form, heads, linears -----------------------------------------

def on_sig(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') with W' s + b' = W (2s - 1) + b: a linear map of a tanh output y = 2s - 1,
    rewritten to act on its sigmoid form s. weight (O, I), bias (O,)."""
    shift = -weight.sum(dim=-1)
    return 2.0 * weight, shift if bias is None else bias + shift


def _linears(mlp: MLP) -> list[nn.Linear]:
    return [m for m in mlp.layers if isinstance(m, nn.Linear)]


def _is_tanh_mlp(mlp: MLP) -> bool:
    kinds = [type(m) for m in mlp.layers]
    return kinds == [nn.Linear, nn.Tanh] * (len(kinds) // 2) and len(kinds) >= 2


def mlp_sig(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """Sigmoid form s of a Linear -> Tanh `mlp`'s output (mlp(x) = 2s - 1). x (..., D) ->
    (..., H)."""
    layers = _linears(mlp)
    s = torch.sigmoid(linear(x, 2.0 * layers[0].weight, 2.0 * layers[0].bias))
    for layer in layers[1:]:
        w, b = on_sig(layer.weight, layer.bias)
        s = torch.sigmoid(linear(s, 2.0 * w, 2.0 * b))
    return s


class TanhMLP(MLP):
    """layers.MLP computed in sigmoid form with oneDNN linears (techniques 1-2); an MLP whose
    layers are not Linear -> Tanh runs its plain forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _is_tanh_mlp(self):
            return super().forward(x)
        return 2.0 * mlp_sig(self, x) - 1.0


class Head(GaussianHead):
    """layers.GaussianHead with mean and log-variance in one (oneDNN) GEMM."""

    def forward(self, h: torch.Tensor) -> DiagNormal:
        w = torch.cat([self.mean.weight, self.logvar.weight])
        b = torch.cat([self.mean.bias, self.logvar.bias])
        return normal(*linear(h, w, b).chunk(2, dim=-1))


class Linear(nn.Linear):
    """nn.Linear through `linear` (oneDNN for float32 CPU tensors with many rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


CPU_BLOCKS = Blocks(mlp=TanhMLP, head=Head, linear=Linear)


# -- 4. the fused masked KL -----------------------------------------------------------------------

class _MaskedGaussianKL(torch.autograd.Function):
    """sum_{b,t,z} w_bt KL(q || p)_btz from means and log-variances, with a hand-written backward.
    With dl = lq - lp, r = exp(dl), d = mq - mp, e = exp(-lp), KL = (r + d^2 e - 1 - dl) / 2 and
        dKL/dmq = d e = -dKL/dmp,  dKL/dlq = (r - 1) / 2,  dKL/dlp = (1 - r - d^2 e) / 2.
    """

    @staticmethod
    def forward(ctx, mq, lq, mp, lp, w):
        dl = lq - lp
        r = torch.exp(dl)
        d = mq - mp
        e = torch.exp(lp.neg())
        de = d * e
        u = r + torch.mul(de, d, out=e)                     # r + d^2 e
        kl2 = torch.sub(u, dl, out=dl)                      # 2 KL + 1
        per_frame = kl2.sum(-1) - kl2.shape[-1]             # (B, T): 2 sum_z KL
        ctx.save_for_backward(r, de, u, w)
        return 0.5 * torch.dot(per_frame.flatten(), w.flatten())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        r, de, u, w = ctx.saved_tensors
        need_mq, need_lq, need_mp, need_lp, _ = ctx.needs_input_grad
        wg = (0.5 * grad) * w.unsqueeze(-1)                 # (B, T, 1)
        g_mq = g_lq = g_mp = g_lp = None
        if need_mq:
            g_mq = de * (2.0 * wg)
        if need_mp:
            g_mp = de * (-2.0 * wg)
        if need_lq:
            g_lq = torch.addcmul(-wg, r, wg)                 # (r - 1) wg
        if need_lp:
            g_lp = torch.addcmul(wg, u, wg, value=-1.0)      # (1 - r - d^2 e) wg
        return g_mq, g_lq, g_mp, g_lp, None


def masked_kl_mean(q: DiagNormal, p: DiagNormal, mask: torch.Tensor) -> torch.Tensor:
    """tsdsae.losses.masked_kl_mean (KL_z's averaging) for q, p over (B, T, Z), fused."""
    lq, lp = getattr(q, "logvar", None), getattr(p, "logvar", None)
    if lq is None or lp is None or q.loc.shape != p.loc.shape or q.loc.dim() != 3:
        return losses.masked_kl_mean(q, p, mask)
    m = mask.to(q.loc.dtype)
    w = m / (m.sum(dim=1, keepdim=True).clamp_min(1.0) * (m.shape[0] * q.loc.shape[-1]))
    return _MaskedGaussianKL.apply(q.loc, lq, p.loc, lp, w)


# -- choosing the blocks -------------------------------------------------------------------------

def plain_blocks(model: nn.Module) -> list[str]:
    """The MLPs of `model` that are not Linear -> Tanh, so that CPU blocks run their plain
    forward (names as in model.named_modules())."""
    return [name for name, m in model.named_modules() if isinstance(m, MLP)
            and not _is_tanh_mlp(m)]


_reported: set[str] = set()


def report_plain_blocks(model: nn.Module) -> list[str]:
    """plain_blocks(model), said once in a warning (once per process for the same names) when
    `model` is built from CPU_BLOCKS and some of its MLPs run plain."""
    plain = plain_blocks(model) if getattr(model, "blocks", None) is CPU_BLOCKS else []
    message = ", ".join(plain)
    if plain and message not in _reported:
        _reported.add(message)
        logger.warning("fast CPU blocks: %s not Linear -> Tanh, so they run as plain modules "
                       "(slower; the result is the same)", message)
    return plain


@dataclasses.dataclass(frozen=True)
class TrainingPass:
    """How a run's training passes are computed on a device: the `blocks` its model is built
    from and `masked_kl`, the KL_z averaging (METHOD s3) the loss uses (tsdsae.train_step)."""

    blocks: Blocks
    masked_kl: Callable[..., torch.Tensor]


def training_pass(device: torch.device | str) -> TrainingPass:
    """CPU_BLOCKS and the fused masked KL on CPU; the plain blocks and
    tsdsae.losses.masked_kl_mean elsewhere (on CUDA the plain layers run in cuBLAS/cuDNN and
    need none of this)."""
    if torch.device(device).type != "cpu":
        return TrainingPass(PLAIN, losses.masked_kl_mean)
    return TrainingPass(CPU_BLOCKS, masked_kl_mean)


__all__ = ["CPU_BLOCKS", "TanhMLP", "Head", "Linear", "TrainingPass", "training_pass",
           "plain_blocks", "report_plain_blocks", "linear", "masked_kl_mean"]
