"""Any folder of labelled recordings (e.g. URMP solo stems) -> 4 s segments -> shards.

    python -m data_prep.folder /data/urmp data/urmp --instrument vn --instrument tpt
    python -m data_prep.folder recordings/ s3://bucket/rec --label-pattern '^(?P<label>[a-z]+)_'

Labels come from the parent folder (`violin/take1.wav` -> violin), from URMP stem names
(`AuSep_1_vn_01_Jupiter.wav` -> vn), or from a regex on the path relative to the input folder
(group `label`, else group 1). Each file is downmixed, resampled to 16 kHz and cut into 4 s
segments with a 1 s hop; optionally only segments whose mean CREPE confidence exceeds 0.85 are
kept (the paper's URMP filter). Note labels of real recordings are unknown: stored as [].

Bad input never stops the run: each file or segment is kept, fixed or skipped with a reason, and
the counts by reason are printed at the end and stored in the manifest's "report".
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from data_prep import audio as audio_mod
from data_prep.shards import (Sample, ShardTask, build_dataset, parse_fractions, sanitize_key,
                              stratified_split)
from tsdsae import features
from tsdsae.storage import open_store

URMP_RE = re.compile(r"^AuSep_\d+_(?P<label>[A-Za-z]+)_")
SEGMENT_HOP = features.SAMPLE_RATE          # 1 s
CREPE_THRESHOLD = 0.85


def file_label(rel: str, pattern: re.Pattern | None) -> str | None:
    """The label of a file at `rel` (posix path relative to the input folder), or None."""
    if pattern is not None:
        match = pattern.search(rel)
        if not match:
            return None
        return match.groupdict().get("label") or (match.group(1) if match.groups() else None)
    name = Path(rel).name
    urmp = URMP_RE.match(name)
    if urmp:
        return urmp.group("label")
    parent = Path(rel).parent.name
    return parent or None


def list_audio_files(input_dir: Path) -> list[Path]:
    return sorted(p for p in input_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in audio_mod.AUDIO_SUFFIXES)


def segment_starts(num_samples: int, short: str) -> list[tuple[int, int]]:
    """(start, valid_samples) of 4 s segments with a 1 s hop; a short file gives one padded
    segment (short="pad") or none (short="drop")."""
    clip = features.CLIP_SAMPLES
    if num_samples < clip:
        return [(0, num_samples)] if short == "pad" else []
    return [(s, clip) for s in range(0, num_samples - clip + 1, SEGMENT_HOP)]


def _cache_name(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()[:24] + ".npy"


def prepare_folder(input_dir: str, output_uri: str, *, label_pattern: str | None = None,
                   instruments: Sequence[str] | None = None, seed: int = 0,
                   fractions: Sequence[float] = (0.8, 0.1, 0.1), short: str = "pad",
                   crepe_model: str | None = "tiny", crepe_threshold: float = CREPE_THRESHOLD,
                   samples_per_shard: int = 256, workers: int = 2, work_dir: str | None = None,
                   endpoint_url: str | None = None, overwrite: bool = False,
                   stop_after_shards: int | None = None, progress: bool = True) -> str:
    """Segment, filter, featurise and shard a folder of labelled audio; returns the manifest URI.

    instruments: keep only these labels (default: every label found), in this order.
    short: "pad" (zero-pad files shorter than 4 s; the padding is masked) or "drop".
    crepe_model: "tiny", "full" or None (no confidence filter).
    """
    root = Path(input_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    if short not in ("pad", "drop"):
        raise ValueError(f"short={short!r} must be 'pad' or 'drop'")
    if crepe_model not in (None, "tiny", "full"):
        raise ValueError(f"crepe_model={crepe_model!r} must be 'tiny', 'full' or None")
    pattern = re.compile(label_pattern) if label_pattern else None
    instruments = [sanitize_key(name) for name in instruments] if instruments else None
    fracs = parse_fractions(fractions)
    files = list_audio_files(root)
    rels = [p.relative_to(root).as_posix() for p in files]
    listing = hashlib.sha256(json.dumps(
        [(rel, p.stat().st_size) for rel, p in zip(rels, files)]).encode()).hexdigest()
    params = {"input_dir": str(root), "input_listing_sha256": listing,
              "label_pattern": label_pattern, "instruments": list(instruments or []), "seed": seed,
              "fractions": fracs, "short": short, "crepe_model": crepe_model,
              "crepe_threshold": crepe_threshold, "samples_per_shard": samples_per_shard,
              "segment_seconds": features.CLIP_SECONDS, "hop_seconds": 1.0}
    tmp = tempfile.TemporaryDirectory(prefix="tsdsae-folder-", dir=work_dir)
    cache = Path(tmp.name)

    def load(rel: str) -> audio_mod.LoadedAudio:
        loaded = audio_mod.load_audio_file(root / rel)
        np.save(cache / _cache_name(rel), loaded.audio, allow_pickle=False)
        return loaded

    def make_plan() -> dict:
        files_report, reasons = [], Counter()
        items = []
        it = zip(rels, files)
        if progress:
            from tqdm import tqdm
            it = tqdm(list(it), desc="reading audio", unit="file")
        for rel, _ in it:
            label = file_label(rel, pattern)
            if label is None:
                reasons["skipped:no_label"] += 1
                files_report.append({"file": rel, "status": "skipped", "reason": "no_label"})
                continue
            label = sanitize_key(label)
            if instruments and label not in instruments:
                reasons["skipped:label_not_selected"] += 1
                continue
            try:
                loaded = load(rel)
            except audio_mod.BadAudio as bad:
                reasons[f"skipped:{bad.reason}"] += 1
                files_report.append({"file": rel, "status": "skipped", "reason": bad.reason,
                                     "detail": bad.detail[:200]})
                continue
            for fix in loaded.fixes:
                reasons[f"fixed:{fix}"] += 1
            a = loaded.audio
            segments = segment_starts(len(a), short)
            if not segments:
                reasons["skipped:too_short"] += 1
                files_report.append({"file": rel, "status": "skipped", "reason": "too_short"})
                continue
            if segments[0][1] < features.CLIP_SAMPLES:
                reasons["fixed:padded_short"] += 1
            confidence = audio_mod.crepe_confidence(a, crepe_model) if crepe_model else None
            kept = 0
            for n, (start, valid) in enumerate(segments):
                segment = a[start:start + valid]
                if float(np.abs(segment).max()) < audio_mod.SILENCE_PEAK:
                    reasons["segments_skipped:silent"] += 1
                    continue
                conf = None
                if confidence is not None:
                    lo = start // audio_mod.CREPE_HOP
                    hi = max(lo + 1, (start + valid) // audio_mod.CREPE_HOP)
                    conf = float(confidence[lo:hi].mean())
                    if not conf > crepe_threshold:
                        reasons["segments_skipped:low_crepe_confidence"] += 1
                        continue
                kept += 1
                stem = sanitize_key(Path(rel).stem, 60)
                items.append({"key": f"{len(items):06d}_{stem}_{n:04d}", "instrument": label,
                              "file": rel, "start": start, "valid_samples": valid,
                              "crepe_confidence": None if conf is None else round(conf, 4)})
            reasons["segments_kept"] += kept
            files_report.append({"file": rel, "status": "kept" if kept else "no_segments_kept",
                                 "fixes": loaded.fixes, "segments": kept,
                                 "source_rate": loaded.source_rate})
        found = sorted({it["instrument"] for it in items})
        names = [n for n in instruments if n in found] if instruments else found
        if not items:
            raise ValueError(f"no usable segments in {root}: {dict(reasons)}")
        split_idx = stratified_split([it["instrument"] for it in items], fracs, seed)
        report = {"files_found": len(rels), "reasons": dict(sorted(reasons.items())),
                  "files": files_report}
        return {"instruments": names,
                "splits": {split: [items[i] for i in idx] for split, idx in split_idx.items()},
                "report": report}

    def prepare_resume(plan: dict) -> None:
        # The stored plan already holds the CREPE decisions; only the cleaned audio is needed.
        needed = sorted({it["file"] for items in plan["splits"].values() for it in items})
        for rel in needed:
            load(rel)

    def render(task: ShardTask) -> list[Sample]:
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

    try:
        store = open_store(output_uri, endpoint_url)
        manifest = build_dataset(store, name=sanitize_key(root.name) or "folder",
                                 tool="data_prep.folder", params=params, make_plan=make_plan,
                                 render=render, samples_per_shard=samples_per_shard,
                                 workers=workers, overwrite=overwrite,
                                 stop_after_shards=stop_after_shards, progress=progress,
                                 prepare_resume=prepare_resume)
    finally:
        tmp.cleanup()
    return manifest


import sys  # noqa: E402  (the command line tool below)

from tsdsae.cli import cli_main, exit_status  # noqa: E402


@cli_main
def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m data_prep.folder",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input_dir", help="folder of .wav/.flac/.ogg files (searched recursively)")
    p.add_argument("output", help="output folder or s3://bucket/prefix")
    p.add_argument("--label-pattern", default=None,
                   help="regex on the relative path; group 'label' or group 1 is the label "
                        "(default: URMP stem names, else the parent folder)")
    p.add_argument("--instrument", action="append", dest="instruments",
                   help="keep only this label; repeat for several (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", default="0.8,0.1,0.1", help="train,val,test")
    p.add_argument("--short", choices=("pad", "drop"), default="pad",
                   help="files shorter than 4 s: zero-pad (masked) or drop")
    p.add_argument("--crepe-model", choices=("tiny", "full"), default="tiny")
    p.add_argument("--no-crepe", action="store_true", help="keep segments regardless of pitch")
    p.add_argument("--crepe-threshold", type=float, default=CREPE_THRESHOLD)
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work-dir", default=None, help="local scratch folder (default: system temp)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--stop-after-shards", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    manifest = prepare_folder(
        args.input_dir, args.output, label_pattern=args.label_pattern,
        instruments=args.instruments, seed=args.seed,
        fractions=[float(f) for f in args.fractions.split(",")], short=args.short,
        crepe_model=None if args.no_crepe else args.crepe_model,
        crepe_threshold=args.crepe_threshold, samples_per_shard=args.samples_per_shard,
        workers=args.workers, work_dir=args.work_dir, endpoint_url=args.endpoint_url,
        overwrite=args.overwrite, stop_after_shards=args.stop_after_shards,
        progress=args.progress)
    report = json.loads(open_store(args.output, args.endpoint_url).read_bytes("dataset.json"))
    print(json.dumps(report["report"]["reasons"], indent=1))
    print(manifest)
    return manifest


if __name__ == "__main__":
    sys.exit(exit_status(main()))
