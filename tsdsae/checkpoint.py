"""Checkpoint files: one torch.save'd dict of tensors and plain values, loadable with
`torch.load(..., weights_only=True)` (nothing is unpickled but tensors and containers).

Contents: format, config (flat dotted keys), epoch (last finished), stage, model state, snapshot
state (the informed prior, or None), optimiser state, RNG state, early-stopping state, history.
Locations are local paths or s3:// URIs (through tsdsae.storage).
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch

FORMAT = 1


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def to_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def from_bytes(data: bytes, map_location="cpu") -> dict:
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def save(state: dict, uri: str, endpoint_url: str | None = None) -> str:
    """Write atomically (a reader never sees half a checkpoint). Returns the URI."""
    state = {"format": FORMAT, **state}
    data = to_bytes(state)
    if _is_remote(uri):
        from tsdsae.storage import open_store   # only the storage module talks to object stores
        parent, name = uri.rsplit("/", 1)
        open_store(parent, endpoint_url=endpoint_url).write_bytes(name, data)
        return uri
    path = _local(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return str(path)


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    if _is_remote(uri):
        from tsdsae.storage import open_store
        parent, name = uri.rsplit("/", 1)
        return open_store(parent, endpoint_url=endpoint_url).exists(name)
    return _local(uri).is_file()


def load(uri: str, map_location="cpu", endpoint_url: str | None = None) -> dict:
    if _is_remote(uri):
        from tsdsae.storage import open_store
        parent, name = uri.rsplit("/", 1)
        data = open_store(parent, endpoint_url=endpoint_url).read_bytes(name)
    else:
        path = _local(uri)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {uri}")
        data = path.read_bytes()
    try:
        state = from_bytes(data, map_location)
    except Exception as exc:   # truncated or foreign file
        raise ValueError(f"{uri} is not a readable tsdsae checkpoint ({exc.__class__.__name__}: "
                         f"{exc}); delete it or point at another checkpoint") from exc
    if state.get("format") != FORMAT:
        raise ValueError(f"{uri}: checkpoint format {state.get('format')!r}, expected {FORMAT}")
    return state


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
