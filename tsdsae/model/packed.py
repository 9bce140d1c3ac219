"""Packed trials: K models of one architecture as one model (horizontal fusion, Wang et al.,
"Horizontally Fused Training Array", MLSys 2021).

K members share the option strings and sizes of one ModelConfig and differ in their weights (and,
in tsdsae.packed_train, in seed, variant, learning rate, amsgrad, swap weights and stage). Every
parameter is stacked: a member's nn.Linear(in, out) becomes weight (K, out, in), bias (K, out),
and every frame-wise linear map is one batched product (`torch.baddbmm`) over the K members.
LSTMs are K independent LSTMs advanced together: one batched input projection for all timesteps,
then a recurrence over t on (K, B, H) state with batched weights (`torch.func.vmap` has no
batching rule for cuDNN RNNs, so none is used).

Layout. A packed batch holds K blocks of B rows, member k's clips at rows k*B .. (k+1)*B - 1. The
model's own forward (tsdsae.model.dsae.DSAE.forward, unchanged) concatenates batches along the
rows (the decoder sees the reconstruction and both swaps, 3 chunks of K*B rows): a tensor of
G*K*B rows is G chunks, each K member blocks of B rows, and row r belongs to member (r // B) % K.
`PackState.batch` holds B while a pass runs; every packed layer reads it. Per-member losses reduce
over the rows of one member (tsdsae.losses, `members=K`).

Randomness. Each member draws its reparameterisation noise from its own generator
(`MemberNoise`, installed with tsdsae.model.layers.noise_source), in the same order and shapes
as an unpacked run draws from torch's global generator, so a member's samples do not depend on
the pack it is in or on K.

`PackedDSAE([DSAE, ...])` packs plain models; `member(k)` / `member_state_dict(k)`
unpack one (the same state-dict keys as the plain model), so checkpoints, evaluation and figures
of a member are those of a plain run. `member_view(k)` is member k as a plain DSAE sharing the
pack's memory (parameters and gradients): tsdsae.packed_train runs a CPU pack's passes member
by member through it, with the unpacked trainer's own CPU pass.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import torch
from torch import nn

from tsdsae.model import fast_cpu
from tsdsae.model.dsae import DSAE
from tsdsae.model.layers import MLP, DiagNormal


class PackState:
    """What every packed layer of one pack shares: `members` K, `batch` B (rows per member in the
    current pass) and `drawing` (K,) bool, which members draw noise now (see MemberNoise).
    Deep copies return the same object (the snapshot of a packed encoder stays in its pack)."""

    def __init__(self, members: int):
        self.members = members
        self.batch: int | None = None
        self.drawing: list[bool] = [True] * members

    def __deepcopy__(self, memo) -> "PackState":
        return self

    def chunks(self, rows: int) -> int:
        """G of a tensor of `rows` = G * K * B rows. Raises RuntimeError outside a pass and
        ValueError when the rows are not whole chunks."""
        if self.batch is None:
            raise RuntimeError("a packed layer ran outside a pass of its PackedDSAE "
                               "(call the model's forward/encode/decode/informed_prior)")
        k, b = self.members, self.batch
        if rows % (k * b):
            raise ValueError(f"{rows} rows are not whole chunks of {k} members x {b} rows")
        return rows // (k * b)

    @contextlib.contextmanager
    def draws(self, drawing: Sequence[bool]) -> Iterator[None]:
        """Only the members with drawing[k] draw noise inside the block (the others get zeros
        and leave their generators untouched)."""
        before, self.drawing = self.drawing, [bool(d) for d in drawing]
        try:
            yield
        finally:
            self.drawing = before


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  state: PackState) -> torch.Tensor:
    """Each member's x W_k^T + b_k: x (R, ..., I) with R = G*K*B rows (PackState layout),
    weight (K, O, I), bias (K, O) or None -> (R, ..., O). One batched matrix product (for
    G > 1 the chunks are gathered per member first)."""
    k, rows, width = weight.shape[0], x.shape[0], x.shape[-1]
    g = state.chunks(rows)
    inner = x.shape[1:-1]
    if g == 1:
        xs = x.reshape(k, -1, width)                                   # (K, B*M, I): a view
    else:
        xs = x.reshape(g, k, -1, width).transpose(0, 1).reshape(k, -1, width)
    wt = weight.transpose(1, 2)
    y = torch.bmm(xs, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), xs, wt)
    if g != 1:
        y = y.reshape(k, g, -1, y.shape[-1]).transpose(0, 1)
    return y.reshape(rows, *inner, weight.shape[1])


def _stack(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).clone())


class PackedLinear(nn.Module):
    """K nn.Linear(in, out) of the same shape: weight (K, out, in), bias (K, out)."""

    def __init__(self, linears: Sequence[nn.Linear], state: PackState):
        super().__init__()
        self.weight = _stack([m.weight for m in linears])
        self.bias = _stack([m.bias for m in linears]) if linears[0].bias is not None else None
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias, self.state)


def _lstm_step(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's LSTM cell from pre-activations (R, 4H) in gate order i, f, g, o."""
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class PackedLSTM(nn.Module):
    """K unidirectional nn.LSTM(batch_first=True) of the same sizes and layers. Parameters keep
    nn.LSTM's names (weight_ih_l0, ...) with a leading K. x (R, T, I) -> (output (R, T, H),
    (h_n, c_n) (L, R, H)), as nn.LSTM without an initial state."""

    def __init__(self, lstms: Sequence[nn.LSTM], state: PackState):
        super().__init__()
        first = lstms[0]
        if first.bidirectional or not first.batch_first or not first.bias or first.proj_size:
            raise ValueError("packing supports unidirectional batch-first LSTMs with biases "
                             "(what tsdsae.model builds)")
        self.num_layers, self.hidden_size = first.num_layers, first.hidden_size
        for name, _ in first.named_parameters():
            setattr(self, name, _stack([getattr(m, name) for m in lstms]))
        self.state = state

    def forward(self, x: torch.Tensor, hx=None):
        if hx is not None:
            raise ValueError("PackedLSTM starts from a zero state")
        rows, steps, _ = x.shape
        h_layer, last_h, last_c = x, [], []
        for layer in range(self.num_layers):
            w = {n: getattr(self, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh",
                                                              "bias_ih", "bias_hh")}
            # one input projection for every timestep, time-major for the recurrence
            gx = packed_linear(h_layer, w["weight_ih"], w["bias_ih"], self.state)
            # unbind, not gx[t]: one backward node for all steps (indexing would write a full
            # (T, R, 4H) zero gradient per step)
            gx = gx.transpose(0, 1).contiguous().unbind(0)                  # T x (R, 4H)
            h = x.new_zeros(rows, self.hidden_size)
            c = x.new_zeros(rows, self.hidden_size)
            outs = []
            for t in range(steps):
                gates = gx[t] + packed_linear(h, w["weight_hh"], w["bias_hh"], self.state)
                h, c = _lstm_step(gates, c)
                outs.append(h)
            h_layer = torch.stack(outs, dim=1)
            last_h.append(h)
            last_c.append(c)
        return h_layer, (torch.stack(last_h), torch.stack(last_c))


