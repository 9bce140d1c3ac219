"""Packed trials (tsdsae.model.packed, tsdsae.packed_train): a member of a pack trains exactly as
its run would alone (tsdsae.trainer.Trainer), whatever else is in the pack."""
import copy
import dataclasses

import pytest
import torch

from tsdsae.config import apply_overrides, debug
from tsdsae.dataset import Dataset
from tsdsae.losses import elbo_terms, swap_terms
from tsdsae.model.dsae import DSAE
from tsdsae.model.layers import noise_source
from tsdsae.model.packed import MemberNoise, PackedDSAE, block_permutation
from tsdsae.packed_train import PackedTrainer, check_packable
from tsdsae.toy import make_toy_dataset
from tsdsae.trainer import Trainer

TINY = ["data.toy_clips=80", "data.toy_seconds=0.5", "optim.batch_size=16",
        "schedule.switch_epoch=4",
        "schedule.max_epochs=13", "schedule.patience=20"]


@pytest.fixture(scope="module")
def toy80():
    c = apply_overrides(debug(), TINY).data
    return make_toy_dataset(c.toy_clips, c.toy_seconds, c.toy_instruments, seed=c.toy_seed)


def _as64(data: Dataset) -> Dataset:
    return Dataset({n: dataclasses.replace(s, features=s.features.double())
                    for n, s in data.splits.items()}, name=data.name, meta=data.meta)


def _cfg(tmp_path, name, *overrides):
    return apply_overrides(debug(), [*TINY, f"checkpoint.root={tmp_path}", f"name={name}",
                                     *overrides])


def _alone(cfg, data, epochs, dtype=torch.float64):
    """The unpacked run: Trainer's epochs, in `dtype`; returns (trainer, records)."""
    tr = Trainer(cfg, data=data, progress=False)
    tr.model.to(dtype)
    records = []
    for epoch in range(epochs):
        records.append(tr.run_epoch(epoch))
        if tr.should_stop():
            break
    return tr, records


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


MEMBERS = [("ts_weights", ["schedule.variant=ts_dsae", "seed=11",
                            "schedule.swap_weights=[0.5,1,1,2]"]),
           ("wo_reg_amsgrad", ["schedule.variant=ts_dsae_wo_reg", "seed=12", "optim.amsgrad=true",
                               "schedule.switch_epoch=6"]),
           ("freeze_lr", ["schedule.variant=dsae_freeze", "seed=13", "optim.lr=3e-4"]),
           ("dsae_stops", ["schedule.variant=dsae", "seed=14", "schedule.patience=1",
                           "optim.lr=0.02"])]


# The two ways a pack runs its passes (tsdsae.packed_train): member by member through the
# unpacked CPU pass (the CPU default) and fused (the GPU default), both on this CPU.
PASSES = {"member-passes": True, "fused": False}


@pytest.fixture(scope="module", params=list(PASSES))
def pack64(request, toy80, tmp_path_factory):
    """Four different runs in one float64 pack over 13 epochs (4 steps each: 52 steps, across
    the switch at epoch 4), one of which stops early."""
    root = tmp_path_factory.mktemp("pack64")
    data = _as64(toy80)
    cfgs = [_cfg(root, name, *o) for name, o in MEMBERS]
    pack = PackedTrainer(cfgs, data=data, dtype=torch.float64,
                         member_passes=PASSES[request.param])
    summaries = pack.fit(resume=False)
    return cfgs, data, pack, summaries


@pytest.fixture(scope="module")
def alone64(toy80, tmp_path_factory):
    """Each member of MEMBERS trained alone (float64), computed once: {k: (trainer, records)}."""
    root, data, runs = tmp_path_factory.mktemp("alone64"), _as64(toy80), {}

    def get(k):
        if k not in runs:
            cfg = _cfg(root, MEMBERS[k][0], *MEMBERS[k][1])
            runs[k] = _alone(cfg, data, cfg.schedule.max_epochs)
        return runs[k]
    return get


