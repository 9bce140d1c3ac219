"""Streaming the train split (tsdsae.data.stream) against holding it in memory: peak memory of
one training process as the dataset grows, and the reader's throughput next to a step's need.

    python benchmarks/stream_rate.py --out /tmp/streambench [--base 256] [--scales 1 4 16]
                                     [--threads 2] [--s3]

Synthetic datasets of base x scale training clips and base / 8 clips each in val and test
(random log-mel-like features, silent audio: the shards have the real format) are written once
under --out. Then, one JSON line each:
  - {"kind": "memory", "scale", "clips", "mode": "stream"|"memory", "peak_rss_mb", "seconds"}:
    a fresh process trains one epoch of the debug model on the dataset (mode "memory": every
    split held as tensors; "stream": data.stream=on) and reports its peak resident memory;
  - {"kind": "reader", "where": "folder"|"s3", "samples_per_s"}: the stream's samples/s, one
    rank, no training;
  - {"kind": "step_need", "model", "stage", "samples_per_s"}: clips one training step of the
    paper's model consumes per second on this CPU (batch 128 / seconds per step).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def make_dataset(out: Path, clips: int, held_out: int, per_shard: int = 64) -> str:
    """A synthetic dataset at `out`: `clips` training clips of 2 instruments, and `held_out`
    clips each in val and test (the same at every scale: what grows is the train split)."""
    from data_prep.shards import Sample, build_dataset
    from tsdsae import features
    from tsdsae.storage import open_store

    frames = features.num_frames(features.CLIP_SAMPLES)

    def plan():
        total = clips + 2 * held_out
        items = [{"key": f"syn_{i:07d}", "instrument": ("a", "b")[i % 2]} for i in range(total)]
        return {"instruments": ["a", "b"], "report": {},
                "splits": {"train": items[:clips], "val": items[clips:clips + held_out],
                           "test": items[clips + held_out:]}}

    def render(task):
        out = []
        for item in task.items:
            g = np.random.default_rng(int(item["key"][4:]))
            f = (g.standard_normal((frames, 80)) * 3 - 5).astype(np.float32)
            labels = {"key": item["key"], "instrument": item["instrument"], "notes": [],
                      "valid_frames": frames}
            out.append(Sample(item["key"], f, labels, np.zeros(features.CLIP_SAMPLES, np.int16)))
        return out

    return build_dataset(open_store(str(out)), name="synthetic", tool="benchmarks.stream_rate",
                         params={"clips": clips}, make_plan=plan, render=render,
                         samples_per_shard=per_shard, workers=2, progress=False)


def train_one_epoch(uri: str, mode: str, threads: int) -> dict:
    """Child process: one epoch of the debug model on `uri`; its peak RSS."""
    import torch

    from tsdsae.config import apply_overrides, debug
    from tsdsae.trainer import Trainer

    torch.set_num_threads(threads)
    stream = {"stream": "on", "memory": "off", "auto": "auto"}[mode]
    cfg = apply_overrides(debug(), [f"data.uri={uri}", f"data.stream={stream}",
                                    "schedule.variant=dsae", "schedule.max_epochs=1",
                                    "checkpoint.root=/tmp/stream-bench-runs",
                                    f"name=bench-{mode}", "checkpoint.every=1000"])
    t0 = time.perf_counter()
    trainer = Trainer(cfg, progress=False, save=False)
    trainer.fit(resume=False)
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "seconds": round(time.perf_counter() - t0, 1),
            "streamed": not trainer.data["train"].in_memory}


def reader_rate(uri: str, endpoint: str | None, seconds: float = 20.0) -> float:
    from tsdsae.data.stream import StreamSplit

    stream = StreamSplit(uri, "train", endpoint)
    n, t0 = 0, time.perf_counter()
    for _ in stream.samples(seed=0, epoch=0):
        n += 1
        if time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0)


def step_need(threads: int) -> list[dict]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import step_rate

    torch.set_num_threads(threads)
    rows = []
    for model, stage in (("dsae", 1), ("ts_dsae", 1), ("ts_dsae", 2)):
        step = step_rate.setup_step(model, stage, 32, 128, 251, torch.device("cpu"))
        dt = step_rate.time_steps(step, torch.device("cpu"), 5, 2)
        rows.append({"kind": "step_need", "model": model, "stage": stage,
                     "samples_per_s": round(128 / dt, 1), "ms_per_step": round(dt * 1000, 1)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--base", type=int, default=256)
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="*", default=["stream", "memory"],
                   help="the memory rows to measure (none: only the reader and the step)")
    p.add_argument("--s3", action="store_true", help="also time the reader over moto's S3")
    p.add_argument("--prlimit-mb", type=float, default=0,
                   help="also train on the largest dataset under prlimit --data of this many MB, "
                        "with data.stream=auto and =off")
    p.add_argument("--child", nargs=2, metavar=("URI", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(train_one_epoch(args.child[0], args.child[1], args.threads)))
        return 0
    out = Path(args.out)
    uris = {}
    for scale in args.scales:
        uris[scale] = make_dataset(out / f"x{scale}", args.base * scale,
                                   max(4, args.base // 8)).rsplit("/", 1)[0]
    for scale in args.scales:
        for mode in args.modes:
            proc = subprocess.run([sys.executable, __file__, "--out", args.out, "--threads",
                                   str(args.threads), "--child", uris[scale], mode],
                                  capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps({"kind": "memory", "scale": scale, "clips": args.base * scale,
                              "mode": mode, **row}), flush=True)
    biggest = uris[max(args.scales)]
    if args.prlimit_mb:
        limit = str(int(args.prlimit_mb * 2**20))
        for mode in ("auto", "memory"):
            t0 = time.perf_counter()
            proc = subprocess.run(["prlimit", f"--data={limit}", sys.executable, __file__,
                                   "--out", args.out, "--threads", str(args.threads),
                                   "--child", biggest, mode], capture_output=True, text=True)
            last = (proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines()
                    or [""])[-1]
            print(json.dumps({"kind": "prlimit", "limit_mb": args.prlimit_mb,
                              "clips": args.base * max(args.scales), "mode": mode,
                              "rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
                              "last_line": last[:300]}), flush=True)
    print(json.dumps({"kind": "reader", "where": "folder",
                      "samples_per_s": round(reader_rate(biggest, None), 1)}), flush=True)
    if args.s3:
        from tsdsae.storage import open_store

        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ[name] = "testing"              # moto's fake credentials
        # moto in its own process, as a real object store would be: in this process its
        # request handling would share the reader's interpreter lock.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            endpoint = f"http://127.0.0.1:{port}"
            import boto3
            from botocore.exceptions import EndpointConnectionError

            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            for attempt in range(100):
                try:
                    client.create_bucket(Bucket="bench")
                    break
                except EndpointConnectionError:               # the server is still starting
                    if attempt == 99:
                        raise
                    time.sleep(0.2)
            store = open_store("s3://bench/data", endpoint)
            for path in sorted(Path(biggest).iterdir()):
                store.upload_file(path, path.name)
            print(json.dumps({"kind": "reader", "where": "s3 (moto server process, 127.0.0.1)",
                              "samples_per_s": round(reader_rate("s3://bench/data", endpoint),
                                                     1)}), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=10)
    for row in step_need(args.threads):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
