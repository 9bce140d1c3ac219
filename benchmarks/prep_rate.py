"""Data preparation and reader throughput, as JSON lines on stdout.

    python benchmarks/prep_rate.py                          # prepare 512 clips, read them back
    python benchmarks/prep_rate.py --dataset data/dmelodies # reader numbers on a bigger dataset

Lines:
- prep:    dMelodies clips/s for render (FluidSynth) + features + FLAC + shards, end to end;
- memory:  load_dataset samples/s (whole splits into tensors), local and S3;
- stream:  stream_split samples/s: the first pass (sha256-verifying every shard), later passes,
           batches of 128 (collate_samples) in process and through DataLoader workers, local
           and S3. On a busy 2-core machine worker processes compete with each other and with
           whatever else runs; cpu_us_per_sample shows the reader's own cost.
S3 is a moto server on 127.0.0.1 (fake credentials), so S3 numbers measure the HTTP path, not
a real object store. x_training compares with what training consumes on this 2-core CPU:
128 samples x ~7 TS-DSAE stage-2 steps/s (benchmarks/step_rate.py, ~140 ms) = ~900 samples/s
(stage 1 and DSAE steps are faster: ~3,100 and ~1,800 samples/s).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from data_prep.dmelodies import prepare_dmelodies
from tsdsae.data import MANIFEST_NAME, collate_samples, load_dataset, stream_split
from tsdsae.storage import open_store

TRAINING_RATE = 900.0


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def stream_rates(uri: str, split: str, endpoint_url: str | None, passes: int, source: str) -> None:
    """Samples/s of stream_split; cpu_us_per_sample is this process's CPU time per sample, a
    load-independent measure of the reader's cost (1e6 / it = the rate one free core sustains)."""
    stream = stream_split(uri, split, endpoint_url=endpoint_url, seed=0)

    def measure(mode: str, index: int, iterable, count=lambda x: 1) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        n = sum(count(x) for x in iterable)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        emit(bench="stream", source=source, mode=mode, pass_index=index, samples=n,
             samples_per_s=round(n / wall), x_training=round(n / wall / TRAINING_RATE, 1),
             cpu_us_per_sample=round(cpu / n * 1e6, 1))

    for i in range(passes):
        measure("first_pass_verifying" if i == 0 else "pass", i, stream)
    batches = torch.utils.data.DataLoader(stream, batch_size=128, num_workers=0,
                                          collate_fn=collate_samples)
    measure("batches_of_128_in_process", 0, batches, lambda b: len(b["keys"]))
    for workers in (1, 2):
        loader = torch.utils.data.DataLoader(stream, batch_size=128, num_workers=workers,
                                             collate_fn=collate_samples, persistent_workers=True)
        for i in range(2):
            measure(f"dataloader_{workers}_workers_batch_128", i, loader, lambda b: len(b["keys"]))


def memory_rate(uri: str, endpoint_url: str | None, source: str) -> None:
    start = time.perf_counter()
    data = load_dataset(uri, endpoint_url=endpoint_url)
    seconds = time.perf_counter() - start
    n = sum(len(data[s]) for s in data)
    emit(bench="memory", source=source, samples=n, seconds=round(seconds, 2),
         samples_per_s=round(n / seconds))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=512, help="clips to prepare for the prep rate")
    p.add_argument("--samples-per-shard", type=int, default=128)
    p.add_argument("--dataset", default=None,
                   help="read this dataset instead of the freshly prepared one")
    p.add_argument("--passes", type=int, default=3, help="streaming passes per configuration")
    p.add_argument("--no-s3", action="store_true", help="skip the moto S3 measurements")
    args = p.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    with tempfile.TemporaryDirectory(prefix="prep-rate-") as tmp:
        out = Path(tmp) / "dmelodies"
        start = time.perf_counter()
        prepare_dmelodies(str(out), n_clips=args.clips, samples_per_shard=args.samples_per_shard,
                          progress=False)
        seconds = time.perf_counter() - start
        emit(bench="prep", dataset="dmelodies", clips=args.clips, seconds=round(seconds, 1),
             clips_per_s=round(args.clips / seconds, 1),
             projected_3000_clips_s=round(3000 * seconds / args.clips))

        dataset = args.dataset or str(out)
        memory_rate(dataset, None, "local")
        stream_rates(dataset, "train", None, args.passes, "local")
        if args.no_s3:
            return

        import logging
        from moto.server import ThreadedMotoServer
        logging.getLogger("werkzeug").setLevel(logging.ERROR)    # no per-request log lines
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ[name] = "testing"
        os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            endpoint = f"http://127.0.0.1:{port}"
            import boto3
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            local, remote = open_store(dataset), open_store("s3://bench/ds", endpoint)
            names = [n for n in local.list() if n.endswith(".tar")] + [MANIFEST_NAME]
            for name in names:                     # the manifest last, as data_prep does
                remote.upload_file(local.url(name), name)
            memory_rate(remote.uri, endpoint, "s3_moto")
            stream_rates(remote.uri, "train", endpoint, args.passes, "s3_moto")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
