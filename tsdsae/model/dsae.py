"""The DSAE family: a sequential VAE with one global latent v and per-frame local latents z_1:T.

Generative model (METHOD s2):
    p(x_1:T, z_1:T, v) = p(v) prod_t p(z_t | z_<t) p(x_t | z_t, v)
    p(v) = N(0, I)  (stage 2 of the two-stage models: the informed prior q_snapshot(v | x))
    p(z_1) = N(0, I),  p(z_t | z_<t)  ->  tsdsae.model.z_prior.ZPrior
    p(x_t | z_t, v)                   ->  tsdsae.model.likelihood.Likelihood
Inference:
    q(v | x_1:T)                      ->  tsdsae.model.v_posterior.VPosterior   ("global")
    q(z_1:T | x_1:T [, v])            ->  tsdsae.model.z_posterior.ZPosterior   ("local", with
                                          the z feature network)
Shapes: x (B, T, F), mask (B, T) bool, v (B, V), z (B, T, Z).

Module groups used by the stage schedule (tsdsae.schedule): "global" = the v posterior,
"local" = z posterior (with its feature net) and z prior, "decoder" = the likelihood.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from torch.distributions import Normal

from tsdsae.config import ModelConfig
from tsdsae.model.layers import linear, linear_on_half, normal, on_half
from tsdsae.model.likelihood import Likelihood
from tsdsae.model.v_posterior import VPosterior
from tsdsae.model.z_posterior import ZPosterior
from tsdsae.model.z_prior import ZPrior


@dataclasses.dataclass
class Outputs:
    """One training/validation pass. Distributions carry (B, ...) parameters.

    qv (B, V), v (B, V) sample, qz (B, T, Z), z (B, T, Z) sample, pz (B, T, Z) prior,
    x_mean (B, T, F) decoded mean. With swaps: qv_swap (2B, V) and qz_swap (2B, T, Z), the
    re-encoded global swaps (rows 0..B-1) and local swaps (rows B..2B-1), see `DSAE.forward`.
    """

    qv: Normal
    v: torch.Tensor
    qz: Normal
    z: torch.Tensor
    pz: Normal
    x_mean: torch.Tensor
    qv_swap: Normal | None = None
    qz_swap: Normal | None = None


class DSAE(nn.Module):
    GROUPS = {"global": ("v_posterior",), "local": ("z_posterior", "z_prior"),
              "decoder": ("likelihood",)}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.v_posterior = VPosterior(cfg)
        self.z_posterior = ZPosterior(cfg)
        self.z_prior = ZPrior(cfg)
        self.likelihood = Likelihood(cfg)
        # The informed prior: a frozen copy of v_posterior taken at the stage switch. Kept out of
        # the module tree (no parameters, no optimiser entry, never any gradient); its tensors
        # travel in checkpoints through `snapshot_state_dict`.
        self._snapshot: VPosterior | None = None

    # -- groups and the snapshot -------------------------------------------------------------

    def group_parameters(self, group: str) -> list[nn.Parameter]:
        return [p for name in self.GROUPS[group] for p in getattr(self, name).parameters()]

    def set_trainable(self, groups: set[str]) -> None:
        """requires_grad on for the named groups, off (and grads cleared) for the others."""
        for group in self.GROUPS:
            on = group in groups
            for p in self.group_parameters(group):
                p.requires_grad_(on)
                if not on:
                    p.grad = None

    @property
    def has_snapshot(self) -> bool:
        return self._snapshot is not None

    def take_snapshot(self) -> None:
        """Freeze a copy of the global encoder as the informed prior p(v | x) (METHOD s4)."""
        snap = copy.deepcopy(self.v_posterior)
        for p in snap.parameters():
            p.requires_grad_(False)
            p.grad = None
        # object.__setattr__: keep it out of nn.Module's registry (no parameters, no state_dict)
        object.__setattr__(self, "_snapshot", snap.eval())

    def snapshot_state_dict(self) -> dict[str, torch.Tensor] | None:
        return None if self._snapshot is None else {
            k: v.detach().clone() for k, v in self._snapshot.state_dict().items()}

    def load_snapshot_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is None:
            object.__setattr__(self, "_snapshot", None)
            return
        self.take_snapshot()
        self._snapshot.load_state_dict(state)

    def _apply(self, fn, recurse=True):
        # keep the snapshot on the same device/dtype as the model (it is not a registered child)
        super()._apply(fn, recurse)
        if self._snapshot is not None:
            self._snapshot._apply(fn, recurse)
        return self

    @torch.no_grad()
    def informed_prior(self, x: torch.Tensor, mask: torch.Tensor) -> Normal:
        """q_snapshot(v | x): (B, V), evaluated without autograd."""
        if self._snapshot is None:
            raise RuntimeError("no snapshot: the informed prior exists only after the stage switch")
        return self._snapshot(x, mask)

    # -- passes --------------------------------------------------------------------------------

    # With the paper's frame-wise MLP encoders (and MLP likelihood), re-encoding a swap
    # decode(z, v) = W_out h + b_out needs only each encoder's first layer of it:
    #   W_enc (W_out h + b_out) + b_enc = (W_enc W_out) h + (W_enc b_out + b_enc),
    # so the decoder's output layer is folded into the encoders' first layers and the swapped
    # spectrograms (2B, T, F) are never materialised. Same parameters and maths (up to float
    # rounding); other options take the generic path.

    @property
    def _fused_encoders(self) -> bool:
        return self.cfg.v_posterior == "^" and self.cfg.z_feature == "^"

    def _reencode_decoded(self, s: torch.Tensor, mask: torch.Tensor, sample: bool,
                          v_sample: bool) -> tuple[Normal, Normal]:
        """q(v | x), q(z | x) of x = likelihood.out(2s - 1), from the sigmoid form s of the
        decoder's last hidden layer (tsdsae.model.layers)."""
        out = self.likelihood.out
        pre = []
        for first in (self.v_posterior.encoder.mlp.first, self.z_posterior.features.mlp.first):
            w, b = on_half(first.weight @ out.weight, first.weight @ out.bias + first.bias)
            pre.append(linear(s, 2.0 * w, 2.0 * b))     # twice the first layer's output
        qv = self.v_posterior.from_first(pre[0], mask)
        v = qv.rsample() if v_sample else None
        qz, _ = self.z_posterior.from_first(pre[1], v, sample=sample)
        return qv, qz

    def encode(self, x: torch.Tensor, mask: torch.Tensor, sample: bool = True
               ) -> tuple[Normal, torch.Tensor, Normal, torch.Tensor]:
        """q(v | x), v, q(z | x, v), z: samples when `sample`, else posterior means."""
        qv = self.v_posterior(x, mask)
        v = qv.rsample() if sample else qv.mean
        qz, z = self.z_posterior(x, mask, v, sample=sample)
        return qv, v, qz, z

    def decode(self, z: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Mean of p(x | z, v): z (B, T, Z), v (B, V) -> (B, T, F)."""
        if mask is None:
            mask = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
        return self.likelihood.decode_many(z, v.unsqueeze(0), mask).squeeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                swap_perm: torch.Tensor | None = None) -> Outputs:
        """The training pass; with `swap_perm` (a permutation pi of the batch) also both swaps.

        Swaps, computed in one batched decode + one batched re-encode:
          rows 0..B-1  (global swap): x_g[i] = decode(z_i, v_pi(i))
          rows B..2B-1 (local swap):  x_l'[j] = decode(z_j, v_pi^-1(j))
        x_l'[j] is METHOD's local swap decode(z_pi(i), v_i) listed at j = pi(i) instead of at i.
        Every swap term is a mean over the batch, so the order is immaterial, and this way only
        the small (B, V) tensors are permuted, never the (B, T, Z) latents; each swap keeps the
        mask of the clip whose z it decodes. See tsdsae.losses.swap_terms for the targets.
        """
        qv, v, qz, z = self.encode(x, mask, sample=True)
        pz = self.z_prior(z)
        if swap_perm is None:
            return Outputs(qv, v, qz, z, pz, self.decode(z, v, mask))
        inv = torch.empty_like(swap_perm)
        inv[swap_perm] = torch.arange(swap_perm.numel(), device=swap_perm.device)
        vs = torch.stack([v, v[swap_perm], v[inv]])                           # (3, B, V)
        b = x.shape[0]
        mask2 = mask.repeat(2, 1)
        # Only an autoregressive or v-conditioned posterior needs the re-encoding's samples.
        needs_sample = self.cfg.z_posterior != "x" or self.cfg.v_condition
        if self._fused_encoders and self.cfg.likelihood == "^":
            hidden = self.likelihood.hidden_many(z, vs)                       # (3, B, T, H), sigmoid form
            h_main, h_swap = hidden.split([1, 2])
            x_mean = linear_on_half(h_main.squeeze(0), self.likelihood.out)   # (B, T, F)
            qv_swap, qz_swap = self._reencode_decoded(
                h_swap.reshape(2 * b, *h_swap.shape[2:]), mask2, needs_sample,
                self.cfg.v_condition)
            return Outputs(qv, v, qz, z, pz, x_mean, qv_swap, qz_swap)
        means = self.likelihood.decode_many(z, vs, mask)                      # (3, B, T, F)
        # split (not indexing): its backward concatenates instead of zero-filling (3, B, T, F)
        x_mean, x_swap = means.split([1, 2])
        x_swap = x_swap.reshape(2 * b, *means.shape[2:])                      # (2B, T, F)
        qv_swap = self.v_posterior(x_swap, mask2)
        v_swap = qv_swap.rsample() if self.cfg.v_condition else None
        qz_swap, _ = self.z_posterior(x_swap, mask2, v_swap, sample=needs_sample)
        return Outputs(qv, v, qz, z, pz, x_mean.squeeze(0), qv_swap, qz_swap)

    # -- disentanglement probes (posterior means) ---------------------------------------------

    @torch.no_grad()
    def encode_means(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means: v (B, V), z (B, T, Z)."""
        _, v, _, z = self.encode(x, mask, sample=False)
        return v, z

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        v, z = self.encode_means(x, mask)
        return self.decode(z, v, mask)

    @torch.no_grad()
    def swap_global(self, x_a, mask_a, x_b, mask_b) -> torch.Tensor:
        """decode(z_a, v_b): a's melody with b's global factor (timbre). (B, T_a, F)."""
        _, z_a = self.encode_means(x_a, mask_a)
        v_b, _ = self.encode_means(x_b, mask_b)
        return self.decode(z_a, v_b, mask_a)

    @torch.no_grad()
    def swap_local(self, x_a, mask_a, x_b, mask_b) -> torch.Tensor:
        """decode(z_b, v_a): b's melody with a's global factor (timbre). (B, T_b, F)."""
        return self.swap_global(x_b, mask_b, x_a, mask_a)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["DSAE", "Outputs", "count_parameters", "normal"]
