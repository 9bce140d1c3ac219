"""Training a pack: K runs of one architecture in one process (tsdsae.model.packed).

Each member is a run of its own RunConfig (seed, variant, switch epoch, max epochs, patience,
learning rate, amsgrad, swap weights may differ) and trains exactly as tsdsae.trainer.Trainer
would train it alone:
  - initial weights from its own seed (torch.manual_seed(seed); DSAE(cfg.model));
  - its own generator, reseeded every epoch from (seed, epoch, rank) as the Trainer reseeds the
    global one, for its reparameterisation noise and swap permutations, and its own batch order
    (tsdsae.trainer.batch_parts);
  - its own stage plan (tsdsae.schedule.plan): frozen groups and stopped members do not change
    (`PackedAdam` steps only the active (member, group) slices), the switch snapshots that
    member's global encoder;
  - its own loss: the per-member terms of tsdsae.losses (`members=K`); the pack minimises their
    sum, so each member's gradient is its unpacked gradient;
  - its own early stopping and best checkpoint, written as a plain run's checkpoint (best.pt and
    last.pt in the member's run folder), so evaluation, figures and resuming a member alone work
    as for any run.
The pack's own state (every member, optimiser, epoch) is saved as pack.pt in the pack's folder;
a rerun with the same folder resumes it at the last saved epoch.

Two ways to run a pack's passes, one result (tested equal):
  - fused (GPUs): one pass of the PackedDSAE over the packed batch (K blocks of B rows), each
    linear map one batched product over the K members;
  - member passes (CPU, the default there): a CPU has no kernel launches to save, so each
    member's pass is the unpacked trainer's own (tsdsae.train_step.loss_terms through
    tsdsae.model.fast_cpu) on a view of the member's slices of the packed parameters
    (PackedDSAE.member_view), its noise and permutations drawn from its own generator; the
    gradients land in the stacked gradients, and one PackedAdam step updates every member.
    Activations live for one member at a time, so memory does not grow with K.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from tsdsae import checkpoint, schedule
from tsdsae.config import RunConfig, to_flat
from tsdsae.dataset import Dataset, Split
from tsdsae.losses import TERMS, elbo_terms, swap_terms
from tsdsae.model import fast_cpu
from tsdsae.model.dsae import DSAE
from tsdsae.model.layers import DiagNormal, noise_source
from tsdsae.model.packed import MemberNoise, PackedDSAE, block_permutation
from tsdsae.train_step import loss_terms
from tsdsae.trainer import PriorCache, batch_parts, epoch_seed, load_data, resolve_device

# Keys members of one pack must share (the rest may differ per member).
SWAP_TERMS = TERMS[3:]
SHARED_KEYS = ("model", "data", "optim.batch_size", "optim.beta1", "optim.beta2", "optim.eps",
               "optim.weight_decay", "device")


def pack_signature(cfg: RunConfig) -> tuple:
    """What decides whether runs can share a pack: the architecture, the data, the batch size
    and Adam's shared constants."""
    o = cfg.optim
    return (cfg.model, cfg.data, o.batch_size, o.beta1, o.beta2, o.eps, o.weight_decay,
            cfg.device)


def check_packable(cfgs: Sequence[RunConfig]) -> None:
    """Raises ValueError naming the first differing key when `cfgs` cannot share one pack."""
    if not cfgs:
        raise ValueError("a pack needs at least one run")
    first = pack_signature(cfgs[0])
    for cfg in cfgs[1:]:
        for key, a, b in zip(SHARED_KEYS, first, pack_signature(cfg)):
            if a != b:
                raise ValueError(f"runs {cfgs[0].name!r} and {cfg.name!r} cannot share a pack: "
                                 f"{key} differs ({a} vs {b})")
    names = [c.name for c in cfgs]
    if len(set(names)) != len(names):
        raise ValueError(f"pack members need distinct names; got {names}")


