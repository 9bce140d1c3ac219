"""A model built from tsdsae.model.fast_cpu's CPU blocks computes the plain model's training
pass: same parameters, same values, same gradients."""
import pytest
import torch
from torch import nn
from torch.distributions import Normal

from tsdsae import losses
from tsdsae.config import ModelConfig
from tsdsae.model import DSAE, fast_cpu
from tsdsae.model.layers import PLAIN, normal
from tsdsae.train_step import loss_terms
from tsdsae.schedule import plan

# distinct tiny sizes, two layers everywhere (a BiLSTM's layer 2 reads both directions)
B, T, F, Z, V = 3, 5, 4, 6, 2

# the option sets of the parameter-count table (tests/test_model.py), plus '<'
OPTION_SETS = [{}, {"z_feature": ">"}, {"z_feature": "<"}, {"z_feature": "><"},
               {"v_posterior": "><"}, {"z_posterior": ">"}, {"z_posterior": ">>"},
               {"z_prior": "x"}, {"z_prior": ">"}, {"likelihood": "><"}, {"v_condition": True},
               {"v_condition": True, "z_posterior": ">"},
               {"v_condition": True, "z_posterior": ">>"}]


def tiny(**kw) -> ModelConfig:
    return ModelConfig(input_dim=F, z_dim=Z, v_dim=V, encoder_hidden=(7, 7),
                       transition_hidden=(9, 9), decoder_hidden=(11, 11), **kw)


def _twins(cfg: ModelConfig, dtype=torch.float64):
    """The plain model and the CPU-blocks model with the same weights (one state_dict)."""
    torch.manual_seed(0)
    model = DSAE(cfg).to(dtype)
    torch.manual_seed(0)
    fast = DSAE(cfg, fast_cpu.CPU_BLOCKS).to(dtype)
    for (name, a), (_, b) in zip(model.state_dict().items(), fast.state_dict().items()):
        assert torch.equal(a, b), name                        # the same initialisation
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in fast.named_parameters()]
    return model, fast


def _loss(runner, model, x, mask, perms, masked_kl, v_prior):
    torch.manual_seed(5)                  # the same draws for both
    out = runner(x, mask, swap_perms=perms)
    terms = losses.elbo_terms(x, mask, out, v_prior, masked_kl)
    if perms is not None:
        terms.update(losses.swap_terms(out, mask, perms, masked_kl))
    return out, terms, losses.total_loss(terms)


def _dists(out):
    got = {"v": out.v, "z": out.z, "x_mean": out.x_mean}
    for name in ("qv", "qz", "pz", "qv_swap", "qz_swap"):
        d = getattr(out, name)
        if d is not None:
            got[name + ".loc"], got[name + ".logvar"] = d.loc, d.logvar
    return got


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(
    f"{k}={v}" for k, v in o.items()) or "paper")
def test_fast_pass_equals_the_plain_model_values_and_every_gradient(options):
    model, fast = _twins(tiny(**options))
    params, fast_params = list(model.parameters()), list(fast.parameters())
    x = torch.randn(B, T, F, dtype=torch.float64)
    v_prior = normal(torch.randn(B, V, dtype=torch.float64), torch.randn(B, V, dtype=torch.float64))
    perms = (torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0]))
    for lengths in ([T, T, T], [T, 2, 4]):
        mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
        for swaps, prior in ((None, None), (perms, v_prior)):
            ref_out, ref_terms, ref = _loss(model, model, x, mask, swaps, losses.masked_kl_mean,
                                            prior)
            out, terms, loss = _loss(fast, fast, x, mask, swaps, fast_cpu.masked_kl_mean, prior)
            where = (options, lengths, swaps is not None)
            ref_vals, vals = _dists(ref_out), _dists(out)
            assert ref_vals.keys() == vals.keys(), where
            for k in ref_vals:
                torch.testing.assert_close(vals[k], ref_vals[k], rtol=1e-12, atol=1e-12,
                                           msg=lambda m: f"{where} {k}: {m}")
            assert terms.keys() == ref_terms.keys()
            for k in ref_terms:
                torch.testing.assert_close(terms[k], ref_terms[k], rtol=1e-12, atol=1e-13)
            ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
            grads = torch.autograd.grad(loss, fast_params, allow_unused=True)
            for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
                assert (a is None) == (b is None), (where, name)
                if b is not None:
                    assert b.abs().sum() > 0 or name.startswith("z_prior") and swaps is None, (
                        where, name)
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12,
                                               msg=lambda m: f"{where} {name}: {m}")


