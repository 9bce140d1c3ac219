"""Writing datasets: stratified splits, deterministic tar shards, resumable builds, the manifest.

A preparation is a *plan* (JSON: which clips go to which split, with their labels) plus a
*render* function that turns one shard's plan items into samples. `build_dataset` then

1. returns at once if the output already holds a manifest made with the same parameters;
2. records the plan in `_prep_state.json` (so an interrupted run resumes with the same plan,
   without redoing expensive planning such as CREPE);
3. writes every shard that is not already there and intact (shard bytes are a pure function of the
   plan: sorted members, fixed tar metadata, deterministic rendering, so checksums are stable);
4. writes `dataset.json` last, so a reader never sees a half-written dataset.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import platform
import re
import tarfile
from typing import Callable, Mapping, Sequence

import numpy as np

from tsdsae import features
from tsdsae.data import (AUDIO_EXT, FEATURE_EXT, KEY_RE, LABEL_EXT, MANIFEST_NAME, SCHEMA_VERSION,
                         ShardError, check_sample, iter_shard_samples)
from data_prep.parallel import Executor
from tsdsae.storage import ObjectNotFound, Store

STATE_NAME = "_prep_state.json"
SHARD_RE = re.compile(r"^[a-z]+-\d{6}\.tar$")
SPLITS = ("train", "val", "test")




def sanitize_key(text: str, max_len: int = 100) -> str:
    """A safe sample key / tar member stem: [A-Za-z0-9_-] only (no slashes, dots or '..')."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_")[:max_len]
    return key or "sample"


def parse_fractions(fractions: Sequence[float] | Mapping[str, float]) -> dict[str, float]:
    """(train, val[, test]) or a mapping -> {"train": f, "val": f, "test": f}, checked to sum to 1."""
    if isinstance(fractions, Mapping):
        out = {name: float(fractions.get(name, 0.0)) for name in SPLITS}
        unknown = set(fractions) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split names {sorted(unknown)}; use {SPLITS}")
    else:
        values = [float(f) for f in fractions]
        if not 2 <= len(values) <= 3:
            raise ValueError(f"fractions {fractions!r}: give train,val[,test]")
        out = dict(zip(SPLITS, values + [0.0] * (3 - len(values))))
    if any(f < 0 for f in out.values()) or abs(sum(out.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {out} must be non-negative and sum to 1")
    if out["train"] <= 0:
        raise ValueError("the train fraction must be positive")
    return out


def stratified_split(labels: Sequence[str], fractions: Mapping[str, float],
                     seed: int) -> dict[str, list[int]]:
    """Indices per split, the same fractions within every label (largest-remainder rounding).

    Deterministic in (labels, fractions, seed). Within a split the order is shuffled, so shards
    mix labels.
    """
    rng = np.random.default_rng(seed)
    names = [name for name in SPLITS if name in fractions]
    out: dict[str, list[int]] = {name: [] for name in names}
    labels = list(labels)
    for label in sorted(set(labels)):
        idx = rng.permutation([i for i, lab in enumerate(labels) if lab == label])
        exact = np.array([fractions[name] * len(idx) for name in names])
        counts = np.floor(exact).astype(int)
        for j in np.argsort(-(exact - counts), kind="stable")[: len(idx) - counts.sum()]:
            counts[j] += 1
        start = 0
        for name, count in zip(names, counts):
            out[name] += idx[start:start + count].tolist()
            start += count
    return {name: [int(i) for i in rng.permutation(ix)] for name, ix in out.items()}


def group_counts(n_groups: int, fractions: Sequence[float]) -> list[int]:
    """How many of `n_groups` groups each split gets: largest-remainder rounding of
    n_groups * fraction, then one group moved to every split with a positive fraction and none,
    from the split with the most (while that one keeps at least one)."""
    exact = np.array([f * n_groups for f in fractions], dtype=float)
    counts = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - counts), kind="stable")[: n_groups - counts.sum()]:
        counts[j] += 1
    for j, f in enumerate(fractions):
        if f > 0 and counts[j] == 0:
            donor = int(np.argmax(counts))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[j] += 1
    return [int(c) for c in counts]


def grouped_split(labels: Sequence[str], groups: Sequence[str], fractions: Mapping[str, float],
                  seed: int) -> dict[str, list[int]]:
    """Indices per split such that all items of one group (e.g. one source recording) share a
    split; groups are split per label with `group_counts`. Deterministic in (labels, groups,
    fractions, seed); the order within a split is shuffled.

    Every item of a group must carry the same label (ValueError otherwise).
    """
    rng = np.random.default_rng(seed)
    names = [name for name in SPLITS if name in fractions]
    label_of: dict[str, str] = {}
    members: dict[str, list[int]] = {}
    for i, (label, group) in enumerate(zip(labels, groups)):
        if label_of.setdefault(group, label) != label:
            raise ValueError(f"group {group!r} holds items of labels {label_of[group]!r} and "
                             f"{label!r}")
        members.setdefault(group, []).append(i)
    out: dict[str, list[int]] = {name: [] for name in names}
    for label in sorted(set(label_of.values())):
        mine = sorted(g for g, lab in label_of.items() if lab == label)
        order = [mine[k] for k in rng.permutation(len(mine))]
        start = 0
        for name, count in zip(names, group_counts(len(order), [fractions[n] for n in names])):
            for group in order[start:start + count]:
                out[name] += members[group]
            start += count
    return {name: [int(i) for i in rng.permutation(ix)] for name, ix in out.items()}


