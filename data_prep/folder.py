"""Any folder of labelled recordings (e.g. URMP solo stems) -> 4 s segments -> shards.

    python -m data_prep.folder /data/urmp data/urmp --instrument vn --instrument tpt
    python -m data_prep.folder recordings/ s3://bucket/rec --label-pattern '^(?P<label>[a-z]+)_'

Labels come from the parent folder (`violin/take1.wav` -> violin), from URMP stem names
(`AuSep_1_vn_01_Jupiter.wav` -> vn), or from a regex on the path relative to the input folder
(group `label`, else group 1). Labels keep their spelling (Unicode, NFC-normalised); only tar
member names are sanitised. Symbolic links to folders and files are followed (each real folder
is read once, so link cycles end). Every file libsndfile decodes is used, whatever its extension.

Each file is cleaned by tsdsae.audio.condition (DC removal, downmix that detects cancelling
channels, bounded resampling to 16 kHz) and cut into 4 s segments with a 1 s hop. Segments
below the project's quiet level (tsdsae.audio.QUIET_DBFS) are dropped; by default only segments
whose mean CREPE 'full' confidence exceeds 0.85 are kept (the paper's URMP filter).

Splits are made by source recording by default (all segments of a file in one split, stratified
by label), so no audio is shared between splits; `--split-by segment` is the paper's URMP recipe,
whose overlapping segments of one recording then land in different splits (the manifest says so).
Note labels of real recordings are unknown: stored as [].

Bad input never stops the run: each file or segment is kept, fixed or skipped with a reason;
every file not used is listed with its reason, counts by reason are printed at the end, and all
of it is stored in the manifest's "report". Input that cannot make a dataset at all (no usable
segments, an empty split, two folders that give one label) is refused with one message, exit 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import tempfile
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from data_prep import audio as audio_mod
from data_prep.parallel import Executor, add_ray_options, executor_from_args
from data_prep.shards import (SPLITS, Sample, ShardTask, build_dataset, grouped_split,
                              parse_fractions, sanitize_key, stratified_split)
from tsdsae import features
from tsdsae.storage import StorageError, open_store, redact_text

URMP_RE = re.compile(r"^AuSep_\d+_(?P<label>[A-Za-z]+)_")
SEGMENT_HOP = features.SAMPLE_RATE          # 1 s
CREPE_THRESHOLD = 0.85
CREPE_FILES_PER_BATCH = 16                  # files whose CREPE frames share network batches
SPLIT_BY = ("recording", "segment")
MAX_LISTED = 100                            # files not used printed one per line


class FolderError(ValueError):
    """A folder that cannot make a dataset; the message names the files or labels and the fix."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What decides the plan (every field is part of the dataset's identity)."""

    label_pattern: str | None = None
    instruments: tuple[str, ...] = ()
    seed: int = 0
    fractions: tuple[tuple[str, float], ...] = ()
    short: str = "pad"
    crepe_model: str | None = "full"
    crepe_threshold: float = CREPE_THRESHOLD
    split_by: str = "recording"

    @property
    def pattern(self) -> re.Pattern | None:
        return re.compile(self.label_pattern) if self.label_pattern else None


# --- finding files ------------------------------------------------------------------------------


def _skip(rel: str, reason: str, detail: str = "") -> dict:
    entry = {"file": rel, "status": "skipped", "reason": reason}
    if detail:
        entry["detail"] = detail[:300]
    return entry


def scan_folder(root: Path) -> tuple[list[str], list[dict]]:
    """Files under `root` (posix paths relative to it, sorted) and the entries not used, with
    reasons. Symbolic links are followed; each real folder is read once, under its own path when
    it lies inside `root` (a link to it, or a link cycle, is reported instead); dangling links
    are reported."""
    files, unused = [], []
    seen: dict[tuple[int, int], str] = {}
    st = root.stat()
    seen[(st.st_dev, st.st_ino)] = "."
    for dirpath, dirnames, _ in os.walk(root):          # the real folders, links not followed
        for name in dirnames:
            full = Path(dirpath) / name
            if not full.is_symlink():
                st = full.stat()
                seen.setdefault((st.st_dev, st.st_ino), full.relative_to(root).as_posix())

    def on_error(exc: OSError) -> None:
        rel = Path(exc.filename).relative_to(root).as_posix() if exc.filename else "?"
        unused.append(_skip(rel + "/", "unreadable_folder", exc.strerror or str(exc)))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=on_error):
        here = Path(dirpath)
        kept_dirs = []
        for name in sorted(dirnames):
            full = here / name
            rel = full.relative_to(root).as_posix()
            try:
                st = full.stat()
            except OSError as exc:
                unused.append(_skip(rel + "/", "unreadable_folder", str(exc)))
                continue
            first = seen.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                cycle = full.resolve() in (here.resolve(), *here.resolve().parents)
                unused.append(_skip(rel + "/", "link_cycle" if cycle else "folder_seen_twice",
                                    f"the same folder as {first}/; read once"))
                continue
            kept_dirs.append(name)
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            full = here / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink() and not full.exists():
                unused.append(_skip(rel, "dangling_link", f"points to {os.readlink(full)}, "
                                    "which does not exist"))
            elif not full.is_file():
                unused.append(_skip(rel, "not_a_file"))
            else:
                files.append(rel)
    return sorted(files), unused


