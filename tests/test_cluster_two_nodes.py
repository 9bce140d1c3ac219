"""A two-node Ray cluster on this machine with data on the S3 server (tests/two_node_cluster.py,
in its own process): preparation spread over both nodes writes the same shards, bit for bit, as
the single-machine preparation; a two-worker DDP training streams its train split, one worker
on each node, survives a killed worker and is evaluated."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_prep_and_streaming_ddp_on_two_nodes(s3_server, small_dmelodies, tmp_path):
    bucket = s3_server.make_bucket("twonodes")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "two_node_cluster.py"),
                           s3_server.endpoint_url, bucket, str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["nodes"] == 2 and out["executor"] == "Ray: 2 CPUs on 2 nodes"
    # the same dataset, bit for bit, as the single-machine preparation of the same inputs
    local = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in Path(small_dmelodies).glob("*.tar")}
    assert out["shards"] == local and len(local) == 6
    assert out["manifest"] == json.loads((Path(small_dmelodies) / "dataset.json").read_text())
    # two ranks on two nodes; rank 1's worker was killed after epoch 2 and the run finished
    nodes = out["nodes_of_ranks"]
    assert out["killed"] and out["summary"]["epochs_run"] == 4
    for epoch in range(4):
        assert nodes[f"rank0-epoch{epoch}"] != nodes[f"rank1-epoch{epoch}"], nodes
    assert set(out["eval"]) == {"pre_swap", "gswap", "lswap"}