# --- samples and tar files ------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """One clip ready for a shard: features float32 (T, F), labels (JSON-able), int16 audio (S,)."""

    key: str
    features: np.ndarray
    labels: dict
    audio: np.ndarray


def encode_sample(sample: Sample) -> list[tuple[str, bytes]]:
    """Tar members of one sample, in the fixed order flac, json, npy."""
    import soundfile as sf

    if not KEY_RE.match(sample.key):
        raise ValueError(f"sample key {sample.key!r} is not sanitised (use sanitize_key)")
    npy = io.BytesIO()
    np.save(npy, np.ascontiguousarray(sample.features, dtype=np.float32), allow_pickle=False)
    labels = json.dumps(sample.labels, sort_keys=True, separators=(",", ":")).encode("utf-8")
    flac = io.BytesIO()
    sf.write(flac, np.asarray(sample.audio, dtype=np.int16), features.SAMPLE_RATE, format="FLAC",
             subtype="PCM_16")
    return [(f"{sample.key}.{AUDIO_EXT}", flac.getvalue()), (f"{sample.key}.{LABEL_EXT}", labels),
            (f"{sample.key}.{FEATURE_EXT}", npy.getvalue())]


def tar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    """A tar archive of (name, bytes) with fixed metadata (mtime 0, uid/gid 0, mode 0444).

    Same members in, same bytes out: this is what makes shard checksums reproducible.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def shard_bytes(samples: Sequence[Sample]) -> bytes:
    return tar_bytes([m for s in samples for m in encode_sample(s)])


# --- the build --------------------------------------------------------------------------------------


@dataclasses.dataclass
class ShardTask:
    """One shard to write: its split, index and plan items (dicts with at least key, instrument)."""

    split: str
    index: int
    items: list[dict]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


def plan_tasks(plan: dict, samples_per_shard: int) -> list[ShardTask]:
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
    tasks = []
    for split in SPLITS:
        items = plan["splits"].get(split, [])
        for index, start in enumerate(range(0, len(items), samples_per_shard)):
            tasks.append(ShardTask(split, index, items[start:start + samples_per_shard]))
    return tasks


def manifest_core(instruments: Sequence[str]) -> dict:
    """The fields a shard is checked against (shared by the final manifest)."""
    return {"schema_version": SCHEMA_VERSION, "feature_params": dict(features.FEATURE_PARAMS),
            "sample_rate": features.SAMPLE_RATE, "clip_seconds": features.CLIP_SECONDS,
            "clip_samples": features.CLIP_SAMPLES,
            "num_frames": features.num_frames(features.CLIP_SAMPLES),
            "sample_keys": {"features": FEATURE_EXT, "labels": LABEL_EXT, "audio": AUDIO_EXT},
            "instruments": list(instruments)}


def versions() -> dict:
    import soundfile
    import torch
    import torchaudio

    from importlib.metadata import PackageNotFoundError, version

    try:
        tsdsae_version = version("tsdsae")
    except PackageNotFoundError:
        tsdsae_version = "source"
    return {"tsdsae": tsdsae_version, "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__,
            "torchaudio": torchaudio.__version__, "soundfile": soundfile.__version__,
            "libsndfile": soundfile.__libsndfile_version__}


def _existing_shard(store: Store, task: ShardTask, core: dict) -> dict | None:
    """Stats of an already written shard if it is intact and holds exactly the task's keys."""
    try:
        data = store.read_bytes(task.name)
    except ObjectNotFound:
        return None
    try:
        keys = [check_sample(raw, core, task.name, decode_audio=True)["key"]
                for raw in iter_shard_samples(data, None, task.name)]
    except ShardError:
        return None
    if keys != [item["key"] for item in task.items]:
        return None
    return {"name": task.name, "num_samples": len(keys), "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data)}


def _clear_outputs(store: Store) -> None:
    for rel in store.list():
        if SHARD_RE.match(rel) or rel in (MANIFEST_NAME, STATE_NAME):
            store.delete(rel)


def _param_diff(stored, wanted: dict, limit: int = 4) -> str:
    """'name: stored -> wanted' for the first `limit` parameters that differ (for messages)."""
    stored = stored if isinstance(stored, dict) else {}
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    parts = [f"{k}: {_short(stored.get(k, 'absent'))} there, {_short(wanted.get(k, 'absent'))} "
             "here" for k in keys[:limit]]
    more = f", and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(parts) + more if parts else "unreadable parameters"


def _short(value, width: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[:width - 3] + "..."


class ShardWriter:
    """Renders and writes one shard (a picklable callable, so it can run as a Ray task):
    keeps an intact existing shard, else render(task) -> tar bytes -> store. Returns the
    shard's manifest entry (name, num_samples, sha256, size)."""

    def __init__(self, store: Store, core: dict, render: Callable[[ShardTask], list[Sample]]):
        self.store, self.core, self.render = store, core, render

    def __call__(self, task: ShardTask) -> dict:
        stats = _existing_shard(self.store, task, self.core)
        if stats is not None:
            return stats
        samples = self.render(task)
        if [s.key for s in samples] != [item["key"] for item in task.items]:
            raise RuntimeError(f"render returned other keys than planned for {task.name}")
        data = shard_bytes(samples)
        self.store.write_bytes(task.name, data)
        return {"name": task.name, "num_samples": len(samples),
                "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def build_dataset(store: Store, *, name: str, tool: str, params: dict,
                  make_plan: Callable[[], dict], render: Callable[[ShardTask], list[Sample]],
                  samples_per_shard: int = 256, workers: int = 2, overwrite: bool = False,
                  progress: bool = True,
                  extra_versions: dict | None = None,
                  prepare_resume: Callable[[dict], None] | None = None,
                  executor: Executor | None = None) -> str:
    """Write shards and the manifest for `plan` into `store`; returns the manifest's location.

    make_plan() -> {"instruments": [...], "splits": {split: [item, ...]}, "report": {...}};
    render(task) -> the task's samples in item order. `params` identify the dataset: a manifest
    or state with other params is an error unless `overwrite`. `prepare_resume(plan)` runs when
    a stored plan is reused (e.g. to re-read source files). A killed run resumes from its
    stored plan: intact shards are kept, missing or damaged ones are written again. Shards are
    rendered and written on `executor` (data_prep.parallel: threads here, default `workers` of
    them, or Ray tasks over a cluster, each writing its shard straight to `store`); a shard's
    bytes do not depend on where it was made.
    """
    store.check(create=True)
    params = json.loads(json.dumps(params))           # normalise tuples etc. for comparison
    if store.exists(MANIFEST_NAME):
        existing = json.loads(store.read_bytes(MANIFEST_NAME))
        if existing.get("made_by", {}).get("params") == params:
            return store.url(MANIFEST_NAME)
        if not overwrite:
            raise ValueError(f"{store.uri} already holds a dataset made with other parameters "
                             f"({_param_diff(existing.get('made_by', {}).get('params'), params)}); "
                             "choose another output or pass --overwrite to make it again")
        _clear_outputs(store)

    plan = None
    if store.exists(STATE_NAME):
        state = json.loads(store.read_bytes(STATE_NAME))
        if state.get("params") == params:
            plan = state["plan"]
            if prepare_resume is not None:
                prepare_resume(plan)
        elif not overwrite:
            raise ValueError(f"{store.uri} holds an unfinished preparation with other parameters "
                             f"({_param_diff(state.get('params'), params)}); "
                             "choose another output or pass --overwrite")
        else:
            _clear_outputs(store)
    if plan is None:
        plan = make_plan()
        store.write_bytes(STATE_NAME, json.dumps({"params": params, "plan": plan},
                                                 sort_keys=True).encode())

    core = manifest_core(plan["instruments"])
    tasks = plan_tasks(plan, samples_per_shard)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(t.items) for t in tasks), desc=f"{name}: shards", unit="clip")
    executor = executor or Executor(workers)
    try:
        stats = executor.map(ShardWriter(store, core, render), tasks,
                             done=(lambda task: bar.update(len(task.items))) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    results = {s["name"]: s for s in stats}

    splits = {}
    for split in SPLITS:
        split_tasks = [t for t in tasks if t.split == split]
        if not split_tasks:
            continue
        counts: dict[str, int] = {}
        for task in split_tasks:
            for item in task.items:
                counts[item["instrument"]] = counts.get(item["instrument"], 0) + 1
        splits[split] = {"num_samples": sum(len(t.items) for t in split_tasks),
                         "counts": dict(sorted(counts.items())),
                         "shards": [results[t.name] for t in split_tasks]}
    totals: dict[str, int] = {}
    for info in splits.values():
        for label, n in info["counts"].items():
            totals[label] = totals.get(label, 0) + n
    manifest = {**core, "name": name, "num_samples": sum(s["num_samples"] for s in splits.values()),
                "counts": dict(sorted(totals.items())), "splits": splits,
                "made_by": {"tool": tool, "params": params, "seed": params.get("seed"),
                            "versions": {**versions(), **(extra_versions or {})}},
                "report": plan.get("report", {})}
    store.write_bytes(MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True).encode())
    store.delete(STATE_NAME)
    return store.url(MANIFEST_NAME)
