import itertools

import pytest
import torch
from torch.distributions import Normal

from tsdsae.config import ModelConfig
from tsdsae.losses import (elbo_terms, gaussian_kl, masked_time_mean,
                           standard_normal_kl, swap_terms)
from tsdsae.model import DSAE, count_parameters
from tsdsae.model.layers import SequenceEncoder, masked_mean, normal, reverse_padded

# distinct tiny sizes so that a swapped axis cannot pass: B 2, T 3, F 4, Z 5, V 6
B, T, F, Z, V = 2, 3, 4, 5, 6


def tiny(**kw) -> ModelConfig:
    return ModelConfig(input_dim=F, z_dim=Z, v_dim=V, encoder_hidden=(7,), transition_hidden=(9,),
                       decoder_hidden=(11,), **kw)


OPTIONS = list(itertools.product(("^", ">", "<", "><"), ("^", "><"), ("x", ">", ">>"),
                                 ("x", ">", ">>"), ("^", "><"), (False, True)))


@pytest.mark.parametrize("z_dim, total", [(8, 47_120), (16, 50_224), (32, 56_432)])
def test_paper_parameter_counts(z_dim, total):
    assert count_parameters(DSAE(ModelConfig(z_dim=z_dim))) == total


def test_stage_one_trainable_set_is_global_encoder_and_decoder():
    model = DSAE(ModelConfig(z_dim=32))
    model.set_trainable({"global", "decoder"})
    assert count_parameters(model, trainable_only=True) == 23_920


def test_every_option_gives_the_right_shapes_and_ignores_padding():
    torch.manual_seed(0)
    x = torch.randn(B, T, F)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    for zf, vp, zpost, zprior, lik, vcond in OPTIONS:
        cfg = tiny(z_feature=zf, v_posterior=vp, z_posterior=zpost, z_prior=zprior,
                   likelihood=lik, v_condition=vcond)
        model = DSAE(cfg)
        torch.manual_seed(1)
        perms = (torch.tensor([1, 0]), torch.tensor([1, 0]))
        out = model(x, mask, swap_perms=perms)
        assert out.qv.loc.shape == out.v.shape == (B, V), cfg
        assert out.qz.loc.shape == out.z.shape == out.pz.loc.shape == (B, T, Z), cfg
        assert out.x_mean.shape == (B, T, F), cfg
        assert out.qv_swap.loc.shape == (2 * B, V) and out.qz_swap.loc.shape == (2 * B, T, Z), cfg
        terms = elbo_terms(x, mask, out)
        # a padding frame changes nothing (backward LSTMs reverse within each length)
        x2 = x.clone()
        x2[1, 2] = 100.0
        torch.manual_seed(1)
        terms2 = elbo_terms(x2, mask, model(x2, mask, swap_perms=perms))
        for k in terms:
            assert torch.allclose(terms[k], terms2[k], atol=1e-5), (cfg, k)


# Parameter counts of the reference's code for each option set at z_dim 16 (v_dim 16, encoder and
# decoder (64, 64), transition (32, 32)); the other options at the paper's defaults.
REFERENCE_COUNTS = [
    ({}, 50_224),
    ({"z_feature": ">"}, 111_536),
    ({"z_feature": "<"}, 111_536),
    ({"z_feature": "><"}, 214_960),
    ({"v_posterior": "><"}, 214_960),
    ({"z_posterior": ">"}, 52_848),
    ({"z_posterior": ">>"}, 72_240),
    ({"z_prior": "x"}, 34_320),
    ({"z_prior": ">"}, 36_976),
    ({"likelihood": "><"}, 193_456),
    ({"v_condition": True}, 50_736),
    ({"v_condition": True, "z_posterior": ">"}, 53_360),
    ({"v_condition": True, "z_posterior": ">>"}, 74_288),
]


@pytest.mark.parametrize("options, total", REFERENCE_COUNTS,
                         ids=[",".join(f"{k}={v}" for k, v in o.items()) or "paper"
                              for o, _ in REFERENCE_COUNTS])
def test_every_option_has_the_reference_parameter_count(options, total):
    assert count_parameters(DSAE(ModelConfig(z_dim=16, **options))) == total


def _copy_lstm_weights(encoder: SequenceEncoder, lstm: torch.nn.LSTM) -> None:
    """The reference's one nn.LSTM's weights into our per-layer, per-direction modules."""
    for direction, suffix in (("forward", ""), ("backward", "_reverse")):
        for layer, ours in enumerate(getattr(encoder, f"{direction}_layers", [])):
            if direction == "backward" and encoder.kind == "<":
                suffix = ""                     # a one-way reference LSTM run on the reversal
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ours, f"{name}_l0").data.copy_(getattr(lstm, f"{name}_l{layer}{suffix}"))