# --- labels ---------------------------------------------------------------------------------------


def file_label(rel: str, pattern: re.Pattern | None) -> str | None:
    """The label of a file at `rel` (posix path relative to the input folder), or None.

    Unicode is kept (NFC-normalised, surrounding whitespace removed): `Flûte/a.wav` -> "Flûte".
    """
    if pattern is not None:
        match = pattern.search(rel)
        if not match:
            return None
        raw = match.groupdict().get("label") or (match.group(1) if match.groups() else None)
    else:
        urmp = URMP_RE.match(Path(rel).name)
        raw = urmp.group("label") if urmp else Path(rel).parent.name
    label = unicodedata.normalize("NFC", raw or "").strip()
    return label or None


def check_label_collisions(sources: dict[str, str]) -> None:
    """Refuse when two different spellings (raw label text) would give one label.

    sources: raw label text -> an example file. Labels are compared after NFC normalisation and
    case folding, so "Flûte" (composed) / "Flûte" (decomposed) or "Violin" / "violin" collide.
    """
    by_key: dict[str, list[str]] = defaultdict(list)
    for raw in sorted(sources):
        by_key[file_label_key(raw)].append(raw)
    for raws in by_key.values():
        if len(raws) > 1:
            a, b = raws[:2]
            raise FolderError(
                f"the folders of {sources[a]!r} and {sources[b]!r} give the labels {a!r} and "
                f"{b!r}, which are one label once normalised ({ascii(a)} vs {ascii(b)}); rename "
                "one folder (or merge them), or pass --label-pattern")


def file_label_key(label: str) -> str:
    return unicodedata.normalize("NFC", label).strip().casefold()


def _raw_label(rel: str, pattern: re.Pattern | None) -> str | None:
    """The label text before normalisation (for naming colliding folders)."""
    if pattern is not None or URMP_RE.match(Path(rel).name):
        return file_label(rel, pattern)
    raw = Path(rel).parent.name.strip()
    return raw or None


# --- one file -> segments -------------------------------------------------------------------------


def segment_starts(num_samples: int, short: str) -> list[tuple[int, int]]:
    """(start, valid_samples) of 4 s segments with a 1 s hop; a short file gives one padded
    segment (short="pad") or none (short="drop")."""
    clip = features.CLIP_SAMPLES
    if num_samples < clip:
        return [(0, num_samples)] if short == "pad" else []
    return [(s, clip) for s in range(0, num_samples - clip + 1, SEGMENT_HOP)]