class PackedAdam:
    """Adam over stacked (K, ...) parameters with a per-member learning rate, amsgrad switch and
    step count: torch.optim.Adam's update (its single-tensor rule, amsgrad included) applied to
    member k's slice with member k's hyper-parameters, only where `active` says so.

    lr (K,), amsgrad (K,) bool; betas, eps, weight_decay shared. `step(active)`: active is one
    (K,) bool tensor per parameter (member k updates that parameter now); an inactive slice keeps
    its value, moments and step count (as a parameter without a gradient in torch's Adam).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], lr: Sequence[float],
                 amsgrad: Sequence[bool], betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.params = list(params)
        k = self.params[0].shape[0]
        if len(lr) != k or len(amsgrad) != k:
            raise ValueError(f"lr and amsgrad need one value per member ({k})")
        device = self.params[0].device
        self.lr = torch.tensor([float(v) for v in lr], dtype=torch.float64, device=device)
        self.amsgrad = torch.tensor([bool(v) for v in amsgrad], device=device)
        self._any_amsgrad = any(bool(v) for v in amsgrad)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.state = [{"step": torch.zeros(k, dtype=torch.float64, device=device),
                       "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
                       "max_exp_avg_sq": torch.zeros_like(p)} for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients, or zero them in place (keeping views of them valid)."""
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, active: Sequence[torch.Tensor],
             flags: Sequence[tuple[bool, bool]] | None = None) -> None:
        """One update of every active (member, parameter) slice. `flags`: per parameter, whether
        any / every member is active ((any, all) of its mask, known on the host; computed here
        when not given, a device sync per parameter on a GPU)."""
        if flags is None:
            flags = [(bool(a.any()), bool(a.all())) for a in active]
        any_ams = self._any_amsgrad
        for p, a, (some, every), st in zip(self.params, active, flags, self.state):
            if p.grad is None or not some:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            grad = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            if every:       # every member steps: in place, no selection
                st["step"] += 1.0
                step = st["step"]
                exp_avg = st["exp_avg"].lerp_(grad, 1 - self.beta1)
                exp_avg_sq = st["exp_avg_sq"].mul_(self.beta2).addcmul_(
                    grad, grad, value=1 - self.beta2)
                max_sq = st["max_exp_avg_sq"]
                if any_ams:
                    max_sq = torch.where(self.amsgrad.view(shape),
                                         torch.maximum(max_sq, exp_avg_sq), max_sq)
            else:
                on = a.view(shape)
                st["step"] += a.to(torch.float64)
                step = st["step"].clamp_min(1.0)
                exp_avg = torch.where(on, st["exp_avg"].lerp(grad, 1 - self.beta1),
                                      st["exp_avg"])
                exp_avg_sq = torch.where(
                    on, st["exp_avg_sq"].mul(self.beta2).addcmul_(grad, grad,
                                                                  value=1 - self.beta2),
                    st["exp_avg_sq"])
                max_sq = st["max_exp_avg_sq"]
                if any_ams:
                    ams = (self.amsgrad & a).view(shape)
                    max_sq = torch.where(ams, torch.maximum(max_sq, exp_avg_sq), max_sq)
            bias1 = 1 - self.beta1 ** step
            bias2_sqrt = (1 - self.beta2 ** step) ** 0.5
            step_size = (self.lr / bias1).to(p.dtype).view(shape)
            second = (torch.where(self.amsgrad.view(shape), max_sq, exp_avg_sq) if any_ams
                      else exp_avg_sq)
            denom = (second.sqrt() / bias2_sqrt.to(p.dtype).view(shape)).add_(self.eps)
            update = step_size * (exp_avg / denom)
            if every:
                p.sub_(update)
            else:
                p.copy_(torch.where(on, p - update, p))
            st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"] = exp_avg, exp_avg_sq, max_sq

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"lr": self.lr.clone(), "amsgrad": self.amsgrad.clone(),
                "state": [{k: v.clone() for k, v in st.items()} for st in self.state]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["state"]) != len(self.params):
            raise ValueError(f"optimiser state for {len(state['state'])} parameters, the pack "
                             f"has {len(self.params)}")
        self.lr.copy_(state["lr"])
        self.amsgrad.copy_(state["amsgrad"])
        self._any_amsgrad = bool(self.amsgrad.any())
        for st, saved in zip(self.state, state["state"]):
            for k, v in saved.items():
                if st[k].shape != v.shape:
                    raise ValueError(f"optimiser state {k}: shape {tuple(v.shape)}, the pack "
                                     f"needs {tuple(st[k].shape)}")
                st[k].copy_(v)

    def member_state_dict(self, k: int, template: torch.optim.Adam) -> dict:
        """Member k's state as torch.optim.Adam's state dict for `template` (an Adam over the
        plain member's parameters, in the same order); parameters never stepped have none."""
        out = template.state_dict()
        out["state"] = {}
        for i, st in enumerate(self.state):
            if st["step"][k] > 0:
                entry = {"step": torch.tensor(float(st["step"][k])),
                         "exp_avg": st["exp_avg"][k].clone(),
                         "exp_avg_sq": st["exp_avg_sq"][k].clone()}
                if bool(self.amsgrad[k]):
                    entry["max_exp_avg_sq"] = st["max_exp_avg_sq"][k].clone()
                out["state"][i] = entry
        return out

    def load_member(self, k: int, adam_state: dict) -> None:
        """Member k's slices from torch.optim.Adam's state dict of a plain run (same parameter
        order). Raises ValueError when it holds another number of parameters or shapes."""
        groups = adam_state["param_groups"]
        n = sum(len(g["params"]) for g in groups)
        if n != len(self.params):
            raise ValueError(f"the run's optimiser has {n} parameters, the pack {len(self.params)}")
        for i, st in enumerate(self.state):
            saved = adam_state["state"].get(i, adam_state["state"].get(str(i)))
            st["step"][k] = 0.0
            for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                st[name][k].zero_()
            if saved is None:
                continue
            st["step"][k] = float(saved["step"])
            for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if name in saved:
                    st[name][k].copy_(saved[name])


