"""Data preparation and reader throughput, as JSON lines on stdout.

    python benchmarks/prep_rate.py                          # prepare 512 clips, read them back
    python benchmarks/prep_rate.py --dataset data/dmelodies # reader numbers on a bigger dataset

Lines:
- prep:    dMelodies clips/s for render (FluidSynth) + features + FLAC + shards, end to end,
           on threads here (executor "threads"), and with --ray-workers N as Ray tasks on a
           local Ray of N CPUs (executor "ray"; Ray's start-up not counted);
- memory:  load_dataset samples/s (whole splits into tensors), local and S3;
S3 is a moto server on 127.0.0.1 (fake credentials), so S3 numbers measure the HTTP path, not
a real object store.
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
from tsdsae.data import MANIFEST_NAME, load_dataset
from tsdsae.storage import open_store

def emit(**record) -> None:
    print(json.dumps(record), flush=True)


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
    p.add_argument("--no-s3", action="store_true", help="skip the moto S3 measurements")
    p.add_argument("--ray-workers", type=int, nargs="*", default=[],
                   help="also prepare on a local Ray of each of these numbers of CPUs")
    args = p.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    with tempfile.TemporaryDirectory(prefix="prep-rate-") as tmp:
        out = Path(tmp) / "dmelodies"
        start = time.perf_counter()
        prepare_dmelodies(str(out), n_clips=args.clips, samples_per_shard=args.samples_per_shard,
                          progress=False)
        seconds = time.perf_counter() - start
        emit(bench="prep", dataset="dmelodies", executor="threads", workers=2,
             clips=args.clips, seconds=round(seconds, 1),
             clips_per_s=round(args.clips / seconds, 1),
             projected_3000_clips_s=round(3000 * seconds / args.clips))
        for n in args.ray_workers:
            import ray

            from data_prep.parallel import Executor
            from tsdsae.ray_train import runtime_env

            ray.init(num_cpus=n, runtime_env=runtime_env(), log_to_driver=False,
                     configure_logging=False)
            try:
                start = time.perf_counter()
                with Executor(ray_address="local") as executor:
                    prepare_dmelodies(str(Path(tmp) / f"ray{n}"), n_clips=args.clips,
                                      samples_per_shard=args.samples_per_shard, progress=False,
                                      executor=executor)
                seconds = time.perf_counter() - start
            finally:
                ray.shutdown()
            same = all((Path(tmp) / f"ray{n}" / name).read_bytes() == (out / name).read_bytes()
                       for name in os.listdir(out) if name.endswith(".tar"))
            emit(bench="prep", dataset="dmelodies", executor="ray", workers=n, clips=args.clips,
                 seconds=round(seconds, 1), clips_per_s=round(args.clips / seconds, 1),
                 same_shards_as_threads=same)

        dataset = args.dataset or str(out)
        memory_rate(dataset, None, "local")
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
        finally:
            server.stop()


if __name__ == "__main__":
    main()