class PackedLSTMCell(nn.Module):
    """K nn.LSTMCell of the same sizes: x (R, I), (h, c) (R, H) -> (h', c')."""

    def __init__(self, cells: Sequence[nn.LSTMCell], state: PackState):
        super().__init__()
        if cells[0].bias is None or not isinstance(cells[0].bias_ih, torch.Tensor):
            raise ValueError("packing supports LSTM cells with biases")
        self.hidden_size = cells[0].hidden_size
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            setattr(self, name, _stack([getattr(m, name) for m in cells]))
        self.state = state

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor]):
        h, c = hx
        gates = (packed_linear(x, self.weight_ih, self.bias_ih, self.state)
                 + packed_linear(h, self.weight_hh, self.bias_hh, self.state))
        return _lstm_step(gates, c)


class PackedMLP(MLP):
    """K MLPs (Linear -> tanh per layer, tsdsae.model.layers.MLP) of the same sizes; its
    Linears become PackedLinear (same names, layers.0.weight, ...). Evaluated in sigmoid form,
    tanh(a) = 2 sigmoid(2a) - 1, with the affine parts folded into the next layer's weights
    (tsdsae.model.fast_cpu.on_half): one batched product and one sigmoid per layer. Same
    function as the plain MLP."""

    def __init__(self, mlp: MLP):
        nn.Module.__init__(self)
        self.layers = copy.deepcopy(mlp.layers)
        self.out_dim = mlp.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kinds = [type(m) for m in self.layers]
        if kinds != [PackedLinear, nn.Tanh] * (len(kinds) // 2):
            return self.layers(x)                      # not Linear -> tanh: as it is
        s = x
        for i, lin in enumerate(self.layers[0::2]):
            # after the first layer, s is the previous layer's sigmoid form
            w, b = fast_cpu.on_half(lin.weight, lin.bias) if i else (lin.weight, lin.bias)
            s = torch.sigmoid(packed_linear(s, 2.0 * w, 2.0 * b, lin.state))
        return 2.0 * s - 1.0


def _share_slices(plain: nn.Module, packed: nn.Module, k: int) -> None:
    """Replace every parameter of `plain` by a parameter viewing the k-th slice of the packed
    parameter of the same name (same storage). nn.LSTM's setattr keeps its flat weights in step."""
    stacked = dict(packed.named_parameters())
    for name, q in list(plain.named_parameters()):
        parent, _, leaf = name.rpartition(".")
        shared = nn.Parameter(stacked[name].detach()[k], requires_grad=q.requires_grad)
        setattr(plain.get_submodule(parent) if parent else plain, leaf, shared)


_PACKED = {nn.Linear: PackedLinear, nn.LSTM: PackedLSTM, nn.LSTMCell: PackedLSTMCell,
           MLP: PackedMLP}


class MemberNoise:
    """A noise source (tsdsae.model.layers.noise_source) drawing each member's rows from its own
    generator: for a (G*K*B, ...) draw, member k gets `normal_` of a (G*B, ...) tensor from
    generators[k], exactly what an unpacked run draws from the global generator at that point.
    Members not drawing (PackState.draws) get zeros."""

    def __init__(self, state: PackState, generators: Sequence[torch.Generator]):
        self.state, self.generators = state, list(generators)

    def __call__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device
                 ) -> torch.Tensor:
        k, b = self.state.members, self.state.batch
        g = self.state.chunks(shape[0])
        eps = torch.zeros((g, k, b, *shape[1:]), dtype=dtype, device=device)
        for m, gen in enumerate(self.generators):
            if self.state.drawing[m]:
                draw = torch.empty((g * b, *shape[1:]), dtype=dtype, device=device)
                eps[:, m] = draw.normal_(generator=gen).view(g, b, *shape[1:])
        return eps.view(shape)


