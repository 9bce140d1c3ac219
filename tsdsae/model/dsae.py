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

This is the definition. Its blocks (MLPs, Gaussian heads, the output linear) are built from
`blocks` (tsdsae.model.layers.Blocks): the plain torch layers, or tsdsae.model.fast_cpu's
CPU_BLOCKS, which compute the same functions of the same parameters faster on CPU (tested equal);
nothing here depends on which.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from torch.distributions import Normal

from tsdsae.config import ModelConfig
from tsdsae.model.layers import PLAIN, Blocks, DiagNormal, normal
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

    def __init__(self, cfg: ModelConfig, blocks: Blocks = PLAIN):
        super().__init__()
        self.cfg, self.blocks = cfg, blocks
        self.v_posterior = VPosterior(cfg, blocks)
        self.z_posterior = ZPosterior(cfg, blocks)
        self.z_prior = ZPrior(cfg, blocks)
        self.likelihood = Likelihood(cfg, blocks)
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

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict; also reads the key names that checkpoints of the paper's
        architecture had before the factor modules took their present form (see
        `legacy_key_names`)."""
        return super().load_state_dict(self.legacy_key_names(state_dict), strict, assign)

    def legacy_key_names(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` with earlier key names renamed to this model's (same tensors):
        likelihood.net.layers.* -> likelihood.net.mlp.layers.* (MLP decoder), and the z prior's
        network z_prior.net.layers.0.* -> z_prior.transition.* (LSTM) or
        z_prior.net.layers.* -> z_prior.transition.layers.* (MLP)."""
        renames = []
        if self.cfg.likelihood == "^":
            renames.append(("likelihood.net.layers.", "likelihood.net.mlp.layers."))
        if self.cfg.z_prior == ">>":
            renames.append(("z_prior.net.layers.0.", "z_prior.transition."))
        elif self.cfg.z_prior == ">":
            renames.append(("z_prior.net.layers.", "z_prior.transition.layers."))
        if not any(k.startswith(old) for k in state for old, _ in renames):
            return state
        out = {}
        for k, v in state.items():
            for old, new in renames:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            out[k] = v
        return out

    def _apply(self, fn, recurse=True):
        # keep the snapshot on the same device/dtype as the model (it is not a registered child)
        super()._apply(fn, recurse)
        if self._snapshot is not None:
            self._snapshot._apply(fn, recurse)
        return self

    @torch.no_grad()
    def informed_prior(self, x: torch.Tensor, mask: torch.Tensor) -> DiagNormal:
        """q_snapshot(v | x): (B, V), evaluated without autograd."""
        if self._snapshot is None:
            raise RuntimeError("no snapshot: the informed prior exists only after the stage switch")
        return self._snapshot(x, mask)

    # -- passes --------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, mask: torch.Tensor, sample: bool = True
               ) -> tuple[DiagNormal, torch.Tensor, DiagNormal, torch.Tensor]:
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
        return self.likelihood(z, v, mask).mean

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                swap_perms: tuple[torch.Tensor, torch.Tensor] | None = None) -> Outputs:
        """The training pass; with `swap_perms` = (pi_g, pi_l), two permutations of the batch,
        also both swaps (METHOD s4), decoded in one batch of 3B and re-encoded in one of 2B:
          rows 0..B-1  (global swap): x_g[i] = decode(z_i, v_pi_g(i))
          rows B..2B-1 (local swap):  x_l'[j] = decode(z_j, v_pi_l^-1(j))
        x_l'[j] is METHOD's local swap x_l[i] = decode(z_pi_l(i), v_i) listed at j = pi_l(i)
        instead of at i. Every swap term is a batch mean, so the order is immaterial; this way
        only the (B, V) tensors are permuted and each swap keeps the mask of the clip whose z it
        decodes. tsdsae.losses.swap_terms pairs the rows with their targets.
        """
        qv = self.v_posterior(x, mask)
        v = qv.rsample()
        qz, z = self.z_posterior(x, mask, v)
        pz = self.z_prior(z)
        if swap_perms is None:
            return Outputs(qv, v, qz, z, pz, self.decode(z, v, mask))
        perm_g, perm_l = swap_perms
        b = x.shape[0]
        v_pairs = torch.cat([v, v[perm_g], v[inverse_permutation(perm_l)]])     # (3B, V)
        means = self.likelihood(z.repeat(3, 1, 1), v_pairs, mask.repeat(3, 1)).mean
        x_mean, x_swap = means[:b], means[b:]                                  # (B|2B, T, F)
        qv_swap, qz_swap = self.reencode_swaps(x_swap, mask.repeat(2, 1))
        return Outputs(qv, v, qz, z, pz, x_mean, qv_swap, qz_swap)

    def reencode_swaps(self, x_swap: torch.Tensor, mask: torch.Tensor
                       ) -> tuple[DiagNormal, DiagNormal]:
        """q(v | x_swap) (2B, V) and q(z | x_swap) (2B, T, Z) of the swapped spectrograms.
        The re-encoding samples (METHOD s4); its z samples feed only an autoregressive
        posterior's next step, and its v sample only a v-conditioned z posterior."""
        qv_swap = self.v_posterior(x_swap, mask)
        v_swap = qv_swap.rsample() if self.cfg.v_condition else None
        qz_swap, _ = self.z_posterior(x_swap, mask, v_swap, sample=self.cfg.z_posterior != "x")
        return qv_swap, qz_swap

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


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """pi^-1 of a permutation pi (N,) of 0..N-1: pi^-1[pi[i]] = i."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


__all__ = ["DSAE", "Outputs", "count_parameters", "inverse_permutation", "normal"]