def member_masked_kl(q: DiagNormal, p: DiagNormal, mask: torch.Tensor, members: int
                     ) -> torch.Tensor:
    """tsdsae.losses.masked_kl_mean per member of a pack (K,): each member's rows through the
    fused tsdsae.model.fast_cpu.masked_kl_mean (the same value; tested equal there)."""
    def blocks(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return t.reshape(members, -1, *t.shape[1:]).unbind(0)    # unbind: one backward node

    parts = zip(blocks(q.loc), blocks(q.logvar), blocks(p.loc), blocks(p.logvar), blocks(mask))
    return torch.stack([fast_cpu.masked_kl_mean(DiagNormal(ql, qv), DiagNormal(pl, pv), m)
                        for ql, qv, pl, pv, m in parts])


def _param_groups(model: DSAE) -> list[str]:
    """The schedule group ('global' / 'local' / 'decoder') of each parameter, in order."""
    owner = {m: g for g, mods in DSAE.GROUPS.items() for m in mods}
    return [owner[name.split(".")[0]] for name, _ in model.named_parameters()]


class PackedTrainer:
    """Trains K runs as one pack (see the module docstring).

    cfgs: one RunConfig per member (check_packable). `starts`: optional per-member plain
    checkpoint dicts (Trainer.state_dict(), e.g. a shared stage 1) to continue from; all members
    then continue at the same epoch. `pack_dir`: where pack.pt goes (default: the first
    member's checkpoint root / "pack-" + its name). `dtype`: parameters and data (float32
    default; float64 for equivalence checks). `callbacks` get (member index, record) after each
    epoch of a member that is still training. `rank` / `world_size` make it one data-parallel
    rank (tsdsae.ray_train.RankPackedTrainer): each rank takes its part of every member's batch.
    `member_passes`: run the passes member by member (see the module docstring); None: on CPU.
    `until`: per member, an epoch at which it stops although its schedule goes on (None: its
    max_epochs), e.g. a shared stage 1 that ends at the switch epoch.
    Raises ValueError when the runs cannot share a pack (check_packable).
    """

    def __init__(self, cfgs: Sequence[RunConfig], data: Dataset | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 starts: Sequence[dict | None] | None = None, pack_dir: str | None = None,
                 callbacks: list[Callable[[int, dict], None]] | None = None,
                 progress: bool = False, rank: int = 0, world_size: int = 1,
                 member_passes: bool | None = None, until: Sequence[int | None] | None = None):
        check_packable(cfgs)
        self.cfgs = list(cfgs)
        self.k = len(cfgs)
        first = cfgs[0]
        until = list(until) if until is not None else [None] * self.k
        if len(until) != self.k:
            raise ValueError(f"{len(until)} stop epochs for {self.k} members")
        self.end = [c.schedule.max_epochs if u is None else min(int(u), c.schedule.max_epochs)
                    for c, u in zip(cfgs, until)]
        self.rank, self.world_size = rank, world_size
        self.device = resolve_device(first.device) if device is None else torch.device(device)
        self.dtype = dtype
        self.data = data if data is not None else load_data(first.data)
        self.train_split = _as(self.data["train"], self.device, dtype)
        self.val_split = _as(self.data["val"], self.device, dtype)
        members = []
        for cfg in cfgs:
            torch.manual_seed(cfg.seed)                # each member's own initialisation
            members.append(DSAE(cfg.model))
        self.model = PackedDSAE(members).to(device=self.device, dtype=dtype)
        self.groups = _param_groups(self.model)
        self.step_model: torch.nn.Module = self.model     # what a training step runs (DDP: its
                                                          # wrapper, see tsdsae.ray_train)
        self.optimizer = PackedAdam(list(self.model.parameters()),
                                    [c.optim.lr for c in cfgs], [c.optim.amsgrad for c in cfgs],
                                    (first.optim.beta1, first.optim.beta2), first.optim.eps,
                                    first.optim.weight_decay)
        self.generators = [torch.Generator(self.device) for _ in cfgs]
        self.noise = MemberNoise(self.model.pack, self.generators)
        self.member_passes = (self.device.type == "cpu" if member_passes is None
                              else bool(member_passes))
        self._views: list[DSAE] | None = None       # member views (member passes), built lazily
        self._passes: list[torch.nn.Module] = []
        self._view_trainable: list[frozenset | None] = []
        self._active: dict[tuple, tuple] = {}
        self.epoch = 0
        self.stage: list[int | None] = [None] * self.k
        self.early = [{"best_val": math.inf, "best_epoch": -1, "bad_epochs": 0} for _ in cfgs]
        self.history: list[list[dict]] = [[] for _ in cfgs]
        self.done = [False] * self.k
        self.prior: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.callbacks = callbacks or []
        self.progress = progress
        self.endpoint = first.data.endpoint_url or None
        self.pack_dir = pack_dir or (f"{first.checkpoint.root.rstrip('/')}/pack-{first.name}")
        if starts is not None:
            self.start_from(starts)

    # -- members --------------------------------------------------------------------------------

    def run_dir(self, k: int) -> str:
        cfg = self.cfgs[k]
        return f"{cfg.checkpoint.root.rstrip('/')}/{cfg.name}"

    def _adam_template(self, k: int, model: DSAE) -> torch.optim.Adam:
        o = self.cfgs[k].optim
        return torch.optim.Adam(list(model.parameters()), lr=o.lr, betas=(o.beta1, o.beta2),
                                eps=o.eps, weight_decay=o.weight_decay, amsgrad=o.amsgrad)

    def member_state_dict(self, k: int) -> dict:
        """Member k as a plain run's checkpoint (tsdsae.trainer.Trainer.state_dict's keys)."""
        cfg = self.cfgs[k]
        model = self.model.member(k)
        last = max(self.epoch - 1, 0)
        return {
            "config": to_flat(cfg), "epoch": self.epoch - 1,
            "stage": schedule.stage_of(cfg.schedule.variant, last, cfg.schedule.switch_epoch),
            "model": model.state_dict(), "snapshot": model.snapshot_state_dict(),
            "optimizer": self.optimizer.member_state_dict(k, self._adam_template(k, model)),
            "rng": checkpoint.rng_state(), "early": dict(self.early[k]),
            "history": list(self.history[k]), "packed": True}

    def start_from(self, starts: Sequence[dict | None]) -> None:
        """Continue each member from a plain run's checkpoint dict (None: from its own
        initialisation at epoch 0). Raises ValueError when the members would start at
        different epochs."""
        if len(starts) != self.k:
            raise ValueError(f"{len(starts)} start states for {self.k} members")
        epochs = {int(s["epoch"]) + 1 if s is not None else 0 for s in starts}
        if len(epochs) != 1:
            raise ValueError(f"pack members must start at one epoch; got {sorted(epochs)}")
        for k, s in enumerate(starts):
            if s is None:
                continue
            self.model.load_member(k, s["model"], s.get("snapshot"))
            self.optimizer.load_member(k, s["optimizer"])
            self.early[k] = dict(s["early"])
            self.history[k] = list(s["history"])
        self.epoch = epochs.pop()
        self._views = None
        self._build_prior_cache()

    # -- the pack's own checkpoint --------------------------------------------------------------

    @property
    def pack_uri(self) -> str:
        return f"{self.pack_dir}/pack.pt"

    def state_dict(self) -> dict:
        return {"names": [c.name for c in self.cfgs], "configs": [to_flat(c) for c in self.cfgs],
                "epoch": self.epoch, "model": self.model.state_dict(),
                "snapshot": self.model.snapshot_state_dict(),
                "snapshot_members": list(self.model._snapshot_members),
                "optimizer": self.optimizer.state_dict(), "stage": list(self.stage),
                "early": [dict(e) for e in self.early], "history": self.history,
                "done": list(self.done)}

    def load_state_dict(self, state: dict) -> None:
        names = [c.name for c in self.cfgs]
        if state["names"] != names or state["configs"] != [to_flat(c) for c in self.cfgs]:
            raise checkpoint.CheckpointError(
                f"{self.pack_uri} holds a pack of {state['names']}, not of {names} with these "
                "configurations; remove it or choose another pack folder")
        self.model.load_state_dict(state["model"])
        if state["snapshot"] is not None:
            self.model.load_snapshot_state_dict(state["snapshot"])
            self.model._snapshot_members = list(state["snapshot_members"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.stage = [None] * self.k       # trainable sets are re-derived on the next epoch
        self.early = [dict(e) for e in state["early"]]
        self.history = [list(h) for h in state["history"]]
        self.done = list(state["done"])
        self._views = None
        self._build_prior_cache()

    def resume(self) -> bool:
        if not checkpoint.exists(self.pack_uri, self.endpoint):
            return False
        self.load_state_dict(checkpoint.load(self.pack_uri, self.device, self.endpoint))
        return True

    # -- the stage switch and the informed prior ------------------------------------------------

    @torch.no_grad()
    def _prior_of(self, split: Split, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's q_snapshot(v | x) for every clip: loc, logvar (K, N, V) (zeros for a
        member without a snapshot). With member passes, each member's as its run alone computes
        it (tsdsae.trainer.PriorCache on the member's view)."""
        if self.member_passes:
            caches = [PriorCache(v, split).prior if v.has_snapshot else None
                      for v in self._member_views()]
            shape = next(c for c in caches if c is not None).loc.shape
            zeros = split.features.new_zeros(shape)
            return (torch.stack([zeros if c is None else c.loc for c in caches]),
                    torch.stack([zeros if c is None else c.logvar for c in caches]))
        locs, logvars = [], []
        for s in range(0, len(split), batch):
            x, m = split.features[s:s + batch], split.mask[s:s + batch]
            q = self.model.informed_prior(x.repeat(self.k, 1, 1), m.repeat(self.k, 1))
            locs.append(q.loc.view(self.k, len(x), -1))
            logvars.append(q.logvar.view(self.k, len(x), -1))
        return torch.cat(locs, 1), torch.cat(logvars, 1)

    def _build_prior_cache(self) -> None:
        self.prior = {}
        if self.model.has_snapshot:
            self.prior = {"train": self._prior_of(self.train_split),
                          "val": self._prior_of(self.val_split)}

    def v_prior(self, name: str, idx: torch.Tensor, plans) -> DiagNormal | None:
        """The prior on v of a packed batch: member k's informed prior rows where its plan uses
        one, N(0, I) rows (zeros) elsewhere; None when no member uses one."""
        use = [p is not None and p.informed_prior for p in plans]
        if not any(use):
            return None
        loc, logvar = self.prior[name]
        rows = [(loc[k, idx[k]], logvar[k, idx[k]]) if use[k]
                else (loc.new_zeros(len(idx[k]), loc.shape[-1]),) * 2 for k in range(self.k)]
        return DiagNormal(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]))

    def prepare_epoch(self, epoch: int) -> list[schedule.StagePlan | None]:
        """Each member's plan for `epoch` (None for a member that has finished); a member
        entering stage 2 at its switch epoch snapshots its global encoder and restarts its
        early stopping."""
        plans: list[schedule.StagePlan | None] = []
        switched = False
        for k, cfg in enumerate(self.cfgs):
            s = cfg.schedule
            if self.done[k] or epoch >= self.end[k]:
                self.done[k] = True
                plans.append(None)
                continue
            plan = schedule.plan(s.variant, epoch, s.switch_epoch)
            if plan.stage != self.stage[k]:
                if plan.stage == 2 and epoch == s.switch_epoch:
                    if schedule.takes_snapshot(s.variant):
                        self.model.take_member_snapshot(k)
                        switched = True
                    self.early[k] = {"best_val": math.inf, "best_epoch": -1, "bad_epochs": 0}
                self.stage[k] = plan.stage
            plans.append(plan)
        if switched:
            self._views = None
            self._build_prior_cache()
        return plans

    def active(self, plans) -> list[torch.Tensor]:
        """Per parameter, which members update it under `plans` (K,) bool (cached per plans)."""
        return self._active_masks(plans)[0]

    def _active_masks(self, plans) -> tuple[list[torch.Tensor], list[tuple[bool, bool]]]:
        """`active(plans)` and, per parameter, whether any / every member is active."""
        key = tuple(plans)
        if key not in self._active:
            rows = [[p is not None and group in p.trainable for p in plans]
                    for group in self.groups]
            self._active[key] = ([torch.tensor(r, device=self.device) for r in rows],
                                 [(any(r), all(r)) for r in rows])
        return self._active[key]

    # -- epochs ---------------------------------------------------------------------------------

    def _batches(self, n: int, train: bool, epoch: int) -> list[tuple[torch.Tensor, int, int]]:
        """The packed batches of one epoch on this rank: (idx (K, b), b, global batch size);
        row k of idx in member k's own order (tsdsae.trainer.batch_parts). An empty part (a last
        batch shorter than world_size) is one stand-in clip counted 0, as in the Trainer."""
        per_member = [batch_parts(n, c.optim.batch_size, c.seed + (0 if train else 7), epoch,
                                  self.rank, self.world_size) for c in self.cfgs]
        out = []
        for i in range(len(per_member[0])):
            parts = [p[i][0] for p in per_member]
            count, size = len(parts[0]), per_member[0][i][1]
            idx = (torch.stack(parts) if count else
                   torch.zeros(self.k, 1, dtype=torch.long))
            out.append((idx, count, size))
        return out

    def swap_weights(self, plans) -> tuple[list[bool], torch.Tensor]:
        """Which members add the swap terms under `plans`, and their weights (K, 4) (zeros
        for the others)."""
        swaps = [p is not None and p.swaps for p in plans]
        weights = torch.tensor([list(c.schedule.swap_weights) if s else [0.0] * 4
                                for c, s in zip(self.cfgs, swaps)],
                               dtype=self.dtype, device=self.device)
        return swaps, weights

    def step(self, x: torch.Tensor, mask: torch.Tensor, plans, prior: DiagNormal | None = None,
             train: bool = True) -> dict[str, torch.Tensor]:
        """One pass of a packed batch x (K*B, T, F), mask (K*B, T) under each member's plan
        (`prepare_epoch`; None for a finished member, whose parameters do not change); `prior`
        the packed informed prior (`v_prior`). Returns each member's loss terms (K,) (a term a
        member's plan lacks, e.g. the swap terms without swaps, is 0 there; with member passes
        a finished member's terms are 0). With `train`, also backward and the optimiser step.
        Members with swaps draw their two permutations first, as
        tsdsae.train_step.loss_terms does."""
        if self.member_passes:
            return self._member_step(x, mask, plans, prior, train)
        return self._fused_step(x, mask, plans, prior, train)

    def _fused_step(self, x, mask, plans, prior, train) -> dict[str, torch.Tensor]:
        swaps, weights = self.swap_weights(plans)
        b = x.shape[0] // self.k
        perms = None
        self.model.swap_members = list(swaps)
        if any(swaps):
            eye = torch.arange(b, device=self.device)
            pairs = [(torch.randperm(b, generator=g, device=self.device),
                      torch.randperm(b, generator=g, device=self.device)) if s else (eye, eye)
                     for g, s in zip(self.generators, swaps)]
            perms = (block_permutation([p[0] for p in pairs]),
                     block_permutation([p[1] for p in pairs]))
        with torch.set_grad_enabled(train), noise_source(self.noise):
            out = (self.step_model if train else self.model)(x, mask, swap_perms=perms)
            terms = elbo_terms(x, mask, out, prior, member_masked_kl, members=self.k)
            if perms is not None:
                terms.update(swap_terms(out, mask, perms, member_masked_kl, members=self.k))
                on = torch.tensor(swaps, dtype=x.dtype, device=self.device)
                terms.update({n: terms[n] * on for n in SWAP_TERMS})
            loss = terms["recon"] + terms["kl_z"] + terms["kl_v"]
            for j, term in enumerate(SWAP_TERMS):
                if term in terms:
                    loss = loss + weights[:, j] * terms[term]
            terms["loss"] = loss
            if train:
                self.optimizer.zero_grad()
                loss.sum().backward()
                self.optimizer.step(*self._active_masks(plans))
        return {key: v.detach() for key, v in terms.items()}

    def _member_views(self) -> list[DSAE]:
        if self._views is None:
            self._views = [self.model.member_view(k) for k in range(self.k)]
            self._passes = [fast_cpu.for_device(v, self.device) for v in self._views]
            self._view_trainable = [None] * self.k
        return self._views

    def _default_generator(self) -> torch.Generator:
        if self.device.type == "cuda":
            return torch.cuda.default_generators[self.device.index or 0]
        return torch.default_generator

    def _member_step(self, x, mask, plans, prior, train) -> dict[str, torch.Tensor]:
        """Member passes: member k's rows through the unpacked trainer's pass on its view, with
        its generator as the default one (what its run alone draws from), gradients into the
        stacked gradients, then one PackedAdam step."""
        views = self._member_views()
        b = x.shape[0] // self.k
        xs, ms = x.view(self.k, b, *x.shape[1:]), mask.view(self.k, b, *mask.shape[1:])
        if train:
            self.optimizer.zero_grad(set_to_none=False)
        default = self._default_generator()
        columns: dict[str, list[torch.Tensor | None]] = {}
        for k, (plan, view) in enumerate(zip(plans, views)):
            if plan is None:
                continue
            view.train(self.model.training)
            if train and self._view_trainable[k] != plan.trainable:
                view.set_trainable(plan.trainable)
                self.model.bind_member_grads(view, k)
                self._view_trainable[k] = plan.trainable
            rows = slice(k * b, (k + 1) * b)
            member_prior = (DiagNormal(prior.loc[rows], prior.logvar[rows])
                            if plan.informed_prior and prior is not None else None)
            outer = default.get_state()
            default.set_state(self.generators[k].get_state())
            try:
                with torch.set_grad_enabled(train):
                    loss, terms = loss_terms(self._passes[k], xs[k], ms[k], plan,
                                             self.cfgs[k].schedule.swap_weights, member_prior,
                                             core=view)
                    if train:
                        loss.backward()
            finally:
                self.generators[k].set_state(default.get_state())
                default.set_state(outer)
            for name, v in terms.items():
                columns.setdefault(name, [None] * self.k)[k] = v.detach()
        if train:
            self._reduce_member_gradients()
            self.optimizer.step(*self._active_masks(plans))
        zero = x.new_zeros(())
        return {name: torch.stack([zero if v is None else v for v in col])
                for name, col in columns.items()}

    def _reduce_member_gradients(self) -> None:
        """After the member passes' backward: combine the stacked gradients across
        data-parallel ranks (one process: nothing to do)."""

    def _run_split(self, split: Split, name: str, plans, epoch: int, train: bool
                   ) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        for idx, count, size in self._batches(len(split), train, epoch):
            idx = idx.to(self.device)
            flat = idx.reshape(-1)
            if train:
                self._before_train_step(count / size)
            terms = self.step(split.features[flat], split.mask[flat], plans,
                              self.v_prior(name, idx, plans), train)
            for key, v in terms.items():
                sums[key] = sums.get(key, 0.0) + v * count
        names = sorted(sums)
        totals = self._sum_across_ranks(torch.stack([sums[key] for key in names]))
        return {key: v / len(split) for key, v in zip(names, totals)}       # (K,) each

    def _before_train_step(self, share: float) -> None:
        """Called before each training step with this rank's share of the global batch."""

    def _sum_across_ranks(self, totals: torch.Tensor) -> torch.Tensor:
        """Per-rank sums (terms, K) -> sums over all ranks; one process holds them all."""
        return totals

    def run_epoch(self, epoch: int) -> list[dict | None]:
        """One epoch of every member still training; returns each member's record (None for
        finished members)."""
        plans = self.prepare_epoch(epoch)
        for k, cfg in enumerate(self.cfgs):
            self.generators[k].manual_seed(epoch_seed(cfg.seed, epoch, self.rank))
        t0 = time.perf_counter()
        self.model.train()
        train = self._run_split(self.train_split, "train", plans, epoch, train=True)
        val = self._run_split(self.val_split, "val", plans, epoch, train=False)
        seconds = time.perf_counter() - t0
        records: list[dict | None] = []
        for k, plan in enumerate(plans):
            if plan is None:
                records.append(None)
                continue
            own = [n for n in train if plan.swaps or n not in SWAP_TERMS]
            record = {"epoch": epoch, "stage": plan.stage, "seconds": seconds,
                      **{f"train_{n}": float(train[n][k]) for n in own},
                      **{f"val_{n}": float(val[n][k]) for n in own}}
            improved = False
            early = self.early[k]
            if plan.last_stage:
                if record["val_loss"] < early["best_val"]:
                    early.update(best_val=record["val_loss"], best_epoch=epoch, bad_epochs=0)
                    improved = True
                else:
                    early["bad_epochs"] += 1
            record["improved"] = improved
            self.history[k].append(record)
            records.append(record)
        self.epoch = epoch + 1
        for k, record in enumerate(records):
            if record is None:
                continue
            cfg = self.cfgs[k]
            if (self.early[k]["bad_epochs"] >= cfg.schedule.patience
                    or self.epoch >= self.end[k]):
                self.done[k] = True
        return records

    def fit(self, resume: bool = True, save: bool = True,
            after_epoch: Callable[[list[dict | None]], None] | None = None) -> list[dict]:
        """Train every member to its max_epochs or early stop. With `save` (rank 0 of a
        data-parallel pack), writes each member's best.pt (when its val loss improves) and
        last.pt (when it finishes) in its run folder, and pack.pt every checkpoint.every epochs
        (of the first member's config) and at the end. `callbacks` get (k, record) per member
        still training, then `after_epoch` gets the epoch's records. Returns one summary per
        member (Trainer.fit's keys)."""
        if resume:
            self.resume()
        end = max(self.end)
        every = self.cfgs[0].checkpoint.every
        bar = tqdm(total=end, initial=self.epoch, disable=not self.progress,
                   desc=f"pack of {self.k}", unit="epoch", dynamic_ncols=True)
        try:
            while self.epoch < end and not all(self.done):
                records = self.run_epoch(self.epoch)
                for k, record in enumerate(records):
                    if record is None or not save:
                        continue
                    if record["improved"]:
                        checkpoint.save(self.member_state_dict(k),
                                        f"{self.run_dir(k)}/best.pt", self.endpoint)
                    if self.done[k]:
                        checkpoint.save(self.member_state_dict(k),
                                        f"{self.run_dir(k)}/last.pt", self.endpoint)
                if save and (self.epoch % every == 0 or all(self.done)):
                    checkpoint.save(self.state_dict(), self.pack_uri, self.endpoint)
                for k, record in enumerate(records):
                    if record is not None:
                        for cb in self.callbacks:
                            cb(k, record)
                if after_epoch is not None:
                    after_epoch(records)
                bar.update(1)
        finally:
            bar.close()
        return [self.summary(k) for k in range(self.k)]

    def summary(self, k: int) -> dict:
        cfg = self.cfgs[k]
        epochs_run = len(self.history[k]) and self.history[k][-1]["epoch"] + 1
        stopped = self.early[k]["bad_epochs"] >= cfg.schedule.patience
        return {"epochs_run": epochs_run, "stopped_early": stopped,
                "best_val": self.early[k]["best_val"], "best_epoch": self.early[k]["best_epoch"],
                "best_checkpoint": f"{self.run_dir(k)}/best.pt",
                "last_checkpoint": f"{self.run_dir(k)}/last.pt", "finished": self.done[k]}


def _as(split: Split, device: torch.device, dtype: torch.dtype) -> Split:
    split = split.to(device)
    if split.features.dtype != dtype:
        split = Split(**{**split.__dict__, "features": split.features.to(dtype)})
    return split


__all__ = ["PackedAdam", "PackedTrainer", "check_packable", "pack_signature", "SHARED_KEYS"]