def block_permutation(perms: Sequence[torch.Tensor]) -> torch.Tensor:
    """One permutation of K*B packed rows from K permutations of B rows (member k's rows
    k*B .. (k+1)*B - 1 permuted by perms[k] among themselves)."""
    b = perms[0].numel()
    return torch.cat([p + k * b for k, p in enumerate(perms)])


class PackedDSAE(DSAE):
    """K DSAE members of one ModelConfig in one model (see the module docstring).

    Every method of DSAE works on packed batches: x (K*B, T, F), mask (K*B, T), member k's rows
    k*B .. (k+1)*B - 1; outputs have the same row layout. Parameters are (K, ...) stacks with the
    plain model's names. The snapshot (informed prior) is a packed copy of the global encoder
    whose member slices are set at each member's own switch (`take_member_snapshot`).
    """

    def __init__(self, members: Sequence[DSAE]):
        if not members:
            raise ValueError("a pack needs at least one member")
        cfg = members[0].cfg
        for m in members[1:]:
            if m.cfg != cfg:
                raise ValueError("pack members must share one architecture (ModelConfig); "
                                 f"got {cfg} and {m.cfg}")
        with torch.random.fork_rng(devices=[]):        # building the shell draws no member's RNG
            super().__init__(cfg)
        self.pack = PackState(len(members))
        self.swap_members = [True] * len(members)      # who draws the swap re-encoding's noise
        self._snapshot_members = [False] * len(members)
        for name, module in list(members[0].named_modules()):
            kind = _PACKED.get(type(module))
            if kind is None:
                if any(True for _ in module.parameters(recurse=False)):
                    raise ValueError(f"cannot pack {name} ({type(module).__name__})")
                continue
            parent, _, leaf = name.rpartition(".")
            # an MLP keeps its structure (its Linears are packed as the walk reaches them)
            packed = (kind(module) if kind is PackedMLP
                      else kind([m.get_submodule(name) for m in members], self.pack))
            setattr(self.get_submodule(parent) if parent else self, leaf, packed)
        snaps = [m.snapshot_state_dict() for m in members]
        for k, snap in enumerate(snaps):
            if snap is not None:
                self.take_member_snapshot(k, snap)

    @property
    def members(self) -> int:
        return self.pack.members

    def _rows(self, x: torch.Tensor) -> None:
        k = self.pack.members
        if x.shape[0] % k:
            raise ValueError(f"a packed batch has K x B rows; got {x.shape[0]} for K = {k}")
        self.pack.batch = x.shape[0] // k

    # -- entry points: each sets B for the packed layers ----------------------------------------

    def forward(self, x, mask, swap_perms=None):
        self._rows(x)
        return super().forward(x, mask, swap_perms)

    def reencode_swaps(self, x_swap, mask):
        """DSAE.reencode_swaps; only the members listed in `swap_members` draw its noise (an
        unpacked run without swaps never draws it)."""
        with self.pack.draws(self.swap_members):
            return super().reencode_swaps(x_swap, mask)

    def encode(self, x, mask, sample=True):
        self._rows(x)
        return super().encode(x, mask, sample)

    def decode(self, z, v, mask=None):
        self._rows(z)
        return super().decode(z, v, mask)

    def informed_prior(self, x, mask) -> DiagNormal:
        self._rows(x)
        return super().informed_prior(x, mask)

    # -- members --------------------------------------------------------------------------------

    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's weights under the plain model's keys (a DSAE state dict)."""
        return {name: t[k].detach().clone() for name, t in self.state_dict().items()}

    def member_snapshot_state_dict(self, k: int) -> dict[str, torch.Tensor] | None:
        if self._snapshot is None or not self._snapshot_members[k]:
            return None
        return {name: t[k].detach().clone() for name, t in self._snapshot.state_dict().items()}

    def load_member(self, k: int, state: dict[str, torch.Tensor],
                    snapshot: dict[str, torch.Tensor] | None = None) -> None:
        """Set member k from a plain DSAE state dict (and its snapshot, if any). Raises
        KeyError/RuntimeError when the keys or shapes differ."""
        state = self.legacy_key_names(state)
        own = self.state_dict()
        if set(own) != set(state):
            raise KeyError(f"member state keys differ: missing {sorted(set(own) - set(state))}, "
                           f"unexpected {sorted(set(state) - set(own))}")
        with torch.no_grad():
            for name, t in own.items():
                t[k].copy_(state[name])
        if snapshot is not None:
            self.take_member_snapshot(k, snapshot)

    def member(self, k: int) -> DSAE:
        """Member k as a plain DSAE (weights and snapshot copied)."""
        p = next(self.parameters())
        with torch.random.fork_rng(devices=[]):
            model = DSAE(self.cfg).to(device=p.device, dtype=p.dtype)
        model.load_state_dict(self.member_state_dict(k))
        model.load_snapshot_state_dict(self.member_snapshot_state_dict(k))
        return model

    def member_view(self, k: int) -> DSAE:
        """Member k as a plain DSAE that shares this pack's memory (no copy): its parameters are
        views of the k-th slices of the stacked parameters, so an update of the pack shows in
        it, and its snapshot (when member k has one) views the packed snapshot's k-th slices.
        Its gradients are bound to the k-th slices of the stacked gradients (allocated as zeros
        when missing): a backward through the view accumulates there. `bind_member_grads`
        re-binds them after `set_trainable` on the view (which clears the frozen ones)."""
        with torch.random.fork_rng(devices=[]):
            p0 = next(self.parameters())
            view = DSAE(self.cfg).to(device=p0.device, dtype=p0.dtype)
        _share_slices(view, self, k)
        if self._snapshot is not None and self._snapshot_members[k]:
            view.take_snapshot()
            _share_slices(view._snapshot, self._snapshot, k)
        for p in self.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.bind_member_grads(view, k)
        return view

    def bind_member_grads(self, view: DSAE, k: int) -> None:
        """Point the .grad of each of `view`'s trainable parameters at the k-th slice of the
        stacked gradient (frozen ones get none), see `member_view`."""
        stacked = dict(self.named_parameters())
        for name, q in view.named_parameters():
            q.grad = stacked[name].grad[k] if q.requires_grad else None

    def take_member_snapshot(self, k: int, state: dict[str, torch.Tensor] | None = None
                             ) -> None:
        """Freeze member k's global encoder (or `state`, a plain VPosterior state dict) as its
        informed prior; the other members' snapshots are unchanged."""
        if self._snapshot is None:
            self.take_snapshot()
        src = self.v_posterior.state_dict() if state is None else None
        with torch.no_grad():
            for name, t in self._snapshot.state_dict().items():
                t[k].copy_(state[name] if state is not None else src[name][k])
        self._snapshot_members[k] = True


__all__ = ["PackState", "PackedDSAE", "PackedLinear", "PackedMLP", "PackedLSTM", "PackedLSTMCell",
           "MemberNoise", "block_permutation", "packed_linear"]
