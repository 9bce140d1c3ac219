"""Check a prepared dataset against its manifest.

    python -m data_prep.verify data/dmelodies
    python -m data_prep.verify s3://bucket/dmel --endpoint-url http://127.0.0.1:9000

For every shard: it exists, its size, sha256 and sample count match the manifest, member names are
sanitised, sample keys are unique across the whole dataset, and every sample decodes (features float32 (T, 80) and finite, labels with a known
instrument, FLAC mono 16 kHz of the clip length). Exits 1 naming each bad shard and sample key.
The checks are tsdsae.data's, the same ones the reader applies.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from tsdsae.cli import cli_main
from tsdsae.data import ShardError, check_unique_key, load_manifest, read_shard
from tsdsae.storage import StorageError, open_store


@dataclasses.dataclass
class VerifyReport:
    """What verify_dataset found: counts checked and one entry per bad shard."""

    uri: str
    shards_checked: int = 0
    samples_checked: int = 0
    failures: list[dict] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        if self.ok:
            return (f"OK {self.uri}: {self.shards_checked} shards, {self.samples_checked} "
                    "samples match the manifest")
        lines = [f"BAD {self.uri}: {len(self.failures)} of {self.shards_checked} shards failed"]
        lines += [f"  {f['shard']}" + (f" key {f['key']}" if f.get("key") else "")
                  + f": {f['problem']}" for f in self.failures]
        return "\n".join(lines)


def verify_dataset(uri: str, endpoint_url: str | None = None, decode_audio: bool = True,
                   progress: bool = False, raise_on_failure: bool = False) -> VerifyReport:
    """Check every shard of the dataset at `uri`; returns a VerifyReport (or raises ShardError
    for the first bad shard with raise_on_failure)."""
    manifest = load_manifest(uri, endpoint_url)
    store = open_store(uri, endpoint_url)
    report = VerifyReport(store.uri)
    entries = [(split, entry) for split, info in manifest["splits"].items()
               for entry in info["shards"]]
    it = entries
    if progress:
        from tqdm import tqdm
        it = tqdm(entries, desc="verifying", unit="shard")
    seen: dict[str, str] = {}                 # sample key -> shard: unique across the dataset
    for split, entry in it:
        url = store.url(entry["name"])
        report.shards_checked += 1
        try:
            samples = read_shard(url, entry, manifest, endpoint_url, decode_audio=decode_audio)
            report.samples_checked += len(samples)
            for sample in samples:
                check_unique_key(sample["key"], url, seen)
        except ShardError as exc:
            if raise_on_failure:
                raise
            report.failures.append({"shard": url, "key": exc.key, "problem": exc.problem})
        except StorageError as exc:
            if raise_on_failure:
                raise
            report.failures.append({"shard": url, "key": None, "problem": str(exc)})
    for split, info in manifest["splits"].items():
        listed = sum(e["num_samples"] for e in info["shards"])
        if listed != info["num_samples"]:
            report.failures.append({"shard": f"{store.uri} split {split}", "key": None,
                                    "problem": f"shards hold {listed} samples, split says "
                                               f"{info['num_samples']}"})
    return report


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.verify",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("uri", help="dataset folder or s3://bucket/prefix")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--skip-audio", action="store_true", help="do not decode the FLAC members")
    args = p.parse_args(argv)
    report = verify_dataset(args.uri, args.endpoint_url, decode_audio=not args.skip_audio,
                            progress=sys.stderr.isatty())
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
