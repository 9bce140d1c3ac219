"""Checkpoint files: one torch.save'd dict of tensors and plain values, loadable with
`torch.load(..., weights_only=True)` (nothing is unpickled but tensors and containers).

Contents: format, config (flat dotted keys), epoch (last finished), stage, model state, snapshot
state (the informed prior, or None), optimiser state, RNG state, early-stopping state, history.
Locations are local paths or s3:// URIs; bytes are read and written by tsdsae.storage (atomic
writes, S3 retries). `restore_model` is the one place that checks a checkpoint fits a model.
"""
from __future__ import annotations

import io

import torch

from tsdsae.storage import ObjectNotFound, open_store

FORMAT = 1
MAX_LISTED = 5          # mismatching keys named in a CheckpointError


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, of another format, or not fitting the model
    its config (or the run) describes. The message names the file, what does not match and what
    to do."""


def _split(uri: str) -> tuple[str, str]:
    """"dir/name.pt" -> ("dir", "name.pt"); a bare name lives in the working directory."""
    parent, _, name = str(uri).rstrip("/").rpartition("/")
    return parent or ".", name


def to_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def from_bytes(data: bytes, map_location="cpu") -> dict:
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def save(state: dict, uri: str, endpoint_url: str | None = None) -> str:
    """Write atomically through tsdsae.storage (a reader never sees half a checkpoint; S3 writes
    use its patient TRANSFER retries). Returns the checkpoint's full location."""
    parent, name = _split(uri)
    store = open_store(parent, endpoint_url=endpoint_url)
    store.write_bytes(name, to_bytes({"format": FORMAT, **state}))
    return store.url(name)


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    parent, name = _split(uri)
    return open_store(parent, endpoint_url=endpoint_url).exists(name)


def load(uri: str, map_location="cpu", endpoint_url: str | None = None) -> dict:
    """The checkpoint dict at `uri` (loaded with weights_only=True).

    Raises FileNotFoundError (tsdsae.storage.ObjectNotFound) when there is none, CheckpointError
    when the file is not a readable checkpoint of this format, StorageError when the location
    cannot be reached."""
    parent, name = _split(uri)
    try:
        data = open_store(parent, endpoint_url=endpoint_url).read_bytes(name)
    except ObjectNotFound:
        raise ObjectNotFound(f"no checkpoint at {uri}; check the path (runs/NAME/best.pt or "
                             "last.pt)") from None
    try:
        state = from_bytes(data, map_location)
    except Exception as exc:   # truncated or foreign file
        raise CheckpointError(
            f"{uri} is not a readable tsdsae checkpoint ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it or point at another "
            "checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{uri}: checkpoint format {found!r}, expected {FORMAT}; it was "
                              "not written by this version of tsdsae")
    return state


def mismatches(expected: dict, found, prefix: str = "") -> list[str]:
    """How a state dict `found` differs from the model's own `expected` (name -> tensor):
    missing keys, unexpected keys and differing shapes, one line each, sorted."""
    if not isinstance(found, dict):
        return [f"{prefix or 'model'}: no weights ({type(found).__name__})"]
    out = [f"missing {prefix}{k} {tuple(v.shape)}" for k, v in expected.items() if k not in found]
    out += [f"unexpected {prefix}{k}" for k in found if k not in expected]
    out += [f"{prefix}{k}: shape {tuple(found[k].shape)} in the checkpoint, "
            f"{tuple(v.shape)} in the model" for k, v in expected.items()
            if k in found and hasattr(found[k], "shape") and tuple(found[k].shape) != tuple(v.shape)]
    return sorted(out)


def non_finite(weights: dict, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in `weights` (name -> tensor) that hold NaN or inf."""
    return [f"{prefix}{k}" for k, v in weights.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


def restore_model(model, state: dict, uri: str, fix: str = "") -> None:
    """Load the model weights and the informed-prior snapshot of `state` into `model` (a DSAE
    built from the config the weights are meant for).

    Raises CheckpointError naming `uri`, the first MAX_LISTED mismatching keys/shapes and `fix`
    (what to do; default: use a checkpoint of the same configuration) when they do not fit, and
    when a weight holds NaN or inf (a diverged run: refused by resume, evaluate, swap, export).
    """
    weights = state.get("model")
    if isinstance(weights, dict) and hasattr(model, "legacy_key_names"):
        weights = model.legacy_key_names(weights)       # earlier key names of the same weights
    problems = mismatches(model.state_dict(), weights)
    if not problems:
        bad = non_finite(weights) + non_finite(state.get("snapshot") or {}, "snapshot.")
        if bad:
            raise CheckpointError(
                f"{uri} holds non-finite weights (NaN or inf in {', '.join(bad[:MAX_LISTED])}"
                f"{' and more' if len(bad) > MAX_LISTED else ''}): the run it comes from "
                "diverged; use an earlier checkpoint, or train again with a lower optim.lr")
    snapshot = state.get("snapshot")
    if not problems and snapshot is not None:
        model.take_snapshot()                      # the snapshot's own shapes, from this config
        problems = mismatches(model.snapshot_state_dict(), snapshot, "snapshot.")
    if not problems:
        try:
            model.load_state_dict(weights)
            model.load_snapshot_state_dict(snapshot)
            return
        except (RuntimeError, ValueError) as exc:
            problems = [str(exc).strip().splitlines()[-1]]
    raise mismatch_error(uri, problems, fix)


def mismatch_error(uri: str, problems: list[str], fix: str = "") -> CheckpointError:
    shown = "; ".join(problems[:MAX_LISTED])
    more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
    fix = fix or ("use a checkpoint written with this configuration, or pass the configuration "
                  "it was trained with")
    return CheckpointError(f"{uri} does not fit its configuration: {len(problems)} mismatching "
                           f"weight(s): {shown}{more}; {fix}")


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
