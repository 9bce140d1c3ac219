"""Losses of METHOD s3 and the swap terms of METHOD s4, as pure functions returning named terms.

Averaging is the reference's, on purpose (it sets the effective KL weights 80 / z_dim on KL_z and
about 5T on KL_v relative to a per-sequence ELBO):
    recon = mean_{b, f} [ sum_t m_bt (x - x_hat)^2_btf / sum_t m_bt ]          (plain MSE, no 1/2)
    KL_z  = mean_{b, z} [ sum_t m_bt KL(q(z_t) || p(z_t | z_<t))_btz / sum_t m_bt ]
    KL_v  = mean_{b, v} KL(q(v | x) || p(v))_bv
    loss  = recon + KL_z + KL_v  (+ sum_k w_k swap_k for TS-DSAE); no beta, no annealing.
"""
from __future__ import annotations

import torch
from torch.distributions import Normal

from tsdsae.model.dsae import Outputs, inverse_permutation

TERMS = ("recon", "kl_z", "kl_v", "gswap_v", "gswap_z", "lswap_v", "lswap_z")


def _logvar(d: Normal) -> torch.Tensor | None:
    return getattr(d, "logvar", None)


def gaussian_kl(q: Normal, p: Normal) -> torch.Tensor:
    """Elementwise KL(q || p) of diagonal Gaussians (analytic):
        0.5 (var_q / var_p + (mu_q - mu_p)^2 / var_p - 1 - log(var_q / var_p)),
    from the log-variances where both carry them (tsdsae.model.layers.DiagNormal).
    Elementwise over the broadcast shape of the parameters."""
    lq, lp = _logvar(q), _logvar(p)
    if lq is not None and lp is not None:
        dl = lq - lp
        return 0.5 * (torch.exp(dl) + (q.loc - p.loc).pow(2) * torch.exp(-lp) - 1.0 - dl)
    var_ratio = (q.scale / p.scale).pow(2)
    return 0.5 * (var_ratio + ((q.loc - p.loc) / p.scale).pow(2) - 1.0 - torch.log(var_ratio))


def masked_kl_mean(q: Normal, p: Normal, mask: torch.Tensor) -> torch.Tensor:
    """masked_time_mean(gaussian_kl(q, p), mask) for q, p over (B, T, Z): KL_z's averaging."""
    return masked_time_mean(gaussian_kl(q, p), mask)


def standard_normal_kl(q: Normal) -> torch.Tensor:
    """Elementwise KL(q || N(0, I))."""
    lq = _logvar(q)
    if lq is not None:
        return 0.5 * (torch.exp(lq) + q.loc.pow(2) - 1.0 - lq)
    var = q.scale.pow(2)
    return 0.5 * (var + q.loc.pow(2) - 1.0 - torch.log(var))


def masked_time_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over (batch, feature) of the per-sequence mean over valid frames.

    values (B, T, D), mask (B, T) bool -> scalar. Padding frames contribute nothing.
    """
    m = mask.to(values.dtype)
    per_seq = (values * m.unsqueeze(-1)).sum(dim=1) / m.sum(dim=1, keepdim=True).clamp_min(1.0)
    return per_seq.mean()


def elbo_terms(x: torch.Tensor, mask: torch.Tensor, out: Outputs,
               v_prior: Normal | None = None, masked_kl=masked_kl_mean
               ) -> dict[str, torch.Tensor]:
    """recon, KL_z and KL_v (against N(0, I), or against the informed prior `v_prior`).

    x (B, T, F), mask (B, T), `out` from DSAE.forward. `masked_kl` computes KL_z's masked mean
    (a faster equal function may be passed: tsdsae.model.fast_cpu.masked_kl_mean)."""
    recon = masked_time_mean((x - out.x_mean).pow(2), mask)
    kl_z = masked_kl(out.qz, out.pz, mask)
    kl = standard_normal_kl(out.qv) if v_prior is None else gaussian_kl(out.qv, v_prior)
    return {"recon": recon, "kl_z": kl_z, "kl_v": kl.mean()}


def _rows(d: Normal, index: torch.Tensor | slice) -> Normal:
    if hasattr(d, "rows"):
        return d.rows(index)
    return Normal(d.loc[index], d.scale[index], validate_args=False)


def swap_terms(out: Outputs, mask: torch.Tensor, perms: tuple[torch.Tensor, torch.Tensor],
               masked_kl=masked_kl_mean) -> dict[str, torch.Tensor]:
    """The four swap KL terms of TS-DSAE with the intended targets (METHOD s4).

    `out` comes from DSAE.forward(x, mask, swap_perms=perms), perms = (pi_g, pi_l), two
    independent permutations of the batch:
      gswap_v (w0) = mean_i KL(q(v | x_g[i]) || q(v | x_pi_g(i)))
      gswap_z (w1) = KL(q(z | x_g[i]) || q(z | x_i)),        masked with i's mask
      lswap_v (w2) = mean_i KL(q(v | x_l[i]) || q(v | x_i))
      lswap_z (w3) = KL(q(z | x_l[i]) || q(z | x_pi_l(i))),  masked with pi_l(i)'s mask
    with x_g[i] = decode(z_i, v_pi_g(i)) and x_l[i] = decode(z_pi_l(i), v_i). The model lists
    the local swap at j = pi_l(i) (rows B..2B-1 hold decode(z_j, v_pi_l^-1(j))), so in that order
    the local targets are q(v | x_pi_l^-1(j)) and q(z | x_j) with j's own mask: the same batch
    means, with only (B, V) tensors permuted. Targets are the original pass's posteriors, not
    detached.
    """
    perm_g, perm_l = perms
    b = mask.shape[0]
    qv_g, qv_l = _rows(out.qv_swap, slice(0, b)), _rows(out.qv_swap, slice(b, 2 * b))
    qz_g, qz_l = _rows(out.qz_swap, slice(0, b)), _rows(out.qz_swap, slice(b, 2 * b))
    return {
        "gswap_v": gaussian_kl(qv_g, _rows(out.qv, perm_g)).mean(),
        "gswap_z": masked_kl(qz_g, out.qz, mask),
        "lswap_v": gaussian_kl(qv_l, _rows(out.qv, inverse_permutation(perm_l))).mean(),
        "lswap_z": masked_kl(qz_l, out.qz, mask),
    }


def total_loss(terms: dict[str, torch.Tensor], swap_weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """recon + KL_z + KL_v + sum_k w_k swap_k (swap terms only where present)."""
    loss = terms["recon"] + terms["kl_z"] + terms["kl_v"]
    for w, name in zip(swap_weights, TERMS[3:]):
        if name in terms and w:
            loss = loss + w * terms[name]
    return loss