@pytest.mark.parametrize("kind", [">", "<", "><"])
def test_recurrent_encoders_are_the_reference_lstm(kind):
    """'><' is one nn.LSTM(bidirectional=True, num_layers=2) whose layer 2 reads both directions
    of layer 1, output the mean of the last layer's directions; with unequal lengths each
    sequence runs as if alone (what packing the batch gives)."""
    torch.manual_seed(0)
    hidden = (7, 7)
    encoder = SequenceEncoder(kind, F, hidden)
    lstm = torch.nn.LSTM(F, hidden[0], num_layers=len(hidden), batch_first=True,
                         bidirectional=kind == "><")
    _copy_lstm_weights(encoder, lstm)
    x = torch.randn(B, T + 3, F)
    lengths = torch.tensor([T + 3, 2])
    mask = torch.arange(T + 3)[None] < lengths[:, None]
    ours = encoder(x, mask)
    assert ours.shape == (B, T + 3, hidden[0])
    for i, n in enumerate(lengths.tolist()):
        xi = x[i:i + 1, :n]
        ref, _ = lstm(xi.flip(1) if kind == "<" else xi)
        ref = ref.flip(1) if kind == "<" else ref
        if kind == "><":
            ref = 0.5 * (ref[..., :hidden[0]] + ref[..., hidden[0]:])
        torch.testing.assert_close(ours[i, :n], ref[0])


def test_masked_mean_ignores_padding_and_empty_sequences_give_zeros():
    h = torch.arange(B * T * 2, dtype=torch.float32).view(B, T, 2)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert masked_mean(h, mask).tolist() == [[1.0, 2.0], [0.0, 0.0]]


def test_kl_of_a_distribution_with_itself_is_zero():
    q = normal(torch.randn(B, T, Z), torch.randn(B, T, Z))
    assert torch.allclose(gaussian_kl(q, q), torch.zeros(B, T, Z), atol=1e-6)
    std = normal(torch.zeros(B, Z), torch.zeros(B, Z))
    assert torch.allclose(standard_normal_kl(std), torch.zeros(B, Z))
    p = normal(torch.zeros(B, T, Z), torch.zeros(B, T, Z))
    assert torch.allclose(gaussian_kl(q, p), standard_normal_kl(q), atol=1e-5)


def test_kl_from_log_variances_matches_the_scale_form():
    torch.manual_seed(0)
    q = normal(torch.randn(B, T, Z), torch.randn(B, T, Z))
    p = normal(torch.randn(B, T, Z), torch.randn(B, T, Z))
    plain = lambda d: Normal(d.loc, d.scale, validate_args=False)     # noqa: E731
    assert torch.allclose(gaussian_kl(q, p), gaussian_kl(plain(q), plain(p)), rtol=1e-5)
    assert torch.allclose(standard_normal_kl(q), standard_normal_kl(plain(q)), rtol=1e-5)
    # same draws as torch's Normal
    torch.manual_seed(1)
    a = q.rsample()
    torch.manual_seed(1)
    assert torch.allclose(a, plain(q).rsample())


def test_masked_time_mean_is_the_reference_averaging():
    values = torch.arange(B * T * 1, dtype=torch.float32).view(B, T, 1)   # [[0,1,2],[3,4,5]]
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # per sequence: (0+1+2)/3 = 1, 3/1 = 3 ; mean over batch = 2
    assert masked_time_mean(values, mask).item() == pytest.approx(2.0)


def test_reverse_padded_reverses_within_length():
    x = torch.arange(8.0).view(2, 4, 1)
    out = reverse_padded(x, torch.tensor([4, 2]))
    assert out[:, :, 0].tolist() == [[3, 2, 1, 0], [5, 4, 6, 7]]
    assert torch.equal(reverse_padded(out, torch.tensor([4, 2])), x)


def test_snapshot_is_not_a_parameter_and_gets_no_gradient():
    model = DSAE(tiny())
    n = count_parameters(model)
    model.take_snapshot()
    assert count_parameters(model) == n
    assert not any(k.startswith("_snapshot") for k in model.state_dict())
    snap_ids = {id(p) for p in model._snapshot.parameters()}
    assert not snap_ids & {id(p) for p in model.parameters()}
    before = model.snapshot_state_dict()
    x, mask = torch.randn(B, T, F), torch.ones(B, T, dtype=torch.bool)
    out = model(x, mask)
    loss = elbo_terms(x, mask, out, model.informed_prior(x, mask))["kl_v"]
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model._snapshot.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.snapshot_state_dict().items())


def _kl_z(q_loc, q_scale, p_loc, p_scale, m):
    kl = gaussian_kl(normal(q_loc, 2 * q_scale.log()), normal(p_loc, 2 * p_scale.log()))
    return (kl * m[:, None]).sum(0) / m.sum()