def test_fast_training_step_matches_the_plain_step_in_float32_with_onednn_linears():
    """The paper's sizes at a few thousand rows: the oneDNN linears run, float32 rounding only."""
    model, fast = _twins(ModelConfig(z_dim=8), torch.float32)
    x = torch.randn(4, 600, 80) * 3 - 5
    mask = torch.arange(600)[None] < torch.tensor([600, 600, 420, 517])[:, None]
    model.take_snapshot()
    fast.take_snapshot()
    stage2 = plan("ts_dsae", 1, 1)
    torch.manual_seed(3)
    ref, ref_terms = loss_terms(model, x, mask, stage2)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.manual_seed(3)
    loss, terms = loss_terms(fast, x, mask, stage2, masked_kl=fast_cpu.masked_kl_mean)
    assert any("OneDNN" in name for name in _graph_nodes(loss))
    assert not any("OneDNN" in name for name in _graph_nodes(ref))
    grads = torch.autograd.grad(loss, list(fast.parameters()))
    for k in ref_terms:
        torch.testing.assert_close(terms[k], ref_terms[k], rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def _graph_nodes(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("bias, transposed", [(True, False), (False, True)])
def test_cpu_linear_runs_in_onednn_and_matches_f_linear(bias, transposed):
    torch.manual_seed(0)
    x = torch.randn(3, 1000, F)                       # 3000 rows: above the oneDNN threshold
    if transposed:                                    # a non-contiguous input
        x = torch.randn(3, F, 1000).transpose(1, 2)
    x.requires_grad_(True)
    w = torch.randn(V, F, requires_grad=True)
    b = torch.randn(V, requires_grad=True) if bias else None
    g = torch.randn(3, 1000, V)
    y = fast_cpu.linear(x, w, b)
    assert "OneDNN" in type(y.grad_fn).__name__
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g)
    y_ref = torch.nn.functional.linear(x, w, b)
    refs = torch.autograd.grad(y_ref, [t for t in (x, w, b) if t is not None], g)
    assert y.shape == (3, 1000, V) and torch.allclose(y, y_ref, atol=1e-5)
    for got, ref in zip(grads, refs):
        assert got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-5, atol=1e-3)


def test_fused_masked_kl_matches_the_composed_loss_and_its_gradients():
    torch.manual_seed(0)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    params = [torch.randn(2, 3, Z, dtype=torch.float64, requires_grad=True) for _ in range(4)]

    def fused(mq, lq, mp, lp):
        return fast_cpu.masked_kl_mean(normal(mq, lq), normal(mp, lp), mask)

    def composed(mq, lq, mp, lp):
        q = Normal(mq, torch.exp(0.5 * lq), validate_args=False)
        p = Normal(mp, torch.exp(0.5 * lp), validate_args=False)
        return losses.masked_time_mean(losses.gaussian_kl(q, p), mask)

    assert "MaskedGaussianKL" in type(fused(*params).grad_fn).__name__
    assert fused(*params).item() == pytest.approx(composed(*params).item(), rel=1e-12)
    grads = torch.autograd.grad(fused(*params), params)
    refs = torch.autograd.grad(composed(*params), params)
    for got, ref in zip(grads, refs):
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)
    assert grads[0][1, 2].abs().sum() == 0            # a padding frame gets no gradient
    assert torch.autograd.gradcheck(fused, params)
    # a target that needs no gradient
    p = [params[0], params[1], params[2].detach(), params[3].detach()]
    assert torch.allclose(torch.autograd.grad(fused(*p), p[:2])[1], refs[1], rtol=1e-10)
    # hand-written backwards are once differentiable
    seed = torch.ones((), dtype=torch.float64, requires_grad=True)
    g = torch.autograd.grad(fused(*params), params[0], seed, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="twice"):
        g.sum().backward()


def test_the_cpu_blocks_are_chosen_on_cpu_and_a_block_they_do_not_cover_runs_plain(caplog):
    """training_pass: the CPU blocks and the fused KL on CPU, the plain blocks elsewhere. A
    reader's edit of an MLP (another nonlinearity, dropout) is not silently computed the old
    way: the edited MLP runs its plain forward inside the CPU-blocks model (same values and
    gradients as the edited plain model, float64), the other blocks stay fast, and the fallback
    is said once."""
    cpu = fast_cpu.training_pass("cpu")
    assert cpu.blocks is fast_cpu.CPU_BLOCKS and cpu.masked_kl is fast_cpu.masked_kl_mean
    cuda = fast_cpu.training_pass(torch.device("cuda"))
    assert cuda.blocks is PLAIN and cuda.masked_kl is losses.masked_kl_mean
    model, fast = _twins(tiny())
    assert isinstance(fast.likelihood.net.mlp, fast_cpu.TanhMLP)
    assert isinstance(fast.likelihood.out, fast_cpu.Linear)
    assert isinstance(fast.v_posterior.head, fast_cpu.Head)
    assert fast_cpu.report_plain_blocks(fast) == [] and fast_cpu.plain_blocks(model) == []
    torch.manual_seed(0)
    x, mask = torch.randn(B, T, F, dtype=torch.float64), torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    before = model.v_posterior(x, mask).loc
    for m in (model, fast):
        m.v_posterior.encoder.mlp.layers[1] = nn.ReLU()
        m.likelihood.net.mlp.layers.append(nn.Dropout(0.0))
    assert not torch.allclose(model.v_posterior(x, mask).loc, before)
    with caplog.at_level("WARNING", logger="tsdsae.model.fast_cpu"):
        assert fast_cpu.report_plain_blocks(fast) == ["v_posterior.encoder.mlp",
                                                      "likelihood.net.mlp"]
        fast_cpu.report_plain_blocks(fast)                       # said once
        assert fast_cpu.report_plain_blocks(model) == []         # plain blocks: nothing to say
    assert [r.getMessage().count("v_posterior.encoder.mlp") for r in caplog.records] == [1]
    stage2 = plan("ts_dsae", 1, 1)
    model.take_snapshot()
    fast.take_snapshot()
    torch.manual_seed(3)
    ref, ref_terms = loss_terms(model, x, mask, stage2)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.manual_seed(3)
    loss, terms = loss_terms(fast, x, mask, stage2, masked_kl=cpu.masked_kl)
    grads = torch.autograd.grad(loss, list(fast.parameters()))
    for k in ref_terms:
        torch.testing.assert_close(terms[k], ref_terms[k], rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
