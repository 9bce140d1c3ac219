"""The DSAE training pass computed faster on CPU: the same function of the same parameters as
`DSAE.forward` and the KL_z of tsdsae.losses (tested equal in float64, values and gradients).

A reader of the model can skip this file: it holds no maths of its own. `FastDSAE(model)` reads
the plain model's parameters on every call (so optimiser steps, `set_trainable` and checkpoints
act on the plain model as usual) and evaluates them with four CPU techniques:

1. oneDNN linears. A frame-wise linear map y = x W^T + b over many rows runs as a 1x1
   convolution over channels-last "pixels" (`_OneDNNLinear`): oneDNN's AVX-512 kernels, where
   torch's CPU matmul goes to MKL sgemm, are 2.5-3x faster on this model's skinny shapes (rows x
   32..80 by 32..80) for the forward, input-gradient and weight-gradient products alike.
2. tanh in sigmoid form. tanh(a) = 2 sigmoid(2a) - 1, so an MLP layer keeps s = sigmoid(2a)
   instead of y = tanh(a) = 2s - 1, and the factor 2 and the affine map 2s - 1 are folded into
   the adjacent linear maps (small ops on the weights):
       W y + b = (2W) s + (b - W 1)
   so a hidden layer costs one GEMM and one sigmoid pass (torch's CPU sigmoid is ~10x faster
   than its tanh). Masked mean pooling pools s and maps the (B, H) sums.
3. Folding the decoder's output layer into the re-encoding. With frame-wise MLP encoders and
   decoder, re-encoding a swap x = W_out h + b_out needs only each encoder's first layer of it:
       W_enc (W_out h + b_out) + b_enc = (W_enc W_out) h + (W_enc b_out + b_enc)
   so the swapped spectrograms (2B, T, F) are never materialised. Likewise the decoder's first
   layer on [z_t ; v] is W_z z_t + (W_v v + b): W_z z is shared by the reconstruction and both
   swaps, the v part is computed once per clip.
4. A fused masked KL (`masked_kl_mean`) with a hand-written backward: a few passes over the
   (B, T, Z) tensors instead of the ~30 autograd records for the composed expression.

Building blocks, chosen when the pass is built (`training_pass`): each factor's MLP runs in
sigmoid form when it is Linear -> Tanh, and otherwise runs as its plain module (a module edited
to another nonlinearity, dropout, ...), its output handed on in sigmoid form (y + 1) / 2; the
folds of technique 3 apply only where every MLP they touch is Linear -> Tanh. Recurrent pieces
(LSTMs, autoregressive posteriors) run the plain modules. `plain_blocks(model)` names the MLPs
that run plain, and `training_pass` reports them once. Every option of ModelConfig is covered.
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
from tsdsae.model.dsae import DSAE, Outputs, inverse_permutation
from tsdsae.model.layers import MLP, DiagNormal, GaussianHead, masked_mean, normal

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


# -- 2. tanh in sigmoid form ----------------------------------------------------------------------

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


def mlp_sig_from_first(mlp: MLP, pre2: torch.Tensor) -> torch.Tensor:
    """Sigmoid form s of `mlp`'s output (tanh output 2s - 1), given 2a, twice its first
    Linear's output (callers fold the 2 into the weights)."""
    s = torch.sigmoid(pre2)
    for layer in _linears(mlp)[1:]:
        w, b = on_sig(layer.weight, layer.bias)
        s = torch.sigmoid(linear(s, 2.0 * w, 2.0 * b))
    return s