def _cache_name(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()[:24] + ".npy"


def read_into_cache(root: Path, rel: str, cache: Path) -> audio_mod.LoadedAudio:
    """Load and clean one file and keep its 16 kHz audio in `cache`. Any failure (a decoder
    error, memory) becomes BadAudio, so one file never stops the run."""
    try:
        loaded = audio_mod.load_audio_file(root / rel)
    except audio_mod.BadAudio as bad:
        if bad.reason == "unreadable" and Path(rel).suffix.lower() not in \
                audio_mod.soundfile_extensions():
            raise audio_mod.BadAudio(
                "not_audio", f"extension {Path(rel).suffix or '(none)'!s} is not a format "
                "soundfile names and libsndfile cannot decode the file") from None
        raise
    except Exception as exc:                               # noqa: BLE001 - one file, any failure
        raise audio_mod.BadAudio("failed", f"{type(exc).__name__}: {exc}") from None
    np.save(cache / _cache_name(rel), loaded.audio, allow_pickle=False)
    return loaded


def file_segments(rel: str, label: str, audio: np.ndarray, short: str,
                  reasons: Counter) -> list[dict]:
    """Plan items of the segments of one cleaned file that are loud enough to use."""
    items = []
    segments = segment_starts(len(audio), short)
    if segments and segments[0][1] < features.CLIP_SAMPLES:
        reasons["fixed:padded_short"] += 1
    for n, (start, valid) in enumerate(segments):
        if audio_mod.shared_audio.too_quiet(audio[start:start + valid]):
            reasons["segments_skipped:too_quiet"] += 1
            continue
        items.append({"file": rel, "instrument": label, "start": start, "valid_samples": valid,
                      "n": n, "crepe_confidence": None})
    return items


def read_one(root: Path, rel: str, opts: Options, cache: Path,
             reasons: Counter) -> tuple[list[dict], dict]:
    """Label, read and segment one file -> (its segment items, its report entry)."""
    label = file_label(rel, opts.pattern)
    if label is None:
        return [], _skip(rel, "no_label")
    if opts.instruments and label not in opts.instruments:
        return [], _skip(rel, "label_not_selected", f"label {label!r}")
    try:
        loaded = read_into_cache(root, rel, cache)
    except audio_mod.BadAudio as bad:
        return [], _skip(rel, bad.reason, bad.detail)
    if not segment_starts(len(loaded.audio), opts.short):
        return [], _skip(rel, "too_short", f"{len(loaded.audio) / features.SAMPLE_RATE:.2f} s")
    reasons.update(f"fixed:{fix}" for fix in loaded.fixes)
    items = file_segments(rel, label, loaded.audio, opts.short, reasons)
    return items, {"file": rel, "status": "read", "label": label, "fixes": loaded.fixes,
                   "segments": len(items), "source_rate": loaded.source_rate}


def _read_counted(root: Path, opts: Options, cache: Path, rel: str
                  ) -> tuple[list[dict], dict, Counter]:
    """read_one with its own reason counts (a task of data_prep.parallel.Executor)."""
    reasons: Counter = Counter()
    items, entry = read_one(root, rel, opts, cache, reasons)
    return items, entry, reasons


def read_files(root: Path, rels: Sequence[str], opts: Options, cache: Path,
               progress: bool, executor: Executor | None = None
               ) -> tuple[list[dict], list[dict], Counter]:
    """Label, read and segment every file -> (segment items, per-file report, reasons); the
    files are read on `executor` (threads here, or Ray tasks), the results kept in file order."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(rels), desc="reading audio", unit="file")
    executor = executor or Executor(1)
    try:
        results = executor.map(functools.partial(_read_counted, root, opts, cache), rels,
                               done=(lambda rel: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    items, files_report, reasons = [], [], Counter()
    for found, entry, counted in results:
        items += found
        files_report.append(entry)
        reasons.update(counted)
    reasons.update(f"skipped:{f['reason']}" for f in files_report if f["status"] == "skipped")
    return items, files_report, reasons


# --- CREPE ----------------------------------------------------------------------------------------


def _chunk_confidences(cache: Path, model: str, chunk: Sequence[str]) -> list[np.ndarray]:
    """CREPE's per-frame confidences of each cached file of `chunk` (one network batch run)."""
    clips = [np.load(cache / _cache_name(rel), allow_pickle=False) for rel in chunk]
    return audio_mod.crepe_confidences(clips, model)


def _audio_seconds(cache: Path, chunk: Sequence[str]) -> float:
    """The seconds of audio CREPE's frames cover in `chunk` (1 + S // hop frames a file)."""
    return sum(1 + np.load(cache / _cache_name(rel), mmap_mode="r").shape[0]
               // audio_mod.CREPE_HOP for rel in chunk) * audio_mod.CREPE_HOP \
        / features.SAMPLE_RATE


def crepe_filter(items: list[dict], cache: Path, model: str, threshold: float,
                 reasons: Counter, progress: bool, executor: Executor | None = None
                 ) -> tuple[list[dict], dict]:
    """Keep segments whose mean CREPE confidence exceeds `threshold` -> (kept, per-label stats).

    CREPE runs once per file (segments overlap), batched across CREPE_FILES_PER_BATCH files;
    the batches run on `executor` (threads here, or Ray tasks with a GPU share where the
    cluster has GPUs). Each batch's result does not depend on where it ran.
    """
    by_file: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        by_file[item["file"]].append(item)
    names = sorted(by_file)
    chunks = [tuple(names[i:i + CREPE_FILES_PER_BATCH])
              for i in range(0, len(names), CREPE_FILES_PER_BATCH)]
    executor = executor or Executor(1)
    bar = None
    if progress:
        import torch
        from tqdm import tqdm

        seconds = _audio_seconds(cache, names)
        device = ("the Ray cluster" if executor.on_ray else
                  "the GPU" if torch.cuda.is_available() else "this CPU")
        print(f"CREPE {model} confidence filter over {seconds:.0f} s of audio in {len(names)} "
              f"files on {device}; the time left shows after its first batch. Faster: "
              + ("--crepe-model tiny (about 10x), " if model == "full" else "")
              + "a GPU, --ray / --address (a cluster), or --no-crepe (keeps every segment)",
              file=sys.stderr, flush=True)
        bar = tqdm(total=seconds, desc=f"CREPE {model}", unit="s audio",
                   dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                   "{n:.0f}/{total:.0f} s of audio [{elapsed}<{remaining}]")
    try:
        confidences = executor.map(
            functools.partial(_chunk_confidences, cache, model), chunks, gpu=True,
            done=(lambda chunk: bar.update(_audio_seconds(cache, chunk))) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    for chunk, confs in zip(chunks, confidences):
        for rel, conf in zip(chunk, confs):
            for item in by_file[rel]:
                lo = item["start"] // audio_mod.CREPE_HOP
                hi = max(lo + 1, (item["start"] + item["valid_samples"]) // audio_mod.CREPE_HOP)
                item["crepe_confidence"] = round(float(conf[lo:hi].mean()), 4)
    kept = [it for it in items if it["crepe_confidence"] > threshold]
    reasons["segments_skipped:low_crepe_confidence"] += len(items) - len(kept)
    stats = {}
    for label in sorted({it["instrument"] for it in items}):
        total = sum(it["instrument"] == label for it in items)
        n = sum(it["instrument"] == label for it in kept)
        stats[label] = {"segments": total, "kept": n, "kept_fraction": round(n / total, 4)}
    return kept, stats


def crepe_warnings(stats: dict, model: str, threshold: float) -> list[str]:
    return [f"CREPE {model} kept only {s['kept']} of {s['segments']} segments of label "
            f"{label!r} ({100 * s['kept_fraction']:.0f}%, confidence > {threshold}); check the "
            "recordings, lower --crepe-threshold or pass --no-crepe"
            for label, s in stats.items() if s["kept_fraction"] < 0.5]


# --- splits ---------------------------------------------------------------------------------------


def split_items(items: list[dict], fracs: dict[str, float], seed: int,
                split_by: str) -> dict[str, list[dict]]:
    """Items per split: whole recordings (split_by="recording") or single segments."""
    labels = [it["instrument"] for it in items]
    if split_by == "segment":
        idx = stratified_split(labels, fracs, seed)
    else:
        idx = grouped_split(labels, [it["file"] for it in items], fracs, seed)
    return {split: [items[i] for i in ix] for split, ix in idx.items()}


def split_warnings(items: list[dict], splits: dict[str, list[dict]], fracs: dict[str, float],
                   names: Sequence[str], split_by: str) -> list[str]:
    """Warnings for labels missing from a split; FolderError when a split is empty."""
    wanted = [s for s in SPLITS if fracs.get(s, 0) > 0]
    counts = {s: Counter(it["instrument"] for it in splits.get(s, [])) for s in wanted}
    table = "; ".join(f"{label}: " + ", ".join(f"{s} {counts[s][label]}" for s in wanted)
                      for label in names)
    unit = "recordings" if split_by == "recording" else "segments"
    recordings = {label: len({it["file"] for it in items if it["instrument"] == label})
                  for label in names}
    per_label = ", ".join(f"{label} {n}" for label, n in recordings.items())
    for split in wanted:
        if not counts[split]:
            raise FolderError(
                f"split {split!r} (fraction {fracs[split]}) would be empty; segments per split "
                f"by label: {table} (recordings per label: {per_label}). Add {unit}, change "
                "--fractions (e.g. 0.8,0.2,0 for no test split)"
                + (", or pass --split-by segment (splits then share audio)"
                   if split_by == "recording" else ""))
    warnings = []
    for label in names:
        missing = [s for s in wanted if counts[s][label] == 0]
        if missing:
            warnings.append(
                f"label {label!r} has no segments in split(s) {', '.join(missing)} (it has "
                f"{recordings[label]} recording(s); {table}); add {unit} of {label!r} for "
                f"{len(wanted)} splits")
    return warnings


# --- the plan and the shards --------------------------------------------------------------------


def _mark_files(files_report: list[dict], items: list[dict]) -> None:
    """Set each read file's final status from the segments it kept."""
    per_file = Counter(it["file"] for it in items)
    for entry in files_report:
        if entry["status"] == "read":
            entry["status"] = "kept" if per_file[entry["file"]] else "no_segments_kept"
            entry["segments"] = per_file[entry["file"]]


def _assign_keys(items: list[dict]) -> None:
    """Unique, sanitised sample keys: running index, file stem, segment number."""
    for n, item in enumerate(items):
        item["key"] = f"{n:06d}_{sanitize_key(Path(item['file']).stem, 60)}_{item.pop('n'):04d}"


def _report(files: list[dict], reasons: Counter, opts: Options, crepe: dict | None,
            warnings: list[str]) -> dict:
    report = {"files_found": sum(not f["file"].endswith("/") for f in files),
              "reasons": dict(sorted((k, v) for k, v in reasons.items() if v)),
              "files": files, "not_used": [f for f in files if f["status"] != "kept"],
              "split_by": opts.split_by, "splits_share_audio": opts.split_by == "segment",
              "crepe": crepe, "warnings": warnings}
    if opts.split_by == "segment":
        report["split_note"] = ("split by segment: overlapping 4 s segments (1 s hop) of one "
                                "recording can be in different splits, so splits share audio")
    return report


def plan_folder(root: Path, rels: Sequence[str], unused: list[dict], opts: Options, cache: Path,
                progress: bool, executor: Executor | None = None) -> dict:
    """Read, segment, filter and split -> the plan build_dataset stores and shards (reading and
    CREPE on `executor`)."""
    check_label_collisions({raw: rel for rel in reversed(rels)
                            if (raw := _raw_label(rel, opts.pattern)) is not None})
    items, files_report, reasons = read_files(root, rels, opts, cache, progress, executor)
    reasons.update(f"skipped:{f['reason']}" for f in unused)
    warnings, crepe = [], None
    if opts.crepe_model and items:
        items, stats = crepe_filter(items, cache, opts.crepe_model, opts.crepe_threshold,
                                    reasons, progress, executor)
        crepe = {"model": opts.crepe_model, "threshold": opts.crepe_threshold, "labels": stats}
        warnings += crepe_warnings(stats, opts.crepe_model, opts.crepe_threshold)
    reasons["segments_kept"] = len(items)
    _mark_files(files_report, items)
    if not items:
        why = "".join(f", {k} {v}" for k, v in sorted(reasons.items()) if v)
        raise FolderError(f"no usable segments in {root} ({len(rels)} files{why}); add audio "
                          "files in label folders (e.g. violin/take1.wav)")
    _assign_keys(items)
    found = sorted({it["instrument"] for it in items})
    names = [n for n in opts.instruments if n in found] if opts.instruments else found
    fracs = dict(opts.fractions)
    splits = split_items(items, fracs, opts.seed, opts.split_by)
    warnings += split_warnings(items, splits, fracs, names, opts.split_by)
    for line in warnings:
        print(f"WARNING: {line}", file=sys.stderr)
    files = sorted(files_report + unused, key=lambda f: f["file"])
    return {"instruments": names, "splits": splits,
            "report": _report(files, reasons, opts, crepe, warnings)}


def render_task(task: ShardTask, cache: Path) -> list[Sample]:
    """The samples of one shard from the cached 16 kHz audio (peak-normalised, featurised)."""
    batch = np.zeros((len(task.items), features.CLIP_SAMPLES), dtype=np.float32)
    for i, item in enumerate(task.items):
        a = np.load(cache / _cache_name(item["file"]), mmap_mode="r", allow_pickle=False)
        batch[i, :item["valid_samples"]] = a[item["start"]:item["start"] + item["valid_samples"]]
    pcm, feats = audio_mod.featurise(batch)
    samples = []
    for item, a, f in zip(task.items, pcm, feats):
        valid_frames = min(f.shape[0], features.num_frames(item["valid_samples"]))
        labels = {"key": item["key"], "source": "folder", "instrument": item["instrument"],
                  "source_file": item["file"], "start_s": item["start"] / features.SAMPLE_RATE,
                  "valid_samples": item["valid_samples"], "valid_frames": valid_frames,
                  "crepe_confidence": item["crepe_confidence"], "notes": []}
        samples.append(Sample(item["key"], f, labels, a))
    return samples


def _options(label_pattern, instruments, seed, fractions, short, crepe_model, crepe_threshold,
             split_by) -> Options:
    if short not in ("pad", "drop"):
        raise FolderError(f"short={short!r} must be 'pad' or 'drop'")
    if crepe_model not in (None, "tiny", "full"):
        raise FolderError(f"crepe_model={crepe_model!r} must be 'tiny', 'full' or None")
    if split_by not in SPLIT_BY:
        raise FolderError(f"split_by={split_by!r} must be one of {SPLIT_BY}")
    if label_pattern:
        try:
            re.compile(label_pattern)
        except re.error as exc:
            raise FolderError(f"--label-pattern {label_pattern!r} is not a regex: {exc}") from None
    chosen = tuple(unicodedata.normalize("NFC", n).strip() for n in instruments or ())
    return Options(label_pattern, chosen, int(seed), tuple(parse_fractions(fractions).items()),
                   short, crepe_model, float(crepe_threshold), split_by)


def _params(root: Path, rels: Sequence[str], opts: Options) -> dict:
    listing = hashlib.sha256(json.dumps(
        [(rel, (root / rel).stat().st_size) for rel in rels]).encode()).hexdigest()
    return {"input_dir": str(root), "input_listing_sha256": listing,
            "label_pattern": opts.label_pattern, "instruments": list(opts.instruments),
            "seed": opts.seed, "fractions": dict(opts.fractions), "short": opts.short,
            "crepe_model": opts.crepe_model, "crepe_threshold": opts.crepe_threshold,
            "split_by": opts.split_by, "segment_seconds": features.CLIP_SECONDS,
            "hop_seconds": SEGMENT_HOP / features.SAMPLE_RATE}


def prepare_folder(input_dir: str, output_uri: str, *, label_pattern: str | None = None,
                   instruments: Sequence[str] | None = None, seed: int = 0,
                   fractions: Sequence[float] = (0.8, 0.1, 0.1), short: str = "pad",
                   crepe_model: str | None = "full", crepe_threshold: float = CREPE_THRESHOLD,
                   split_by: str = "recording", samples_per_shard: int = 256, workers: int = 2,
                   work_dir: str | None = None, endpoint_url: str | None = None,
                   overwrite: bool = False, progress: bool = True,
                   executor: Executor | None = None) -> str:
    """Segment, filter, featurise and shard a folder of labelled audio; returns the manifest URI.

    instruments: keep only these labels (default: every label found), in this order.
    short: "pad" (zero-pad files shorter than 4 s; the padding is masked) or "drop".
    crepe_model: "full" (the recipe's), "tiny" (faster) or None (no confidence filter).
    split_by: "recording" (no audio shared between splits) or "segment" (the paper's recipe).
    executor: where reading, CREPE and shards run (data_prep.parallel; default `workers` threads
    for the shards). On a Ray cluster of several nodes, `input_dir` and `work_dir` (the cache of
    cleaned audio) must be folders every node sees.
    Raises FileNotFoundError (no such folder) and FolderError (input that cannot make a dataset).
    """
    root = Path(input_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist; give a folder of label "
                                "folders (e.g. violin/take1.wav)")
    opts = _options(label_pattern, instruments, seed, fractions, short, crepe_model,
                    crepe_threshold, split_by)
    rels, unused = scan_folder(root)
    with tempfile.TemporaryDirectory(prefix="tsdsae-folder-", dir=work_dir) as tmp:
        cache = Path(tmp)

        def prepare_resume(plan: dict) -> None:
            # The stored plan already holds the CREPE decisions; only the cleaned audio is needed.
            for rel in sorted({it["file"] for items in plan["splits"].values() for it in items}):
                read_into_cache(root, rel, cache)

        store = open_store(output_uri, endpoint_url)
        return build_dataset(
            store, name=sanitize_key(root.name) or "folder", tool="data_prep.folder",
            params=_params(root, rels, opts),
            make_plan=lambda: plan_folder(root, rels, unused, opts, cache, progress, executor),
            render=functools.partial(render_task, cache=cache),
            samples_per_shard=samples_per_shard, workers=workers, overwrite=overwrite,
            progress=progress, prepare_resume=prepare_resume, executor=executor)


# --- the command line -----------------------------------------------------------------------------


def format_report(manifest: dict) -> str:
    """The human summary of a folder preparation (from its manifest)."""
    report = manifest.get("report", {})
    lines = [f"{manifest['num_samples']} segments of {len(manifest['instruments'])} labels "
             f"from {report.get('files_found', '?')} files"]
    for split, info in manifest["splits"].items():
        counts = ", ".join(f"{k} {v}" for k, v in info["counts"].items())
        lines.append(f"  {split}: {info['num_samples']} ({counts})")
    lines.append("counts by reason: " + json.dumps(report.get("reasons", {}), ensure_ascii=False))
    not_used = report.get("not_used", [])
    if not_used:
        lines.append(f"files not used ({len(not_used)}):")
        for f in not_used[:MAX_LISTED]:
            why = f.get("reason", f["status"])
            detail = f" ({f['detail']})" if f.get("detail") else ""
            lines.append(f"  {f['file']}: {why}{detail}")
        if len(not_used) > MAX_LISTED:
            lines.append(f"  ... and {len(not_used) - MAX_LISTED} more (all of them are in the "
                         "manifest's report.not_used)")
    for f in report.get("files", []):
        if "channels_cancel_used_louder" in f.get("fixes", []):
            lines.append(f"  {f['file']}: its channels cancel when averaged; used the louder "
                         "channel")
    crepe = report.get("crepe")
    if crepe:
        kept = ", ".join(f"{label} {s['kept']}/{s['segments']} ({100 * s['kept_fraction']:.0f}%)"
                         for label, s in crepe["labels"].items())
        lines.append(f"CREPE {crepe['model']} (confidence > {crepe['threshold']}) kept: {kept}")
    lines.append(f"split by {report.get('split_by', 'segment')}"
                 + (": SPLITS SHARE AUDIO (overlapping segments of one recording)"
                    if report.get("splits_share_audio") else ": no recording in two splits"))
    lines += [f"WARNING: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


from tsdsae.cli import cli_main, exit_status  # noqa: E402


@cli_main
def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m data_prep.folder",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input_dir", help="folder of audio files in label folders (searched "
                                     "recursively, links followed); any format libsndfile reads")
    p.add_argument("output", help="output folder or s3://bucket/prefix")
    p.add_argument("--label-pattern", default=None,
                   help="regex on the relative path; group 'label' or group 1 is the label "
                        "(default: URMP stem names, else the parent folder)")
    p.add_argument("--instrument", action="append", dest="instruments",
                   help="keep only this label; repeat for several (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", default="0.8,0.1,0.1", help="train,val,test")
    p.add_argument("--split-by", choices=SPLIT_BY, default="recording",
                   help="recording: every segment of a file in one split (no shared audio); "
                        "segment: the paper's URMP recipe (splits share overlapping audio)")
    p.add_argument("--short", choices=("pad", "drop"), default="pad",
                   help="files shorter than 4 s: zero-pad (masked) or drop")
    p.add_argument("--crepe-model", choices=("tiny", "full"), default="full",
                   help="CREPE model of the confidence filter (full: the recipe's; tiny: faster)")
    p.add_argument("--no-crepe", action="store_true", help="keep segments regardless of pitch")
    p.add_argument("--crepe-threshold", type=float, default=CREPE_THRESHOLD)
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work-dir", default=None, help="local scratch folder (default: system temp)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_ray_options(p)
    args = p.parse_args(argv)
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
        with executor_from_args(args) as executor:
            manifest = prepare_folder(
                args.input_dir, args.output, label_pattern=args.label_pattern,
                instruments=args.instruments, seed=args.seed, fractions=fractions,
                short=args.short, crepe_model=None if args.no_crepe else args.crepe_model,
                crepe_threshold=args.crepe_threshold, split_by=args.split_by,
                samples_per_shard=args.samples_per_shard, workers=args.workers,
                work_dir=args.work_dir, endpoint_url=args.endpoint_url,
                overwrite=args.overwrite, progress=args.progress, executor=executor)
        stored = json.loads(open_store(args.output, args.endpoint_url).read_bytes("dataset.json"))
    except (FileNotFoundError, ValueError, StorageError) as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_report(stored))
    print(manifest)
    return manifest


if __name__ == "__main__":
    sys.exit(exit_status(main()))