@pytest.mark.parametrize("k", range(len(MEMBERS)))
def test_each_member_of_a_float64_pack_reproduces_its_run_alone(pack64, alone64, k, toy80):
    toy_f32 = toy80
    cfgs, data, pack, summaries = pack64
    alone, records = alone64(k)
    assert len(pack.history[k]) == len(records)
    mine = pack.model.member_state_dict(k)
    theirs = alone.model.state_dict()
    assert len(records) >= 3
    worst = max(_rel(mine[n], theirs[n]) for n in theirs)
    assert worst < 1e-9, worst
    for a, b in zip(pack.history[k], records):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-10)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-10)
        # the same logged terms as the run alone (no swap terms for a member without swaps)
        assert sorted(a) == sorted(b)
    assert summaries[k]["best_epoch"] == alone.early["best_epoch"]
    # the informed prior: the member's snapshot is the one its run took at its switch
    snap = pack.model.member_snapshot_state_dict(k)
    if alone.model.has_snapshot:
        ref = alone.model.snapshot_state_dict()
        assert max(_rel(snap[n], ref[n]) for n in ref) < 1e-9
    else:
        assert snap is None
    if k == 0:      # the evaluation of the member equals the run's (float32 models, test split)
        from tsdsae.evaluate import evaluate

        member = pack.model.member(k).float()
        alone32 = copy.deepcopy(alone.model).float()
        assert evaluate(member, toy_f32, "test") == evaluate(alone32, toy_f32, "test")


def test_a_member_that_stops_early_stops_changing_while_the_others_go_on(pack64):
    cfgs, _, pack, summaries = pack64
    k = [name for name, _ in MEMBERS].index("dsae_stops")
    assert summaries[k]["stopped_early"] and summaries[k]["epochs_run"] < 13
    assert all(summaries[j]["epochs_run"] == 13 for j in range(len(MEMBERS)) if j != k)
    last = torch.load(summaries[k]["last_checkpoint"], weights_only=True)
    now = pack.model.member_state_dict(k)
    assert all(torch.equal(now[n], last["model"][n]) for n in now)


def test_an_interrupted_pack_resumes_from_pack_pt_to_the_same_weights(toy80, tmp_path):
    """fit() stopped after 7 epochs (pack.pt every 2, so the state after 6 is the last saved),
    then a new PackedTrainer over the same runs resumes from pack.pt, redoing epoch 6: every
    member ends with the weights of the pack that ran through (a switch at epoch 4, a member
    that stops early)."""
    def cfgs(root):
        return [_cfg(root, "r0", "seed=21", "checkpoint.every=2"),
                _cfg(root, "r1", "seed=22", "checkpoint.every=2", "schedule.variant=dsae",
                     "schedule.patience=1", "optim.lr=0.02")]

    through = PackedTrainer(cfgs(tmp_path / "a"), data=toy80)
    through.fit(resume=False)

    def stop_after_7(records):
        if through_b.epoch == 7:
            raise KeyboardInterrupt

    through_b = PackedTrainer(cfgs(tmp_path / "b"), data=toy80)
    with pytest.raises(KeyboardInterrupt):
        through_b.fit(resume=False, after_epoch=stop_after_7)
    resumed = PackedTrainer(cfgs(tmp_path / "b"), data=toy80)
    assert resumed.resume() and resumed.epoch == 6
    resumed.fit()
    assert [len(h) for h in resumed.history] == [len(h) for h in through.history]
    for k in range(2):
        a, b = through.model.member_state_dict(k), resumed.model.member_state_dict(k)
        assert all(torch.equal(a[n], b[n]) for n in a), k
        assert resumed.history[k][-1]["val_loss"] == through.history[k][-1]["val_loss"]


def test_stage_one_freezes_each_members_local_modules(toy80, tmp_path):
    cfgs = [_cfg(tmp_path, "a", "seed=1"), _cfg(tmp_path, "b", "seed=2", "schedule.variant=dsae")]
    pack = PackedTrainer(cfgs, data=toy80)
    before = {n: p.detach().clone() for n, p in pack.model.named_parameters()}
    pack.run_epoch(0)
    for name, p in pack.model.named_parameters():
        local = name.split(".")[0] in DSAE.GROUPS["local"]
        assert torch.equal(p[0], before[name][0]) == local, name      # ts_dsae: stage 1
        assert not torch.equal(p[1], before[name][1]), name            # dsae: everything trains