def mlp_sig(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """Sigmoid form s of mlp(x): mlp(x) = 2s - 1. x (..., D) -> (..., H). An MLP that is not
    Linear -> Tanh runs as its plain module (the fallback block)."""
    if not _is_tanh_mlp(mlp):
        return (mlp(x) + 1.0) * 0.5
    first = _linears(mlp)[0]
    return mlp_sig_from_first(mlp, linear(x, 2.0 * first.weight, 2.0 * first.bias))


def head_mean_logvar(head: GaussianHead, h: torch.Tensor, sig: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`head(h)`'s mean and log-variance, or head(2h - 1)'s when `sig` (h in sigmoid form), in one GEMM."""
    w = torch.cat([head.mean.weight, head.logvar.weight])
    b = torch.cat([head.mean.bias, head.logvar.bias])
    if sig:
        w, b = on_sig(w, b)
    return linear(h, w, b).chunk(2, dim=-1)


def masked_mean_sig(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """masked_mean(2s - 1, mask) for a sigmoid form s (B, T, H): the affine map is applied to
    the pooled (B, H) sums, and the sums are one batched matmul (no (B, T, H) temporary)."""
    m = mask.to(s.dtype)
    count = m.sum(dim=1, keepdim=True)
    total = torch.bmm(m.unsqueeze(1), s).squeeze(1)
    return (2.0 * total - count) / count.clamp_min(1.0)


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


# -- the pass -------------------------------------------------------------------------------------

def plain_blocks(model: DSAE) -> list[str]:
    """The MLPs of `model` that are not Linear -> Tanh: the fast pass runs them as their plain
    modules (names as in model.named_modules())."""
    return [name for name, m in model.named_modules() if isinstance(m, MLP)
            and not _is_tanh_mlp(m)]


class FastDSAE(nn.Module):
    """`DSAE.forward` of `model` (same signature, same Outputs), faster on CPU; the loss pairs
    it with `masked_kl_mean` (tsdsae.train_step). Its parameters are the model's."""

    def __init__(self, model: DSAE):
        super().__init__()
        self.model = model

    # the factors, as in the plain modules --------------------------------------------------------

    def v_posterior(self, x: torch.Tensor, mask: torch.Tensor) -> DiagNormal:
        vp = self.model.v_posterior
        if vp.encoder.kind == "^":
            pooled = masked_mean_sig(mlp_sig(vp.encoder.mlp, x), mask)
        else:
            pooled = masked_mean(vp.encoder(x, mask), mask)
        return normal(*head_mean_logvar(vp.head, pooled))

    def z_posterior(self, x: torch.Tensor, mask: torch.Tensor, v: torch.Tensor | None,
                    sample: bool) -> tuple[DiagNormal, torch.Tensor]:
        features = self.model.z_posterior.features
        if features.kind == "^":
            return self._z_from_features(mlp_sig(features.mlp, x), v, sample, sig=True)
        return self._z_from_features(features(x, mask), v, sample, sig=False)

    def _z_from_features(self, feat: torch.Tensor, v: torch.Tensor | None, sample: bool,
                         sig: bool) -> tuple[DiagNormal, torch.Tensor]:
        """feat: the features, or their sigmoid form s (features 2s - 1) when `sig`."""
        zp = self.model.z_posterior
        if zp.kind == "x" and not zp.v_condition:
            q = normal(*head_mean_logvar(zp.head, feat, sig))
            return q, (q.rsample() if sample else q.mean)
        return zp.from_features(2.0 * feat - 1.0 if sig else feat, v, sample)

    def z_prior(self, z: torch.Tensor) -> DiagNormal:
        zp = self.model.z_prior
        if zp.kind == "x":
            zeros = torch.zeros_like(z)
            return normal(zeros, zeros)
        if zp.kind == ">":
            mean, logvar = head_mean_logvar(zp.head, mlp_sig(zp.transition, z[:, :-1]), sig=True)
        else:
            mean, logvar = head_mean_logvar(zp.head, zp.transition(z[:, :-1])[0])
        first = z.new_zeros(z.shape[0], 1, z.shape[2])
        return normal(torch.cat([first, mean], 1), torch.cat([first, logvar], 1))

    def decoder_hidden(self, z: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        """Sigmoid form of the decoder MLP's last hidden layer for K pairings of the same z:
        z (B, T, Z), vs (K, B, V) -> (K, B, T, H)."""
        mlp = self.model.likelihood.net.mlp
        first = _linears(mlp)[0]          # callers check _is_tanh_mlp(mlp)
        z_dim = z.shape[-1]
        w = 2.0 * first.weight                                               # sigmoid form: 2a
        hz = linear(z, w[:, :z_dim])                                         # (B, T, H)
        hv = F.linear(vs, w[:, z_dim:], 2.0 * first.bias)                    # (K, B, H)
        return mlp_sig_from_first(mlp, hz.unsqueeze(0) + hv.unsqueeze(2))

    def decode_many(self, z: torch.Tensor, vs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Means of p(x | z, v) for K pairings: z (B, T, Z), vs (K, B, V) -> (K, B, T, F)."""
        lik = self.model.likelihood
        if lik.net.kind == "^" and _is_tanh_mlp(lik.net.mlp):
            return linear(self.decoder_hidden(z, vs), *on_sig(lik.out.weight, lik.out.bias))
        k, b, _ = vs.shape
        t = z.shape[1]
        zv = torch.cat([z.unsqueeze(0).expand(k, -1, -1, -1),
                        vs.unsqueeze(2).expand(-1, -1, t, -1)], dim=-1).reshape(k * b, t, -1)
        h = lik.net(zv, mask.repeat(k, 1))
        return linear(h, lik.out.weight, lik.out.bias).view(k, b, t, -1)

    # the pass ------------------------------------------------------------------------------------

    def _folds_reencoding(self) -> bool:
        cfg, m = self.model.cfg, self.model
        return (cfg.v_posterior == "^" and cfg.z_feature == "^" and cfg.likelihood == "^"
                and all(_is_tanh_mlp(mlp) for mlp in (m.v_posterior.encoder.mlp,
                                                      m.z_posterior.features.mlp,
                                                      m.likelihood.net.mlp)))

    def _reencode_folded(self, s: torch.Tensor, mask: torch.Tensor, v_sample: bool,
                         z_sample: bool) -> tuple[DiagNormal, DiagNormal]:
        """q(v | x), q(z | x) of x = out(2s - 1), s the sigmoid form of the decoder's last
        hidden layer (2B, T, H): the output layer folded into both encoders' first layers
        (technique 3)."""
        m = self.model
        out = m.likelihood.out
        mlps = (m.v_posterior.encoder.mlp, m.z_posterior.features.mlp)
        hidden = []
        for mlp in mlps:
            first = _linears(mlp)[0]
            w, b = on_sig(first.weight @ out.weight, first.weight @ out.bias + first.bias)
            hidden.append(mlp_sig_from_first(mlp, linear(s, 2.0 * w, 2.0 * b)))
        qv = normal(*head_mean_logvar(m.v_posterior.head, masked_mean_sig(hidden[0], mask)))
        v = qv.rsample() if v_sample else None
        qz, _ = self._z_from_features(hidden[1], v, z_sample, sig=True)
        return qv, qz

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                swap_perms: tuple[torch.Tensor, torch.Tensor] | None = None) -> Outputs:
        """DSAE.forward: the same Outputs, the same random draws in the same order."""
        cfg = self.model.cfg
        qv = self.v_posterior(x, mask)
        v = qv.rsample()
        qz, z = self.z_posterior(x, mask, v, sample=True)
        pz = self.z_prior(z)
        if swap_perms is None:
            return Outputs(qv, v, qz, z, pz, self.decode_many(z, v.unsqueeze(0), mask)[0])
        perm_g, perm_l = swap_perms
        b = x.shape[0]
        vs = torch.stack([v, v[perm_g], v[inverse_permutation(perm_l)]])     # (3, B, V)
        mask2 = mask.repeat(2, 1)
        z_sample = cfg.z_posterior != "x"
        if self._folds_reencoding():
            lik = self.model.likelihood
            hidden = self.decoder_hidden(z, vs)                              # (3, B, T, H)
            # split (not indexing): its backward concatenates instead of zero-filling
            h_main, h_swap = hidden.split([1, 2])
            x_mean = linear(h_main.squeeze(0), *on_sig(lik.out.weight, lik.out.bias))
            qv_swap, qz_swap = self._reencode_folded(
                h_swap.reshape(2 * b, *h_swap.shape[2:]), mask2, cfg.v_condition, z_sample)
            return Outputs(qv, v, qz, z, pz, x_mean, qv_swap, qz_swap)
        means = self.decode_many(z, vs, mask)                                # (3, B, T, F)
        x_mean, x_swap = means.split([1, 2])
        x_swap = x_swap.reshape(2 * b, *means.shape[2:])                     # (2B, T, F)
        qv_swap = self.v_posterior(x_swap, mask2)
        v_swap = qv_swap.rsample() if cfg.v_condition else None
        qz_swap, _ = self.z_posterior(x_swap, mask2, v_swap, sample=z_sample)
        return Outputs(qv, v, qz, z, pz, x_mean.squeeze(0), qv_swap, qz_swap)


@dataclasses.dataclass(frozen=True)
class TrainingPass:
    """How a run's training passes are computed: `module` (same signature and Outputs as
    DSAE.forward) and `masked_kl`, the KL_z averaging it is paired with (tsdsae.train_step)."""

    module: nn.Module
    masked_kl: Callable[..., torch.Tensor]


def training_pass(model: DSAE, device: torch.device | str) -> TrainingPass:
    """The pass a trainer runs for `model` on `device`: FastDSAE and the fused masked KL on CPU,
    the plain model and tsdsae.losses.masked_kl_mean elsewhere (on CUDA the plain model runs in
    cuBLAS/cuDNN and needs none of this). MLPs the fast blocks do not cover run plain, said once
    in a warning."""
    if torch.device(device).type != "cpu":
        return TrainingPass(model, losses.masked_kl_mean)
    plain = plain_blocks(model)
    if plain:
        logger.warning("fast CPU pass: %s not Linear -> Tanh, so they run as plain modules "
                       "(slower; the result is the same)", ", ".join(plain))
    return TrainingPass(FastDSAE(model), masked_kl_mean)


__all__ = ["FastDSAE", "TrainingPass", "training_pass", "plain_blocks", "linear",
           "masked_kl_mean"]