def test_swap_terms_use_the_intended_targets_with_unequal_lengths():
    """Compares with a direct, clip-by-clip reading of METHOD s4. The reference's mix-up of the
    targets of w1 and w2 gives different numbers here because the clips differ in length."""
    torch.manual_seed(0)
    b, t = 4, 6
    cfg = ModelConfig(input_dim=F, z_dim=Z, v_dim=V, encoder_hidden=(7,), transition_hidden=(9,),
                      decoder_hidden=(11,))
    model = DSAE(cfg)
    x = torch.randn(b, t, F)
    lengths = torch.tensor([6, 2, 4, 3])
    mask = torch.arange(t)[None] < lengths[:, None]
    perm_g, perm_l = torch.tensor([2, 3, 1, 0]), torch.tensor([1, 3, 0, 2])
    out = model(x, mask, swap_perms=(perm_g, perm_l))
    ours = swap_terms(out, mask, (perm_g, perm_l))

    qv, qz, z, v = out.qv, out.qz, out.z, out.v
    w = {k: [] for k in ("gswap_v", "gswap_z", "lswap_v", "lswap_z", "mixup_z", "mixup_v")}
    for i in range(b):
        j = int(perm_g[i])
        # global swap: decode(z_i, v_pi(i)), masked with i
        xg = model.decode(z[i:i + 1], v[j:j + 1], mask[i:i + 1])
        qvg = model.v_posterior(xg, mask[i:i + 1])
        qzg, _ = model.z_posterior(xg, mask[i:i + 1], sample=False)
        w["gswap_v"].append(gaussian_kl(qvg, normal(qv.loc[j:j + 1], 2 * qv.scale[j:j + 1].log())).mean())
        w["gswap_z"].append(_kl_z(qzg.loc[0], qzg.scale[0], qz.loc[i], qz.scale[i], mask[i].float()).mean())
        w["mixup_z"].append(_kl_z(qzg.loc[0], qzg.scale[0], qz.loc[j], qz.scale[j], mask[i].float()).mean())
        # local swap: decode(z_pi(i), v_i), masked with pi(i), its own permutation
        j = int(perm_l[i])
        xl = model.decode(z[j:j + 1], v[i:i + 1], mask[j:j + 1])
        qvl = model.v_posterior(xl, mask[j:j + 1])
        qzl, _ = model.z_posterior(xl, mask[j:j + 1], sample=False)
        w["lswap_v"].append(gaussian_kl(qvl, normal(qv.loc[i:i + 1], 2 * qv.scale[i:i + 1].log())).mean())
        w["mixup_v"].append(gaussian_kl(qvl, normal(qv.loc[j:j + 1], 2 * qv.scale[j:j + 1].log())).mean())
        w["lswap_z"].append(_kl_z(qzl.loc[0], qzl.scale[0], qz.loc[j], qz.scale[j], mask[j].float()).mean())
    ref = {k: torch.stack(v).mean() for k, v in w.items()}
    for k in ("gswap_v", "gswap_z", "lswap_v", "lswap_z"):
        assert torch.allclose(ours[k], ref[k], rtol=1e-4, atol=1e-6), k
    assert not torch.allclose(ours["gswap_z"], ref["mixup_z"], rtol=1e-2)
    assert not torch.allclose(ours["lswap_v"], ref["mixup_v"], rtol=1e-2)


def test_probes_swap_the_right_latents():
    torch.manual_seed(0)
    model = DSAE(tiny())
    xa, xb = torch.randn(B, T, F), torch.randn(B, T + 2, F)
    ma, mb = torch.ones(B, T, dtype=torch.bool), torch.ones(B, T + 2, dtype=torch.bool)
    va, za = model.encode_means(xa, ma)
    vb, zb = model.encode_means(xb, mb)
    assert torch.allclose(model.swap_global(xa, ma, xb, mb), model.decode(za, vb))
    assert model.swap_global(xa, ma, xb, mb).shape == (B, T, F)
    assert torch.allclose(model.swap_local(xa, ma, xb, mb), model.decode(zb, va))
    assert torch.allclose(model.reconstruct(xa, ma), model.decode(za, va))


# state_dict keys of the paper's architecture as checkpoints wrote them before the factor modules
# took their present form (z_prior '>>' and '>'): only these differ from today's names
LEGACY_KEYS = {
    ">>": [*[f"z_prior.net.layers.0.{w}_l{i}" for i in (0, 1)
             for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")],
           "likelihood.net.layers.0.weight", "likelihood.net.layers.0.bias",
           "likelihood.net.layers.2.weight", "likelihood.net.layers.2.bias"],
    ">": ["z_prior.net.layers.0.weight", "z_prior.net.layers.0.bias",
          "z_prior.net.layers.2.weight", "z_prior.net.layers.2.bias",
          "likelihood.net.layers.0.weight", "likelihood.net.layers.0.bias",
          "likelihood.net.layers.2.weight", "likelihood.net.layers.2.bias"],
}


@pytest.mark.parametrize("z_prior", [">>", ">"])
def test_checkpoints_with_earlier_key_names_still_load(z_prior):
    torch.manual_seed(0)
    model = DSAE(ModelConfig(z_prior=z_prior))
    state = model.state_dict()
    renamed = [k for k in state if k.startswith(("likelihood.net.", "z_prior.transition."))]
    assert len(renamed) == len(LEGACY_KEYS[z_prior])
    # the earlier names, in the same order as today's (module order did not change)
    old = dict(zip(LEGACY_KEYS[z_prior], (state[k] for k in renamed)))
    old.update({k: v for k, v in state.items() if k not in renamed})
    fresh = DSAE(ModelConfig(z_prior=z_prior))
    fresh.load_state_dict(old)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**state, "z_prior.net.extra": torch.zeros(1)})