def test_float32_pack_losses_follow_the_runs_alone_over_200_steps(toy80, tmp_path):
    cfgs = [_cfg(tmp_path, "f32a", "seed=5", "schedule.max_epochs=50", "schedule.switch_epoch=20"),
            _cfg(tmp_path, "f32b", "seed=6", "schedule.max_epochs=50", "schedule.switch_epoch=20",
                 "schedule.variant=ts_dsae_wo_reg", "optim.amsgrad=true")]
    pack = PackedTrainer(cfgs, data=toy80)
    for epoch in range(50):                                             # 4 steps each
        pack.run_epoch(epoch)
    for k, cfg in enumerate(cfgs):
        _, records = _alone(cfg, toy80, 50, torch.float32)
        for a, b in zip(pack.history[k], records):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4), a["epoch"]
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4), a["epoch"]


OPTIONS = [dict(),
           dict(z_feature="><", v_posterior="><", z_posterior=">>", z_prior=">", likelihood="><",
                v_condition=True),
           dict(z_feature="<", z_posterior=">", z_prior="x"),
           dict(z_feature=">", z_posterior=">>", z_prior=">>")]


@pytest.mark.parametrize("options", OPTIONS,
                         ids=["default", "recurrent", "backward-mlp", "forward-lstm"])
def test_packed_pass_equals_each_members_plain_pass(options):
    """Plain reference: each member's own DSAE.forward and losses, with its own generator's
    draws; unequal lengths, both swaps, float64, every option string; the packed layers'
    batched products and LSTM recurrence."""
    from tsdsae.config import ModelConfig

    cfg = ModelConfig(input_dim=12, v_dim=4, z_dim=3, encoder_hidden=(8, 8),
                      transition_hidden=(5, 5), decoder_hidden=(8, 8), **options)
    k_, b, t = 3, 4, 7
    members = []
    for k in range(k_):
        torch.manual_seed(k)
        members.append(DSAE(cfg).double())
    pack = PackedDSAE(members)
    x = torch.randn(k_, b, t, 12, dtype=torch.float64)
    mask = torch.ones(k_, b, t, dtype=torch.bool)
    mask[:, 0, 5:] = False
    gens = [torch.Generator().manual_seed(100 + k) for k in range(k_)]
    perms = [(torch.randperm(b, generator=g), torch.randperm(b, generator=g)) for g in gens]
    packed_perms = tuple(block_permutation([p[i] for p in perms]) for i in range(2))
    xs, ms = x.reshape(k_ * b, t, 12), mask.reshape(k_ * b, t)
    with noise_source(MemberNoise(pack.pack, gens)):
        out = pack(xs, ms, packed_perms)
        terms = elbo_terms(xs, ms, out, members=k_)
        terms.update(swap_terms(out, ms, packed_perms, members=k_))
    terms["total"] = sum(terms.values())
    terms["total"].sum().backward()
    for k in range(k_):
        torch.manual_seed(100 + k)
        torch.randperm(b), torch.randperm(b)                # the draws the pack's perms took
        o = members[k](x[k], mask[k], perms[k])
        ref = elbo_terms(x[k], mask[k], o)
        ref.update(swap_terms(o, mask[k], perms[k]))
        ref["total"] = sum(ref.values())
        ref["total"].backward()
        for name, value in ref.items():
            assert float(terms[name][k].detach()) == pytest.approx(float(value.detach()),
                                                                  rel=1e-12, abs=1e-14)
        for (name, p), q in zip(pack.named_parameters(), members[k].parameters()):
            assert torch.allclose(p.grad[k], q.grad, rtol=1e-10, atol=1e-13), name
        assert torch.allclose(out.x_mean[k * b:(k + 1) * b], o.x_mean, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("options", OPTIONS[1:3], ids=["recurrent", "backward-mlp"])
def test_a_member_view_shares_the_packs_parameters_and_gradients(options):
    """PackedDSAE.member_view(k): a plain DSAE on member k's slices (what CPU member passes
    run): its pass equals member k's own model, its backward lands in the k-th slices of the
    stacked gradients only (a frozen group gets none), and an update of the pack shows in it."""
    from tsdsae.config import ModelConfig

    cfg = ModelConfig(input_dim=12, v_dim=4, z_dim=3, encoder_hidden=(8, 8),
                      transition_hidden=(5, 5), decoder_hidden=(8, 8), **options)
    members = []
    for k in range(3):
        torch.manual_seed(k)
        members.append(DSAE(cfg).double())
    members[1].take_snapshot()
    pack = PackedDSAE(members)
    view = pack.member_view(1)
    view.set_trainable({"global", "decoder"})               # stage 1: local modules frozen
    members[1].set_trainable({"global", "decoder"})
    pack.bind_member_grads(view, 1)
    x = torch.randn(4, 7, 12, dtype=torch.float64)
    mask = torch.ones(4, 7, dtype=torch.bool)
    losses = []
    for model in (view, members[1]):
        torch.manual_seed(5)
        out = model(x, mask)
        terms = elbo_terms(x, mask, out, model.informed_prior(x, mask))
        losses.append(terms["recon"] + terms["kl_z"] + terms["kl_v"])
        losses[-1].backward()
    assert float(losses[0].detach()) == float(losses[1].detach())
    local = set(DSAE.GROUPS["local"])
    for (name, p), q in zip(pack.named_parameters(), members[1].parameters()):
        assert not p.grad[0].any() and not p.grad[2].any(), name
        if name.split(".")[0] in local:
            assert not p.grad[1].any(), name
        else:
            assert torch.equal(p.grad[1], q.grad), name
    with torch.no_grad():
        next(pack.parameters())[1].add_(1.0)
    assert torch.equal(next(view.parameters()), next(pack.parameters())[1])


def test_members_must_share_the_architecture(tmp_path):
    with pytest.raises(ValueError, match="model differs"):
        check_packable([_cfg(tmp_path, "a"), _cfg(tmp_path, "b", "model.z_dim=4")])
    with pytest.raises(ValueError, match="distinct names"):
        check_packable([_cfg(tmp_path, "a"), _cfg(tmp_path, "a", "seed=3")])


def _ddp_rank(rank: int, world: int, port: int, root: str, member_passes: bool) -> None:
    """One gloo rank: member 0 of a float64 pack and the same run alone, both split across the
    ranks as tsdsae.ray_train's workers split them (no Ray: the process group is made here)."""
    import os

    import torch.distributed as dist

    from tsdsae.ray_train import RankPackedTrainer, RankTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        c = apply_overrides(debug(), TINY).data
        data = _as64(make_toy_dataset(c.toy_clips, c.toy_seconds, c.toy_instruments,
                                      seed=c.toy_seed))
        cfgs = [_cfg(root, "ddp_ts", "seed=11", "schedule.switch_epoch=2"),
                _cfg(root, "ddp_freeze", "seed=13", "schedule.switch_epoch=2",
                     "schedule.variant=dsae_freeze")]
        pack = RankPackedTrainer(cfgs, data=data, dtype=torch.float64, rank=rank,
                                 world_size=world, member_passes=member_passes)
        alone = RankTrainer(cfgs[0], data=data, progress=False, rank=rank, world_size=world)
        alone.model.double()
        for epoch in range(4):
            pack.run_epoch(epoch)
            if epoch in (0, 2):                  # a stage's trainable set, then its DDP
                alone.prepare_epoch(epoch)
                alone.wrap()
            alone.run_epoch(epoch)
        if rank == 0:
            torch.save({"pack": pack.model.member_state_dict(0),
                        "alone": alone.model.state_dict(),
                        "pack_val": [h["val_loss"] for h in pack.history[0]],
                        "alone_val": [h["val_loss"] for h in alone.history]},
                       f"{root}/ddp.pt")
        open(f"{root}/rank{rank}.done", "w").close()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("passes", list(PASSES))
def test_a_member_of_a_data_parallel_pack_equals_its_data_parallel_run(tmp_path, passes):
    """Two DDP ranks (gloo): each member's batch split across the ranks, weighted gradient
    all-reduce, epoch sums across ranks; member 0 follows the same run trained with the same
    two ranks unpacked (float64, 4 epochs across the switch)."""
    import torch.multiprocessing as mp

    from conftest import free_port

    ctx, port = mp.get_context("spawn"), free_port()
    ranks = [ctx.Process(target=_ddp_rank, args=(r, 2, port, str(tmp_path), PASSES[passes]))
             for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=600)
        if p.is_alive():
            p.kill()
    # Both ranks finished training (their markers come after the last collective). Their exit
    # codes are not asserted: gloo was seen to abort a rank at process teardown ("terminate
    # called without an active exception") after everything here was done.
    assert (tmp_path / "rank0.done").exists() and (tmp_path / "rank1.done").exists()
    out = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert max(_rel(out["pack"][n], out["alone"][n]) for n in out["alone"]) < 1e-9
    assert out["pack_val"] == pytest.approx(out["alone_val"], rel=1e-10)
